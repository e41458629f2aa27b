"""The data interface every model trains on: :class:`PerturbationData`.

A data set is a cell-by-gene matrix ``x`` (``[n_cells, n_genes]``: dense, sparse CSR or
an on-disk :class:`~sams_jax.data.matrix.BackedMatrix`, see :mod:`sams_jax.data.matrix`), a dosage matrix
``dosages`` (``[n_cells, n_perturbations]``; a control cell's row is all zeros, a pair has
two non-zeros), a split label per cell (``train`` / ``val`` / ``test``), per-cell library
sizes, and names for genes and perturbations. Simulations also carry their ground truth.
Loaders (the simulation; AnnData files in :mod:`sams_jax.data.anndata_io`) fill this
class; training, checkpoints and evaluation read only from it and from
:meth:`PerturbationData.metadata`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import jax.numpy as jnp

from sams_jax.data import matrix as matrix_lib
from sams_jax.data.splits import NO_SPLIT

SPLITS = ("train", "val", "test")
NORMALIZATIONS = ("log_standardize", "standardize", "none")
MIN_SCALE = 1e-6


class DataError(ValueError):
    """Bad input data; the message names the problem and the fix."""


def _non_finite_error(key: str, n_values: int, rows: list[int]) -> DataError:
    return DataError(f"{key} contains {n_values} non-finite values (NaN or inf), e.g. in cells {rows}; "
                     "remove or impute those cells before training")


def _check_finite(key: str, values: np.ndarray) -> None:
    """Raise :class:`DataError` naming ``key`` if ``values`` (rows = cells) has NaN or inf."""
    bad = ~np.isfinite(values)
    if bad.any():
        raise _non_finite_error(key, int(bad.sum()), np.unique(np.nonzero(bad)[0])[:5].tolist())


def _check_library_size(likelihood: str | None, library_size: np.ndarray) -> None:
    """Under ``library_nb`` each cell's expected counts sum to its library size: a negative
    one makes every score NaN (a training run then stopped as diverged); 0 (an empty cell)
    stays finite, as the mean has a floor."""
    if likelihood != "library_nb":
        return
    bad = np.nonzero(library_size < 0)[0]
    if bad.size:
        raise DataError(f"likelihood 'library_nb' needs non-negative library sizes, but library_size has {bad.size} "
                        f"negative value(s) (cells at rows {bad[:5].tolist()}, e.g. {float(library_size[bad[0]])}); "
                        "pass each cell's total count, e.g. x.sum(1)")


def _count_error(likelihood: str, needed: str, found: str) -> DataError:
    return DataError(f"likelihood {likelihood!r} needs {needed} counts, but x has {found} values; "
                     "pass raw counts (e.g. layers['counts']) or use likelihood='normal'")


@dataclasses.dataclass(repr=False)
class PerturbationData:
    # [n_cells, n_genes] float32 (raw counts for count likelihoods): np.ndarray, scipy.sparse.csr_matrix or
    # BackedMatrix (rows read from an .h5ad on demand); non-dense x is only ever read in row blocks
    x: Any
    dosages: np.ndarray  # [n_cells, n_perturbations] float32
    split: np.ndarray  # [n_cells] str, values in SPLITS or "" (in no split: only the data ATEs use the cell)
    feature_names: list[str]
    perturbation_names: list[str]
    library_size: np.ndarray  # [n_cells] float32
    control: str | None = None  # reference intervention for ATEs ("control" = all zeros)
    truth: dict[str, np.ndarray] | None = None  # simulation ground truth
    name: str = "data"
    registration: dict[str, Any] | None = None  # how an AnnData was read (sams_jax.data.anndata_io)
    # [n_genes] display names (gene symbols where var_names are e.g. Ensembl IDs); None: the feature names
    feature_symbols: list[str] | None = None

    def __repr__(self) -> str:  # sizes, not the arrays
        splits = {s: int((self.split == s).sum()) for s in (*SPLITS, NO_SPLIT) if (self.split == s).any()}
        return (f"PerturbationData(name={self.name!r}, cells={self.x.shape[0]:,}, genes={self.n_genes:,}, "
                f"perturbations={self.n_perturbations:,}, control={self.control!r}, splits={splits}, "
                f"x={type(self.x).__name__})")

    @classmethod
    def from_anndata(cls, adata_or_path, **kwargs) -> "PerturbationData":
        """Register an AnnData or ``.h5ad`` path; see
        :func:`sams_jax.data.anndata_io.from_anndata` for the arguments and checks."""
        from sams_jax.data.anndata_io import from_anndata

        return from_anndata(adata_or_path, **kwargs)

    @property
    def n_genes(self) -> int:
        return self.x.shape[1]

    @property
    def n_perturbations(self) -> int:
        return self.dosages.shape[1]

    def validate(self, likelihood: str | None = None) -> None:
        """Raise :class:`DataError` on inconsistent shapes, unknown split labels,
        non-finite values, or (for count likelihoods) negative / non-integer counts."""
        n = self.x.shape[0]
        if self.x.ndim != 2 or self.dosages.ndim != 2:
            raise DataError(f"x and dosages must be 2-D; got x {self.x.shape}, dosages {self.dosages.shape}")
        for key, arr in (("dosages", self.dosages), ("split", self.split), ("library_size", self.library_size)):
            if arr.shape[0] != n:
                raise DataError(f"{key} has {arr.shape[0]} rows but x has {n} cells")
        if len(self.feature_names) != self.n_genes:
            raise DataError(f"{len(self.feature_names)} feature names for {self.n_genes} genes")
        if self.feature_symbols is not None and len(self.feature_symbols) != self.n_genes:
            raise DataError(f"{len(self.feature_symbols)} feature symbols for {self.n_genes} genes")
        if len(self.perturbation_names) != self.n_perturbations:
            raise DataError(
                f"{len(self.perturbation_names)} perturbation names for {self.n_perturbations} dosage columns")
        if self.n_perturbations == 0:
            where = ""
            if self.registration:
                key = self.registration.get("guide_column_pattern") or self.registration.get("perturbation_key")
                where = (f" (registered from {key!r} with control={self.registration.get('control')!r}, "
                         f"control_match={self.registration.get('control_match')!r}: is that the column of the "
                         "perturbations, and does the control label match only the controls?)")
            raise DataError(f"the data have no perturbations besides the control: dosages have 0 columns{where}")
        unknown = sorted(set(np.unique(self.split).tolist()) - {*SPLITS, NO_SPLIT})
        if unknown:
            raise DataError(f"unknown split labels {unknown}; allowed: {list(SPLITS)} (or {NO_SPLIT!r}: a cell in no "
                            "split, used only for the data ATEs)")
        if not np.any(self.split == "train"):
            raise DataError("the data has no training cells (split == 'train')")
        if not matrix_lib.is_dense(self.x):
            self._validate_blocks(likelihood)
            return
        for key, arr in (("x", self.x), ("dosages", self.dosages), ("library_size", self.library_size)):
            _check_finite(key, arr)
        if likelihood in ("poisson", "library_nb"):
            if (self.x < 0).any():
                raise _count_error(likelihood, "non-negative", "negative")
            if not np.array_equal(self.x, np.round(self.x)):
                raise _count_error(likelihood, "integer", "non-integer")
        _check_library_size(likelihood, self.library_size)  # after the counts, whose sums they may be

    def _validate_blocks(self, likelihood: str | None) -> None:
        """The value checks of :meth:`validate` for sparse or backed ``x``, one block of
        cells at a time (the same messages as the dense checks)."""
        checks = {"non-finite": lambda v: ~np.isfinite(v)}
        if likelihood in ("poisson", "library_nb"):
            checks["negative"] = lambda v: np.isfinite(v) & (v < 0)
            checks["non-integer"] = lambda v: np.isfinite(v) & (v != np.round(v))
        found = matrix_lib.value_problems(self.x, checks)
        if "non-finite" in found:
            n_values, _, rows, _ = found["non-finite"]
            raise _non_finite_error("x", n_values, rows)
        for key, arr in (("dosages", self.dosages), ("library_size", self.library_size)):
            _check_finite(key, arr)
        if "negative" in found:
            raise _count_error(likelihood, "non-negative", "negative")
        if "non-integer" in found:
            raise _count_error(likelihood, "integer", "non-integer")
        _check_library_size(likelihood, self.library_size)

    def mask(self, split: str) -> np.ndarray:  # [n_cells] bool
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
        return self.split == split

    @property
    def storage(self) -> str:
        """How ``x`` is held: ``"dense"``, ``"sparse"`` (CSR in memory) or ``"backed"`` (on disk)."""
        return matrix_lib.storage(self.x)

    def rows(self, split: str) -> np.ndarray:  # [n_split] int, increasing
        """Positions of the cells of ``split``."""
        return np.flatnonzero(self.mask(split))

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        """The cells of one split as ``{"x" [n, G], "dosages" [n, T], "library_size" [n]}``
        dense arrays (a sparse or backed ``x`` is densified for this split: for large
        data read blocks of cells with :meth:`cell_arrays` instead)."""
        keep = self.mask(split)
        if matrix_lib.is_dense(self.x):
            return {"x": self.x[keep], "dosages": self.dosages[keep], "library_size": self.library_size[keep]}
        return self.cell_arrays(np.flatnonzero(keep))

    def cell_arrays(self, cells) -> dict[str, np.ndarray]:
        """Cells at positions ``cells`` (``[n]`` int, any order, repeats allowed) as dense
        ``{"x" [n, G] float32, "dosages" [n, T], "library_size" [n]}`` arrays."""
        cells = np.asarray(cells, dtype=np.int64)
        return {"x": matrix_lib.dense_rows(self.x, cells), "dosages": self.dosages[cells],
                "library_size": self.library_size[cells]}

    def _dosage_blocks(self, split: str):
        """The dosage rows ``[block, T]`` of ``split``'s cells, one block of cells at a time
        (the dosage matrix is not copied)."""
        rows = self.rows(split)
        step = matrix_lib.block_rows(self.n_perturbations)
        for start in range(0, len(rows), step):
            yield self.dosages[rows[start:start + step]]

    def cells_per_perturbation(self, split: str) -> np.ndarray:  # [n_perturbations] int
        """``N_t``: number of cells of ``split`` that received perturbation ``t``."""
        counts = np.zeros(self.n_perturbations, np.int64)
        for block in self._dosage_blocks(split):
            counts += np.count_nonzero(block, axis=0)
        return counts

    def conditions(self, split: str) -> list[list[int]]:
        """The distinct sets of perturbations that cells of ``split`` received, each as
        increasing vocabulary indices (``[]``: no perturbation, the control), sorted. Each
        cell's set is packed into bits, so the sets are compared as byte strings."""
        width = self.n_perturbations
        packed = [np.packbits(block != 0, axis=1) for block in self._dosage_blocks(split)]
        if not packed or width == 0:
            return [[]] if len(self.rows(split)) else []
        row_bytes = packed[0].shape[1]
        keys = np.unique(np.concatenate([np.unique(np.ascontiguousarray(block).view(f"V{row_bytes}").ravel())
                                         for block in packed]))
        sets = np.unpackbits(keys.view(np.uint8).reshape(len(keys), row_bytes), axis=1, count=width).astype(bool)
        return sorted(np.flatnonzero(row).tolist() for row in sets)

    def normalization_stats(self, method: str) -> dict[str, np.ndarray]:
        """Per-gene encoder-input statistics from the training split (SPEC 2)."""
        if matrix_lib.is_dense(self.x):
            return normalization_stats(self.x[self.mask("train")], method)
        return normalization_stats(self.x, method, rows=self.rows("train"))

    def metadata(self, normalization: str, stats: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """Everything evaluation needs besides the parameters, JSON-serialisable
        (``stats``: the normalisation statistics when already computed)."""
        stats = self.normalization_stats(normalization) if stats is None else stats
        return {
            "name": self.name,
            "feature_names": list(self.feature_names),
            # display names only (not compared on resume or evaluation)
            "feature_symbols": None if self.feature_symbols is None else list(self.feature_symbols),
            "perturbation_names": list(self.perturbation_names),
            "control": self.control,
            "normalization": normalization,
            "normalization_stats": {k: np.asarray(v).tolist() for k, v in stats.items()},
            "cells_per_perturbation": {s: self.cells_per_perturbation(s).tolist() for s in SPLITS},
            # the sets of perturbations given to training cells (Predictor.seen_in_training)
            "training_conditions": self.conditions("train"),
            "n_cells": {s: int(self.mask(s).sum()) for s in SPLITS},
            # cells in no split (a Norman task's left-out pair cells): only the data ATEs use them
            "n_cells_in_no_split": int((self.split == NO_SPLIT).sum()),
            # the library size of generated cells (Predictor.sample) unless one is given
            "median_library_size": float(np.median(self.library_size[self.mask("train")])),
            "registration": self.registration,
        }


def _name_difference(key: str, saved: list[str], current: list[str]) -> str:
    """``key`` with how two name lists differ: order only, or the names missing and extra."""
    if sorted(saved) == sorted(current):
        return f"{key} (the same {len(saved)} names in another order)"
    saved_set, current_set = set(saved), set(current)
    missing = [name for name in saved if name not in current_set]
    extra = [name for name in current if name not in saved_set]
    return f"{key} ({len(missing)} missing, e.g. {missing[:5]}; {len(extra)} extra, e.g. {extra[:5]})"


def metadata_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The fields of a run's saved data ``metadata`` (:meth:`PerturbationData.metadata`)
    that ``current`` data's do not match: names, cells per split (and in none) and per
    perturbation, the sets of perturbations given to training cells, the training cells'
    normalisation statistics and median library size (to float tolerance); differing gene or perturbation
    names come with how they differ (order only, or the names missing and extra). Fields a
    run saved before they existed are skipped. Empty for the data the run was trained on,
    wherever they are stored; these summaries do not see every change (e.g. cells
    reordered, or changed outside the training split with the same counts)."""
    differ = [_name_difference(key, saved[key], current[key]) for key in ("feature_names", "perturbation_names")
              if key in saved and current[key] != saved[key]]
    differ += [key for key in ("n_cells", "n_cells_in_no_split", "cells_per_perturbation", "training_conditions")
               if key in saved and current[key] != saved[key]]
    if "median_library_size" in saved and not np.isclose(current["median_library_size"],
                                                          saved["median_library_size"], rtol=1e-5):
        differ.append("median_library_size")
    saved_stats, current_stats = saved.get("normalization_stats", {}), current["normalization_stats"]
    differ += [f"normalization_stats[{key!r}]" for key, values in saved_stats.items()
               if key not in current_stats or np.shape(current_stats[key]) != np.shape(values)
               or not np.allclose(current_stats[key], values, rtol=1e-4, atol=1e-5)]
    return differ


def normalization_stats(x_train, method: str, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``{"mean": [G], "scale": [G]}`` for ``log_standardize`` (on ``log(x + 1)``) or
    ``standardize`` (on ``x``); zeros / ones for ``none``. A gene constant on the training
    split gets scale 1 instead of 0. ``x_train`` is the training cells' ``[n, G]`` matrix,
    or with ``rows`` a larger matrix (dense, CSR or backed) whose ``rows`` are the
    training cells; a non-dense matrix is read one block of cells at a time."""
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {method!r}; allowed: {NORMALIZATIONS}")
    g = x_train.shape[1]
    if method == "none":
        return {"mean": np.zeros(g, np.float32), "scale": np.ones(g, np.float32)}
    with np.errstate(invalid="ignore", divide="ignore"):  # log1p(x <= -1): reported below
        if rows is not None or not matrix_lib.is_dense(x_train):
            mean, scale = matrix_lib.column_moments(x_train, rows, log1p=method == "log_standardize")
        else:
            values = x_train.astype(np.float64)
            values = np.log1p(values) if method == "log_standardize" else values
            mean, scale = values.mean(axis=0), values.std(axis=0)
    if not (np.isfinite(mean).all() and np.isfinite(scale).all()):
        if method == "log_standardize":
            raise DataError("model.normalization='log_standardize' feeds the encoder log(1 + x), which is undefined "
                            "for x <= -1, and the training cells hold such values (scaled or centred data?); use "
                            "--config.model.normalization=standardize (or none), or give raw counts")
        raise DataError("the training cells' per-gene means or standard deviations are not finite (values too "
                        "large for float64?); rescale x or use --config.model.normalization=none")
    scale = np.where(scale < MIN_SCALE, 1.0, scale)
    return {"mean": mean.astype(np.float32), "scale": scale.astype(np.float32)}


def normalize_input(x, stats, method: str):
    """Encoder input ``[..., G]`` from raw ``x`` and training-split ``stats`` (jittable)."""
    if method == "log_standardize":
        x = jnp.log1p(x)
    return (x - stats["mean"]) / stats["scale"]


def plate_scale(cells_per_perturbation) -> np.ndarray:  # [T] float32
    """``1 / N_t`` where ``N_t > 0`` and ``0`` elsewhere: the plate weight of SPEC 3 is
    ``w[i, t] = 1[D[i, t] != 0] * plate_scale[t]``."""
    n_t = np.asarray(cells_per_perturbation, dtype=np.float64)
    return np.where(n_t > 0, 1.0 / np.maximum(n_t, 1.0), 0.0).astype(np.float32)
