"""Several processes (hosts): start-up, the device mesh and where the data live.

One training run may span several processes, typically one per host (or one per GPU),
each driving its local devices; together they form one global ``("process", "device")``
mesh. :func:`initialize` joins the processes (``jax.distributed.initialize``) and must run
before any JAX computation; with one process nothing changes.

Data parallelism (:class:`DataParallel`):

* parameters, optimizer state, normalisation statistics and random keys are replicated on
  every device of every process; XLA averages the gradients;
* the training cells are split into ``S`` shards (``train.data_shards``, 0 = one per
  process): shard ``s`` holds the training cells whose position among the training cells
  is ``s`` modulo ``S``. Process ``p`` of ``P`` keeps shards ``p * S / P`` to
  ``(p + 1) * S / P - 1`` on its devices (each padded to the largest shard's size), and
  every step draws ``B / S`` cells from each shard (:class:`sams_jax.train.BatchSchedule`),
  so each process builds its own part of the global batch from its own cells
  (``jax.make_array_from_process_local_data``); the gather runs per device
  (``jax.shard_map``);
* validation loss, final IWELBO and mask scores are computed by every process on its own
  first device from the full validation / test splits (the same numbers everywhere; only
  process 0 writes files).

Because the shards, not the processes, define the mini-batches, a run with ``S`` shards
gives the same batches on any number of processes dividing ``S`` (one process included),
which is how the two-process test checks itself against a single process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ENV_FLAG = "SAMS_JAX_DISTRIBUTED"  # "1": initialise from the cluster environment (SLURM, Open MPI, ...)
AXES = ("process", "device")


def requested(config) -> bool:
    """Whether this run asks for ``jax.distributed.initialize`` (config or environment)."""
    return bool(config.train.distributed.coordinator_address) or os.environ.get(ENV_FLAG, "") not in ("", "0")


def initialize(config) -> bool:
    """Join the processes of a multi-process run; a no-op (``False``) for a single process.

    Explicit settings come from ``config.train.distributed`` (``coordinator_address``,
    ``num_processes``, ``process_id``, ``local_device_ids``; empty / 0 / -1 = unset). With
    ``SAMS_JAX_DISTRIBUTED=1`` in the environment, unset values are detected by
    ``jax.distributed.initialize`` from the cluster (SLURM, Open MPI, ...; also
    ``JAX_COORDINATOR_ADDRESS``). Call once, before any JAX computation.
    """
    if not requested(config):
        return False
    if jax.distributed.is_initialized():
        return True
    settings = config.train.distributed
    kwargs: dict[str, Any] = {"initialization_timeout": int(settings.initialization_timeout)}
    if settings.coordinator_address:
        kwargs["coordinator_address"] = settings.coordinator_address
    if settings.num_processes > 0:
        kwargs["num_processes"] = int(settings.num_processes)
    if settings.process_id >= 0:
        kwargs["process_id"] = int(settings.process_id)
    if settings.local_device_ids:
        kwargs["local_device_ids"] = [int(i) for i in str(settings.local_device_ids).split(",")]
    address = kwargs.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if kwargs.get("process_id") == 0 and address and not os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
        _check_port_free(address)
    # one line before joining: a coordinator that never hears from every process (a wrong num_processes, two
    # processes with one process_id) ends in an abort inside JAX's runtime, which this line explains
    described = ", ".join(f"{key}={kwargs[key]}" for key in ("coordinator_address", "num_processes", "process_id")
                          if key in kwargs) or "settings from the cluster environment"
    print(f"sams_jax: joining a multi-process run ({described}; waiting up to "
          f"{kwargs['initialization_timeout']} s for every process; each needs the same coordinator_address and "
          "num_processes and its own process_id)", file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as error:
        from sams_jax.config import ConfigError

        hint = (f"with {ENV_FLAG}=1 JAX reads unset values from a cluster environment (SLURM, Open MPI, "
                "JAX_COORDINATOR_ADDRESS); outside one, set train.distributed.coordinator_address, num_processes "
                f"and process_id, or unset {ENV_FLAG}") if os.environ.get(ENV_FLAG, "") not in ("", "0") else \
            "check train.distributed.coordinator_address (reachable from every process), num_processes and process_id"
        raise ConfigError(f"jax.distributed.initialize failed: {error}; {hint}") from None
    return True


def _check_port_free(address: str) -> None:
    """``ConfigError`` when the coordinator's port is taken on this host (process 0 runs
    the coordinator there; JAX's runtime crashes with a segmentation fault when it cannot
    listen)."""
    import errno
    import socket

    port = address.rpartition(":")[2]
    if not port.isdigit():
        return  # a malformed address: JAX's own error names it
    port = int(port)
    ipv6 = socket.has_ipv6  # the coordinator listens on [::]:port, IPv4 included where the host has both
    with socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port left in TIME_WAIT is free
        try:
            if ipv6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind(("::" if ipv6 else "", port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                return  # e.g. no IPv6 on this host: nothing learnt, JAX tries for itself
            from sams_jax.config import ConfigError

            raise ConfigError(f"coordinator address {address!r}: port {port} is in use on this host; process 0 runs "
                              "the coordinator there, so choose a free port (the same for every process: "
                              "train.distributed.coordinator_address)") from None


# may differ between the processes of a run (train.progress: only process 0 shows progress)
PER_PROCESS_FIELDS = ("train.distributed.process_id", "train.distributed.local_device_ids", "train.progress")


def preempted(sync_id: int) -> bool:
    """Whether every process of a multi-process run has reached the point at which to save
    and stop after a preemption notice (SIGTERM to any process: JAX's preemption service,
    on in every run that joined ``jax.distributed``, one process included, catches it and
    the processes agree on the point); ``sync_id`` counts the calls, the same in every
    process. False where the service is not running (no ``jax.distributed``, or
    ``jax_enable_preemption_service`` off)."""
    from jax.experimental import multihost_utils

    if not _preemption_service_running():
        return False
    return multihost_utils.reached_preemption_sync_point(sync_id)


def _preemption_service_running() -> bool:
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client is not None \
        and jax_distributed.global_state.preemption_sync_manager is not None


class PreemptionNotices:
    """Preemption notices (SIGTERM) during training, asked after each dispatch with
    :meth:`received`; :meth:`close` when the training loop ends.

    In a run that joined ``jax.distributed``, JAX's preemption service catches SIGTERM and
    the processes agree on the step (:func:`preempted`). Elsewhere (one process, created in
    the main thread) a Python handler, installed from here to :meth:`close`, records the
    notice, says so on stderr and puts the previous handler back, so that a second SIGTERM
    acts as it would have (by default: the process ends at once). A SIGTERM already ignored
    (``SIG_IGN``) stays ignored."""

    def __init__(self):
        self._notice = False
        self._previous = None
        self._installed = False
        if _preemption_service_running() or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if previous is signal.SIG_IGN:
            return
        self._previous = signal.SIG_DFL if previous is None else previous  # None: not set from Python
        signal.signal(signal.SIGTERM, self._handle)
        self._installed = True

    def _handle(self, signum, frame) -> None:
        self._notice = True
        self.close()
        print("sams_jax: SIGTERM received: saving a checkpoint after the current dispatch, then stopping (a second "
              "SIGTERM stops at once)", file=sys.stderr, flush=True)

    def received(self, sync_id: int) -> bool:
        """Whether to save a checkpoint and stop now; ``sync_id`` counts the calls (the same
        in every process of a multi-process run)."""
        return self._notice or preempted(sync_id)

    def close(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true in any process of the run (every process calls it; one
    process: ``flag`` itself)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def check_same_config(config, workdir: str = "") -> None:
    """``ConfigError`` unless every process of a multi-process run has the same config
    (but for :data:`PER_PROCESS_FIELDS`) and work directory: processes with another seed
    would train on other data and parameters without noticing, other step counts would
    wait for each other forever, and the checkpoints are written together. A no-op for one
    process. Every process calls it (it gathers from all of them)."""
    if jax.process_count() == 1:
        return
    _check_device_counts()  # before the gather below, which needs them equal
    import hashlib
    import json

    from jax.experimental import multihost_utils

    from sams_jax.config import ConfigError, flat_fields

    settings = json.loads(config.to_json_best_effort())
    for field in PER_PROCESS_FIELDS:
        *parents, name = field.split(".")
        node = settings
        for parent in parents:
            node = node.get(parent, {})
        node.pop(name, None)
    settings["workdir"] = os.path.abspath(workdir) if workdir else ""
    fields = {name: json.dumps(value, sort_keys=True) for name, value in flat_fields(settings).items()}
    # {"train.max_steps": "30", ...}, in the config's order (the same in every process whose fields are the same)

    def digest(text: str, size: int) -> np.ndarray:
        return np.frombuffer(hashlib.sha256(text.encode()).digest()[:size], np.uint8)

    summary = np.concatenate([digest(json.dumps(fields, sort_keys=True), 32), digest(" ".join(fields), 32)])
    summaries = np.asarray(multihost_utils.process_allgather(summary))  # [processes, 64]
    differ = [p for p in range(summaries.shape[0]) if not np.array_equal(summaries[p], summaries[0])]
    if not differ:
        return
    named = ""
    if all(np.array_equal(row[32:], summaries[0, 32:]) for row in summaries):  # the same fields: compare each
        per_field = np.stack([digest(value, 8) for value in fields.values()])  # [fields, 8]
        gathered = np.asarray(multihost_utils.process_allgather(per_field))  # [processes, fields, 8]
        names = [name for i, name in enumerate(fields) if (gathered[:, i] != gathered[0, i]).any()]
        mine = ", ".join(f"{name}={fields[name]}" for name in names[:10])
        named = f" in {', '.join(names[:10])}{' ...' if len(names) > 10 else ''} (this process, " \
            f"{jax.process_index()}: {mine})"
    raise ConfigError(f"the processes of this run have different configs: processes {differ} differ from "
                      f"process 0{named or ' (e.g. another --config.seed, --config.train.max_steps or --workdir)'}; "
                      "start every process with the same config, overrides and --workdir (only "
                      "train.distributed.process_id, local_device_ids and train.progress may differ)")


def is_main_process() -> bool:
    """Process 0 writes files and shows progress."""
    return jax.process_index() == 0


def _devices_by_process() -> list[list]:
    by_process: dict[int, list] = {}
    for device in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(device.process_index, []).append(device)
    return [devices for _, devices in sorted(by_process.items())]


def _check_device_counts(rows: list[list] | None = None) -> None:
    """``ConfigError`` unless every process has as many devices (``jax.devices()`` lists
    every process's devices without communication; JAX's cross-process gathers and Orbax's
    checkpoint sync use all of them, so ``train.num_devices`` cannot even them out)."""
    rows = _devices_by_process() if rows is None else rows
    if len({len(row) for row in rows}) != 1:
        from sams_jax.config import ConfigError

        raise ConfigError(f"the processes of this run have different numbers of devices: "
                          f"{[len(row) for row in rows]} (by process); give every process as many devices, e.g. "
                          "with train.distributed.local_device_ids (or CUDA_VISIBLE_DEVICES) per process")


def process_devices(num_devices: int = 0) -> list[list]:
    """The first ``num_devices`` (0 = all) local devices of every process, by process."""
    rows = _devices_by_process()
    _check_device_counts(rows)
    return [devices[: num_devices or None] for devices in rows]


class DataParallel:
    """The global ``("process", "device")`` mesh and placement of state and data."""

    def __init__(self, num_devices: int = 0):
        self.mesh = Mesh(np.asarray(process_devices(num_devices), dtype=object), AXES)
        self.n_processes, self.devices_per_process = self.mesh.devices.shape
        self.process_index = jax.process_index()
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch = NamedSharding(self.mesh, PartitionSpec(None, AXES))  # [n_steps, B] step indices
        self.process_rows = NamedSharding(self.mesh, PartitionSpec("process"))  # each process's own cells

    @property
    def n_devices(self) -> int:
        return self.n_processes * self.devices_per_process

    def replicate(self, tree):
        """Every leaf (equal in every process) replicated on all devices of all processes."""
        def put(leaf):
            if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
                return jax.random.wrap_key_data(put(jax.random.key_data(leaf)), impl=jax.random.key_impl(leaf))
            return jax.make_array_from_process_local_data(self.replicated, np.asarray(leaf))

        return jax.tree.map(put, tree)

    def put_process_rows(self, tree):
        """This process's rows (leaves ``[n_local, ...]``, the same ``n_local`` in every
        process) as global arrays ``[P * n_local, ...]`` sharded by process."""
        return jax.tree.map(lambda leaf: jax.make_array_from_process_local_data(
            self.process_rows, np.asarray(leaf), (self.n_processes * leaf.shape[0], *leaf.shape[1:])), tree)

    def put_batch_indices(self, local_indices: np.ndarray):
        """This process's step indices ``[n_steps, B / P]`` (into its own rows) as the global
        ``[n_steps, B]`` array, split over all devices along the batch axis."""
        n_steps, local_batch = local_indices.shape
        return jax.make_array_from_process_local_data(self.batch, local_indices,
                                                      (n_steps, self.n_processes * local_batch))

    def gather(self, rows, indices):
        """Inside ``jit``: ``rows`` (leaves sharded by process) at ``indices`` ``[B]``
        (sharded over all devices, each pointing into its own process's rows) -> leaves
        ``[B, ...]`` sharded along the batch. Each device gathers locally."""
        spec = PartitionSpec(AXES)
        return jax.shard_map(lambda r, i: jax.tree.map(lambda v: jnp.take(v, i, axis=0), r), mesh=self.mesh,
                             in_specs=(PartitionSpec("process"), spec), out_specs=spec)(rows, indices)

    @staticmethod
    def local(tree):
        """A replicated tree's copy on this process's first device (for per-process work)."""
        return jax.tree.map(lambda leaf: leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf, tree)

    def shards_of_process(self, n_shards: int) -> range:
        """The data shards this process holds (``n_shards`` is a multiple of the process count)."""
        per_process = n_shards // self.n_processes
        return range(self.process_index * per_process, (self.process_index + 1) * per_process)


def shard_rows(n: int, n_shards: int, shards) -> np.ndarray:  # [len(shards) * ceil(n / S)] int64
    """Positions (among ``n`` training cells) of the cells of ``shards`` (shard ``s``:
    positions ``s, s + S, s + 2S, ...``), each shard padded with ``-1`` to ``ceil(n / S)``
    entries, concatenated in order: the rows a process keeps (padding rows are zeros), so
    it reads only its own cells."""
    size = -(-n // n_shards)
    blocks = []
    for shard in shards:
        block = np.arange(shard, n, n_shards, dtype=np.int64)
        blocks.append(np.concatenate([block, np.full(size - len(block), -1, np.int64)]))
    return np.concatenate(blocks)
