"""Cell-by-gene matrices held dense, sparse (CSR) or on disk, read in row blocks.

``PerturbationData.x`` (``[n_cells, n_genes]``) is one of

* a dense ``np.ndarray`` (float32): the simulations and small files;
* a ``scipy.sparse.csr_matrix`` (float32): an AnnData whose counts are sparse, kept
  sparse in memory (about 8 bytes per non-zero instead of 4 per entry);
* a :class:`BackedMatrix`: a CSR group or dense dataset of an ``.h5ad`` file, read row by
  row on demand, for files larger than memory.

Everything that reads ``x`` goes through :func:`dense_rows` (a mini-batch or an
evaluation block, densified) or :func:`row_blocks` (a pass over many cells in blocks of
bounded size, each block dense or CSR as stored), so no reader densifies the whole
matrix at once unless it asks for a dense split (``PerturbationData.arrays``).
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import scipy.sparse as sp

BLOCK_BYTES = 64 * 2 ** 20  # a block of rows holds at most about this many bytes when dense (float32)


def is_dense(x) -> bool:
    return isinstance(x, np.ndarray)


def storage(x) -> str:
    """``"dense"``, ``"sparse"`` (in-memory CSR) or ``"backed"`` (on disk)."""
    if is_dense(x):
        return "dense"
    if isinstance(x, BackedMatrix):
        return "backed"
    if sp.issparse(x):
        return "sparse"
    raise TypeError(f"x must be a numpy array, a scipy sparse matrix or a BackedMatrix, got {type(x).__name__}")


def block_rows(n_genes: int, block_bytes: int | None = None) -> int:
    """Rows per block so that a dense float32 block stays under ``block_bytes`` (default
    :data:`BLOCK_BYTES`)."""
    return max(1, (block_bytes or BLOCK_BYTES) // (4 * max(1, n_genes)))


def dense_rows(x, rows) -> np.ndarray:  # [len(rows), G] float32
    """Rows ``rows`` (int positions, any order, repeats allowed) of ``x``, densified."""
    rows = np.asarray(rows, dtype=np.int64)
    block = x[rows]
    if sp.issparse(block):
        block = block.toarray()
    return np.asarray(block, dtype=np.float32)


def row_blocks(x, rows=None, n_rows: int | None = None) -> Iterator[tuple[int, np.ndarray | sp.csr_matrix]]:
    """``(offset, block)`` over ``rows`` of ``x`` (default: all rows, in order), ``n_rows``
    at a time (default :func:`block_rows`); ``block`` is ``[<= n_rows, G]``, dense or CSR as
    stored, and ``offset`` its first position within ``rows``."""
    total = x.shape[0] if rows is None else len(rows)
    step = n_rows or block_rows(x.shape[1])
    for start in range(0, total, step):
        stop = min(start + step, total)
        yield start, (x[start:stop] if rows is None else x[np.asarray(rows[start:stop], dtype=np.int64)])


def column_moments(x, rows=None, log1p: bool = False) -> tuple[np.ndarray, np.ndarray]:  # ([G], [G]) float64
    """Per-column mean and (population) standard deviation of ``x`` or ``log(x + 1)`` over
    ``rows``, one block at a time: exact two-pass moments within a block (over the
    non-zeros and the implicit zeros of a CSR block), merged across blocks with Chan et
    al.'s update, so a gene constant over the rows has a standard deviation of 0."""
    n_genes = x.shape[1]
    count, mean, m2 = 0, np.zeros(n_genes), np.zeros(n_genes)
    for _, block in row_blocks(x, rows):
        n = block.shape[0]
        if sp.issparse(block):
            block = sp.csr_matrix(block)
            values = block.data.astype(np.float64)
            values = np.log1p(values) if log1p else values
            block_mean = np.bincount(block.indices, weights=values, minlength=n_genes) / n
            nonzero = np.bincount(block.indices, minlength=n_genes)
            block_m2 = np.bincount(block.indices, weights=(values - block_mean[block.indices]) ** 2,
                                   minlength=n_genes) + (n - nonzero) * block_mean ** 2
        else:
            values = np.asarray(block, dtype=np.float64)
            values = np.log1p(values) if log1p else values
            block_mean = values.mean(axis=0)
            block_m2 = ((values - block_mean) ** 2).sum(axis=0)
        total = count + n
        delta = block_mean - mean
        mean = mean + delta * (n / total)
        m2 = m2 + block_m2 + delta ** 2 * (count * n / total)
        count = total
    return mean, np.sqrt(m2 / max(count, 1))


