"""Training and scoring from cells held on the host (``train.data_placement = "host"``).

The counts stay on the host as they are stored (dense, CSR, or rows of an ``.h5ad``
file; :mod:`sams_jax.data.matrix`). For each training dispatch a background thread
takes the mini-batch indices of the same :class:`~sams_jax.train.BatchSchedule` the
device path uses, reads those cells (sorted reads per dispatch for a backed file),
densifies them into ``{"x": [n_steps, B, G], "dosages": [n_steps, B, T],
"library_size": [n_steps, B]}`` and puts them on the device with the batch sharding,
``prefetch`` dispatches ahead of the device (:class:`Prefetcher`). Validation and the
predictive IWELBO read a split in blocks of whole evaluation chunks
(:func:`host_cell_scores`) and number the chunks as the device path does, so both
placements compute the same numbers.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable

import numpy as np

from sams_jax.data import PerturbationData, matrix as matrix_lib

# data_placement="auto" keeps the training split on the device when its dense size (x, dosages and library
# sizes as float32, per device) is at most this, and x is not backed; larger data stream from the host
AUTO_DEVICE_MAX_BYTES = 2 * 2 ** 30
THREAD_NAME = "sams_jax-prefetch"
_POLL_S = 0.1  # how often a blocked producer or consumer checks for shutdown


def resolve_placement(placement: str, data: PerturbationData) -> str:
    """``"device"`` or ``"host"`` for ``train.data_placement`` (the placements:
    :mod:`sams_jax.train`)."""
    if placement != "auto":
        return placement
    if data.storage == "backed":
        return "host"
    n_train = int((data.split == "train").sum())
    dense_bytes = 4 * n_train * (data.n_genes + data.n_perturbations + 1)
    return "device" if dense_bytes <= AUTO_DEVICE_MAX_BYTES else "host"


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


class Prefetcher:
    """``produce(item)`` for each item of ``work``, in order, in a background thread that
    runs at most ``depth`` results ahead of :meth:`get`.

    Use as a context manager: leaving the block (normally or by an exception such as
    ``TrainingDiverged``) stops the thread and waits for it, so nothing is left running.
    An exception raised by ``produce`` is re-raised by the :meth:`get` that would have
    returned its result.
    """

    def __init__(self, produce: Callable[[Any], Any], work: Iterable, depth: int = 2, name: str = THREAD_NAME):
        self._produce, self._work = produce, iter(work)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._work:
                if self._stop.is_set() or not self._put((item, self._produce(item))):
                    return
            self._put(_DONE)
        except BaseException as error:  # handed to the consumer, re-raised there
            self._put(_Failure(error))

    def get(self):
        """``(work item, result)`` of the next item; ``StopIteration`` after the last."""
        while True:
            try:
                entry = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread stopped without a result") from None
        if entry is _DONE:
            raise StopIteration
        if isinstance(entry, _Failure):
            raise entry.error
        return entry

    def close(self) -> None:
        """Stop the thread (a result being produced is finished, then dropped) and join it."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()  # unblock a producer waiting to put
            except queue.Empty:
                pass
            self._thread.join(timeout=_POLL_S)
        while not self._queue.empty():  # drop references to device buffers
            self._queue.get_nowait()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def host_batches(data, train_cells: np.ndarray, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Dense mini-batches for one dispatch: ``indices`` ``[n_steps, B]`` are positions in
    the training split (``BatchSchedule``), ``train_cells`` ``[n_train]`` the training
    cells' rows of ``data``. Returns ``{"x": [n_steps, B, G] float32, "dosages":
    [n_steps, B, T], "library_size": [n_steps, B]}`` (the cells of a dispatch are read
    once, in increasing order, then placed)."""
    arrays = data.cell_arrays(train_cells[np.asarray(indices).reshape(-1)])
    return {key: value.reshape(*indices.shape, *value.shape[1:]) for key, value in arrays.items()}


def host_cell_scores(block_fn: Callable, data, cells: np.ndarray, chunk_size: int, put: Callable,
                     block_cells: int | None = None) -> np.ndarray:  # [n, ...]
    """Per-cell results for ``cells`` (row positions of ``data``, e.g. ``data.rows("val")``)
    with ``x`` on the host, one block of cells at a time.

    ``block_fn(arrays, first_chunk) -> [n_block, ...]`` maps dense ``arrays`` (leaves
    ``[n_block, ...]``); for scores it uses ``chunk_size`` (``min(chunk_size, n)``, as the
    device path's :func:`~sams_jax.objective.chunked_per_cell` does) and numbers its chunks
    from ``first_chunk``: e.g. ``split_objective`` or ``predictive_iwelbo`` jitted with
    ``first_chunk`` as an argument, which then give every cell the random draws it gets
    when the whole split is scored at once. A block is a whole number of chunks (at most
    ``block_cells`` cells; default about 64 MB dense); the last is zero-padded to the same
    size (one compilation). ``put`` places a block's arrays on the device. The next block
    is read while the device works on the current one.
    """
    cells = np.asarray(cells, dtype=np.int64)
    n = len(cells)
    if n == 0:
        return np.zeros(0, np.float32)
    chunk = min(chunk_size, n)
    n_chunks = -(-n // chunk)
    per_block = max(1, (block_cells or matrix_lib.block_rows(data.n_genes + data.n_perturbations)) // chunk)
    size = min(per_block, n_chunks) * chunk

    def read(start: int) -> dict:
        arrays = data.cell_arrays(cells[start:start + size])
        pad = size - arrays["x"].shape[0]
        if pad:
            arrays = {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in arrays.items()}
        return put(arrays)

    out, pending = [], None
    for start in range(0, n, size):
        result = block_fn(read(start), start // chunk)  # dispatched asynchronously
        if pending is not None:
            out.append(np.asarray(pending))
        pending = result
    out.append(np.asarray(pending))
    return np.concatenate(out)[:n]