def value_problems(x, checks: dict) -> dict[str, tuple[int, list[int], list[int], float]]:
    """Scan the values of ``x`` block by block. ``checks``: ``{kind: fn(values) -> bool
    mask}`` on the stored values (the non-zeros of a CSR block). Returns, for each kind
    found, ``(n_values, n_cells, first cell positions (up to 5), an example value)``."""
    return _scan(x, checks, totals=False)[0]


def scan_values(x, checks: dict) -> tuple[dict[str, tuple[int, list[int], list[int], float]], np.ndarray,
                                           np.ndarray, np.ndarray]:
    """:func:`value_problems` and, in the same pass, the row sums ``[n]`` (float64) and
    the number of non-zero values per row ``[n]`` and per column ``[G]`` (int64)."""
    return _scan(x, checks, totals=True)


def _scan(x, checks: dict, totals: bool):
    found: dict = {}
    n_rows, n_columns = x.shape
    sums = np.zeros(n_rows if totals else 0, np.float64)
    row_nonzero = np.zeros(n_rows if totals else 0, np.int64)
    column_nonzero = np.zeros(n_columns if totals else 0, np.int64)
    for start, block in row_blocks(x):
        stop = start + block.shape[0]
        if sp.issparse(block):
            block = sp.csr_matrix(block)
            values = block.data
            row_of_value = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
            if totals:
                stored_zero = values == 0  # explicit zeros stored in the CSR are not counted
                sums[start:stop] = np.asarray(block.sum(axis=1, dtype=np.float64)).reshape(-1)
                row_nonzero[start:stop] = np.diff(block.indptr)
                column_nonzero += np.bincount(block.indices, minlength=n_columns)
                if stored_zero.any():
                    row_nonzero[start:stop] -= np.bincount(row_of_value[stored_zero], minlength=block.shape[0])
                    column_nonzero -= np.bincount(block.indices[stored_zero], minlength=n_columns)
        else:
            values = np.asarray(block)
            row_of_value = None
            if totals:
                nonzero = values != 0
                sums[start:stop] = values.sum(axis=1, dtype=np.float64)
                row_nonzero[start:stop] = np.count_nonzero(nonzero, axis=1)
                column_nonzero += np.count_nonzero(nonzero, axis=0)
        for kind, check in checks.items():
            bad = check(values)
            if not bad.any():
                continue
            cells = np.unique(row_of_value[bad]) if row_of_value is not None else np.flatnonzero(bad.any(axis=1))
            n_values, n_cells, first, example = found.get(kind, (0, 0, [], values[bad].ravel()[0]))
            found[kind] = (n_values + int(bad.sum()), n_cells + len(cells),
                           (first + (cells[:5] + start).tolist())[:5], example)
    return found, sums, row_nonzero, column_nonzero


class BackedMatrix:
    """A ``[n_rows, n_cols]`` matrix stored in an ``.h5ad`` (HDF5) file, read on demand.

    ``key`` names a CSR group (``"X"``, ``"layers/counts"``; written by anndata as
    ``encoding-type: csr_matrix``) or a dense dataset. Only ``indptr`` (8 bytes per row)
    is held in memory; ``matrix[rows]`` reads the requested rows in increasing order (one
    read per run of consecutive rows, through anndata's backed sparse dataset) and returns
    them, in the requested order, as a float32 CSR matrix (or a dense array for a dense
    dataset). ``rows`` and ``columns`` select and order a subset of the stored matrix
    (the cells kept by a split, the genes of a registration).

    The file is opened read-only and shared by the threads of one process (h5py
    serialises access); pickling reopens it by path.
    """

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, path, key: str, rows=None, columns=None):
        import h5py

        self.path, self.key = os.fspath(path), key
        self._file = h5py.File(self.path, "r")
        element = self._file[key]
        if isinstance(element, h5py.Dataset):
            self._kind, self._element, stored = "dense", element, element.shape
        else:
            encoding = element.attrs.get("encoding-type", "")
            if encoding != "csr_matrix":
                from sams_jax.data.dataset import DataError

                self._file.close()
                raise DataError(
                    f"{key!r} in {self.path!r} is stored as {encoding or 'an unknown encoding'}; backed reading needs "
                    "cells as rows of a CSR matrix (or a dense array): rewrite it once with "
                    "adata.X = scipy.sparse.csr_matrix(adata.X) (or the layer) and adata.write_h5ad(...), or read "
                    "the file into memory (data.backed=False)")
            from anndata.io import sparse_dataset

            self._kind, self._element = "csr", sparse_dataset(element)
            stored = tuple(int(v) for v in element.attrs["shape"])
        self._stored_shape = stored
        self._rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._columns = None if columns is None else np.asarray(columns, dtype=np.int64)
        self.shape = (stored[0] if self._rows is None else len(self._rows),
                      stored[1] if self._columns is None else len(self._columns))

    def subset(self, rows=None, columns=None) -> "BackedMatrix":
        """The matrix restricted to ``rows`` / ``columns`` (positions in this matrix)."""
        rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        columns = None if columns is None else np.asarray(columns, dtype=np.int64)
        if rows is not None and self._rows is not None:
            rows = self._rows[rows]
        elif rows is None:
            rows = self._rows
        if columns is not None and self._columns is not None:
            columns = self._columns[columns]
        elif columns is None:
            columns = self._columns
        return BackedMatrix(self.path, self.key, rows, columns)

    def _read_sorted(self, stored_rows: np.ndarray):
        """Stored rows (sorted, unique, not empty) as CSR or dense, all stored columns. Rows
        that fill at least half of their span (a pass over a split) are read as one slice
        and then selected; scattered rows (a mini-batch) are read one run at a time."""
        first, span = int(stored_rows[0]), int(stored_rows[-1] - stored_rows[0] + 1)
        if span <= 2 * len(stored_rows):
            block = self._element[first:first + span]
            block = sp.csr_matrix(block) if self._kind == "csr" else np.asarray(block)
            return block if span == len(stored_rows) else block[stored_rows - first]
        block = self._element[stored_rows]
        return sp.csr_matrix(block) if self._kind == "csr" else np.asarray(block)

    def __getitem__(self, rows):
        if isinstance(rows, tuple):
            raise TypeError("a BackedMatrix is indexed by rows only: matrix[rows]")
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.shape[0]))
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).reshape(-1)
        stored = rows if self._rows is None else self._rows[rows]
        unique, inverse = np.unique(stored, return_inverse=True)
        if len(unique) == 0:
            block = sp.csr_matrix((0, self._stored_shape[1]), dtype=np.float32) if self._kind == "csr" else \
                np.zeros((0, self._stored_shape[1]), np.float32)
        else:
            block = self._read_sorted(unique)
        if len(unique) != len(stored) or not np.array_equal(unique, stored):
            block = block[inverse.reshape(-1)]
        if self._columns is not None:
            block = block[:, self._columns]
        return block.astype(np.float32, copy=False)

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        self._file.close()

    def __getstate__(self):
        return {"path": self.path, "key": self.key, "rows": self._rows, "columns": self._columns}

    def __setstate__(self, state):
        self.__init__(state["path"], state["key"], state["rows"], state["columns"])

    def __repr__(self) -> str:
        return f"BackedMatrix({self.path!r}, {self.key!r}, shape={self.shape}, {self._kind})"
