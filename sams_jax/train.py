"""Training: ``python -m sams_jax.train --config configs/simulation.py --workdir runs/simulation``.

Each jitted dispatch runs ``train.steps_per_dispatch`` steps in a ``lax.scan``. Where
the training cells live is ``train.data_placement``:

* ``device``: the training split sits (dense) on the devices and each step gathers its
  mini-batch there from host-computed indices; with several processes each holds its own
  shards of the training cells (:mod:`sams_jax.distributed`);
* ``host`` (one process): ``x`` stays on the host as stored (dense, CSR, or rows of an
  ``.h5ad`` file); a background thread densifies each dispatch's mini-batches
  ``[n_steps, B, G]`` from the same indices and puts them on the devices while they run
  the previous dispatch (:mod:`sams_jax.streaming`);
* ``auto`` (default): ``device`` when ``x`` is not backed and the dense training split
  fits in ``sams_jax.streaming.AUTO_DEVICE_MAX_BYTES``, else ``host``.

Both placements run the same step on the same batches (the same losses and parameters).
Mini-batch order and per-step random keys are pure functions of ``(seed, step)``, so a
run that is interrupted and resumed from its latest checkpoint ends with exactly the
parameters of an uninterrupted run.

Every ``train.eval_every`` steps: validation loss (fixed particles, the validation
split's own ``N_t``), a row of ``<workdir>/history.csv``, and a checkpoint (the latest
and the best by validation loss are kept). At the end the best checkpoint is scored:
predictive IWELBO and the training objective's loss (each split with its own ``N_t``) on
the validation and test splits and, for simulations, mask precision / recall / F1;
written to ``<workdir>/metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import sys
import time
import warnings
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pandas as pd
from flax import struct
from jax.sharding import NamedSharding
from tqdm.auto import tqdm

from sams_jax import distributed, metrics as metrics_lib
from sams_jax.checkpoint import Checkpointer
from sams_jax.config import (ConfigError, base_config, flat_fields, unknown_field_message, validate_against_data,
                             validate_config)
from sams_jax.data import DataError, PerturbationData, load_data, metadata_differences, plate_scale
from sams_jax.data import matrix as matrix_lib
from sams_jax.distributed import DataParallel, is_main_process, shard_rows
from sams_jax.models import check_data as check_model_data, create_model, model_fields
from sams_jax.objective import (ObjectiveConfig, check_objective_variables, compiler_options, iwelbo_chunk_size,
                                loss_fn, predictive_iwelbo, split_objective)
from sams_jax.streaming import Prefetcher, host_batches, host_cell_scores, resolve_placement

HISTORY_COLUMNS = ["step", "train_loss", "val_loss", "cells_per_s", "elapsed_s"]
MASK_COLUMNS = ["mask_density", "mask_f1"]  # added for simulations of models with a mask


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; the message names the step and the last good checkpoint."""


class Preempted(RuntimeError):
    """Training stopped on a preemption notice (SIGTERM), after saving a checkpoint at the
    step reached (in a multi-process run: the step every process reached); ``step`` is
    that step."""

    def __init__(self, step: int):
        super().__init__(f"stopped on a preemption notice (SIGTERM) at step {step}, after saving a checkpoint there")
        self.step = step


class ResumeError(ConfigError):
    """The work directory holds a run that this configuration or these data cannot resume
    (other settings, other data, more steps than ``train.max_steps``)."""


class ResumeWarning(UserWarning):
    """A run resumes with other optimisation settings (``train.learning_rate``, ...) than it
    was trained with so far (the message names the fields, old and new values), or a
    finished run continues to a larger ``train.max_steps``."""


@struct.dataclass
class TrainState:
    step: jnp.ndarray  # [] int32, number of completed steps
    params: Any
    opt_state: Any
    normalization: Any  # {"mean": [G], "scale": [G]}, not trained

    @property
    def variables(self):
        return {"params": self.params, "normalization": self.normalization}


def create_optimizer(train_config) -> optax.GradientTransformation:
    """Optional global-norm clipping, PyTorch-style weight decay (L2 added to the
    gradient before Adam, as ``torch.optim.Adam(weight_decay=...)``), then Adam.

    With ``train.mask_learning_rate > 0`` the mask logits (parameters named
    ``mask_logits``) get their own Adam learning rate; every other parameter keeps
    ``train.learning_rate``."""
    parts = []
    if train_config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(train_config.grad_clip_norm))
    if train_config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(train_config.weight_decay))
    mask_learning_rate = train_config.get("mask_learning_rate", 0.0)
    if mask_learning_rate > 0:
        def labels(params):
            return jax.tree_util.tree_map_with_path(
                lambda path, _: "mask" if getattr(path[-1], "key", None) == "mask_logits" else "rest", params)
        parts.append(optax.multi_transform({"mask": optax.adam(mask_learning_rate),
                                            "rest": optax.adam(train_config.learning_rate)}, labels))
    else:
        parts.append(optax.adam(train_config.learning_rate))
    return optax.chain(*parts)


def create_train_state(model, optimizer, normalization_stats: dict, rng) -> TrainState:
    """Initial parameters (shapes come from the model's sizes, not from data values).
    ``model.init`` is jitted: run op by op it compiled each of its operations on its own
    (the default simulation: 9.3 s against 3.7 s on the 2-core CPU; the same values bit
    for bit)."""
    dummy = (jnp.zeros((2, model.n_genes)), jnp.zeros((2, model.n_perturbations)), jnp.ones((2,)))
    param_key, globals_key, local_key = jax.random.split(rng, 3)
    variables = jax.jit(model.init)({"params": param_key, "globals": globals_key, "local": local_key}, *dummy)
    params = variables["params"]
    normalization = jax.tree.map(jnp.asarray, dict(normalization_stats))
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=optimizer.init(params),
                      normalization=normalization)


class BatchSchedule:
    """Mini-batch indices as a pure function of ``(seed, step)``.

    The training cells are read as one stream of epochs, each a fresh permutation seeded
    by ``(seed, epoch)``; step ``s`` takes positions ``[s * B, (s + 1) * B)`` of the
    stream, so every cell is used once per epoch and no batch is ragged.

    With ``n_shards = S > 1`` (several processes, :mod:`sams_jax.distributed`) the
    training cells are split into shards (shard ``k``: positions ``k, k + S, ...``), each
    shard is such a stream of its own (permutations seeded by ``(seed, epoch, S, k)``) and
    step ``s`` concatenates ``B / S`` cells of every shard, in shard order.
    """

    def __init__(self, n_train: int, batch_size: int, seed: int, n_shards: int = 1):
        if batch_size % n_shards:
            raise ValueError(f"batch_size {batch_size} is not a multiple of n_shards {n_shards}")
        self.n_train, self.batch_size, self.seed, self.n_shards = n_train, batch_size, seed, n_shards
        self.shard_sizes = [len(range(k, n_train, n_shards)) for k in range(n_shards)]
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def _permutation(self, shard: int, epoch: int) -> np.ndarray:
        if (shard, epoch) not in self._cache:
            if len(self._cache) > 4 * self.n_shards:
                self._cache.clear()
            key = [self.seed, epoch] if self.n_shards == 1 else [self.seed, epoch, self.n_shards, shard]
            self._cache[shard, epoch] = np.random.default_rng(key).permutation(self.shard_sizes[shard])
        return self._cache[shard, epoch]

    def shard_positions(self, shard: int, start_step: int, n_steps: int) -> np.ndarray:
        """``[n_steps, B / S]`` positions within ``shard`` (row ``i`` of the shard is
        training cell ``shard + i * S``)."""
        per_step = self.batch_size // self.n_shards
        positions = np.arange(start_step * per_step, (start_step + n_steps) * per_step)
        epochs, offsets = np.divmod(positions, self.shard_sizes[shard])
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = self._permutation(shard, int(epoch))[offsets[where]]
        return out.reshape(n_steps, per_step)

    def indices(self, start_step: int, n_steps: int) -> np.ndarray:  # [n_steps, B] int32
        """Indices into the training cells."""
        return np.concatenate([shard + self.n_shards * self.shard_positions(shard, start_step, n_steps)
                               for shard in range(self.n_shards)], axis=1).astype(np.int32)

    def local_indices(self, start_step: int, n_steps: int, shards) -> np.ndarray:  # [n_steps, B * |shards| / S]
        """Indices into the training cells at ``sams_jax.distributed.shard_rows(n_train, S,
        shards)`` (each shard padded to ``ceil(n_train / S)`` rows): a process's part of each
        batch."""
        size = -(-self.n_train // self.n_shards)
        return np.concatenate([j * size + self.shard_positions(shard, start_step, n_steps)
                               for j, shard in enumerate(shards)], axis=1).astype(np.int32)


def _process_cells(data: PerturbationData, n_shards: int, shards) -> dict[str, np.ndarray]:
    """The training cells of this process's ``shards`` (``sams_jax.distributed.shard_rows``),
    densified on the host, padding rows zero: only this process's share is read."""
    positions = shard_rows(int((data.split == "train").sum()), n_shards, shards)
    arrays = data.cell_arrays(data.rows("train")[np.maximum(positions, 0)])
    padding = positions < 0
    if padding.any():
        for value in arrays.values():
            value[padding] = 0
    return arrays


def dispatch_plan(step: int, max_steps: int, eval_every: int, steps_per_dispatch: int):
    """``(first_step, n_steps)`` of each dispatch from ``step`` to ``max_steps``: at most
    ``steps_per_dispatch`` steps, ending at every multiple of ``eval_every``."""
    while step < max_steps:
        next_eval = min((step // eval_every + 1) * eval_every, max_steps)
        n_steps = min(steps_per_dispatch, next_eval - step)
        yield step, n_steps
        step += n_steps


def make_train_step(apply_fn, objective: ObjectiveConfig, optimizer):
    """``(state, batch, plate_scale, train_key) -> (state, loss)``: one optimizer step on
    ``batch`` (``{"x": [B, G], "dosages": [B, T], "library_size": [B]}``), with the random
    key ``fold_in(train_key, state.step)``. The body of both train-chunk variants."""

    def step(state, batch, scale, train_key):
        rng = jax.random.fold_in(train_key, state.step)

        def loss_of(params):
            return loss_fn(apply_fn, objective, {"params": params, "normalization": state.normalization},
                           rng, batch, scale, state.step)

        loss, grads = jax.value_and_grad(loss_of)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
        return state, loss

    return step


def make_train_chunk(apply_fn, objective: ObjectiveConfig, optimizer, gather=None):
    """Jitted ``(state, train_arrays, plate_scale, train_key, indices [n, B]) ->
    (state, losses [n])``: ``n`` steps in one ``lax.scan``, each gathering its batch from
    the device-resident ``train_arrays`` (leaves ``[n_train, ...]``). ``gather(train_arrays,
    indices [B])`` makes a step's batch (default: ``jnp.take`` of every array; with
    several processes :meth:`sams_jax.distributed.DataParallel.gather`)."""
    step = make_train_step(apply_fn, objective, optimizer)
    if gather is None:
        gather = take_rows

    @partial(jax.jit, compiler_options=compiler_options())
    def train_chunk(state, train_arrays, scale, train_key, indices):
        def body(state, batch_indices):
            return step(state, gather(train_arrays, batch_indices), scale, train_key)

        return jax.lax.scan(body, state, indices)

    return train_chunk


def take_rows(arrays, indices):
    return jax.tree.map(lambda v: jnp.take(v, indices, axis=0), arrays)


def make_batch_train_chunk(apply_fn, objective: ObjectiveConfig, optimizer):
    """Jitted ``(state, batches, plate_scale, train_key) -> (state, losses [n])``: ``n``
    steps in one ``lax.scan`` over ready-made ``batches`` (``{"x": [n, B, G], "dosages":
    [n, B, T], "library_size": [n, B]}``, densified on the host)."""
    step = make_train_step(apply_fn, objective, optimizer)

    @partial(jax.jit, compiler_options=compiler_options())
    def train_chunk(state, batches, scale, train_key):
        return jax.lax.scan(partial(step, scale=scale, train_key=train_key), state, batches)

    return train_chunk


def data_parallel_shardings(num_devices: int = 0) -> tuple[NamedSharding, NamedSharding]:
    """``(replicated, batch)`` shardings over the ``("process", "device")`` mesh of the
    first ``num_devices`` local devices (0 = all) of every process: parameters, optimizer
    state and (single process) data are replicated; the step indices ``[n_steps, B]`` are
    split along the batch axis. See :class:`sams_jax.distributed.DataParallel`."""
    parallel = DataParallel(num_devices)
    return parallel.replicated, parallel.batch


# fields that change how data are read, not what is trained: a run may resume with other values
# a moved file: its data are compared with the run's metadata; gene symbols: display names only
STORAGE_FIELDS = {"data": ("backed", "path", "gene_symbols_key")}
# train fields that change the optimisation: a run resumes with new values, with a ResumeWarning (the other
# train and eval fields, e.g. max_steps, eval_every, steps_per_dispatch, num_devices, change silently)
OPTIMISATION_FIELDS = ("learning_rate", "weight_decay", "grad_clip_norm", "mask_learning_rate", "batch_size",
                       "data_shards")
_UNSET = "<unset>"


def config_changes(saved: dict, config) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, current value)`` of every field (``"model.n_latent"``) that
    differs from a saved run, in the current config's order. A field the saved run does
    not have (added in a later version) counts as its default."""
    current = flat_fields(json.loads(config.to_json_best_effort()))
    defaults = flat_fields(json.loads(base_config().to_json_best_effort()))
    saved = flat_fields(saved)
    if not saved.get("objective.initial_variable_weights") and saved.get("objective.weight_anneal_steps"):
        # saved before such configs were refused: an annealing without initial weights did nothing
        saved["objective.weight_anneal_steps"] = 0
    changes = [(field, saved.get(field, defaults.get(field, _UNSET)), value) for field, value in current.items()]
    changes += [(field, value, _UNSET) for field, value in saved.items() if field not in current]
    return [(field, old, new) for field, old, new in changes if old != new]


def _refused(field: str) -> bool:
    """Whether a run may not resume with another value of ``field`` (not train / eval / storage)."""
    section, _, key = field.partition(".")
    return section not in ("train", "eval") and key not in STORAGE_FIELDS.get(section, ())


def _describe(changes) -> str:
    return "; ".join(f"{field}={old!r} in the saved run, {new!r} now" for field, old, new in changes)


def _check_resume(saved: dict, config, workdir: str, latest: int, params,
                  shards: tuple[int | None, int] | None = None) -> None:
    """Refuse to resume a saved run (step ``latest``) with another model, data or
    objective, fewer ``train.max_steps`` than it has, or optimisation settings that change
    the optimizer's state; warn (:class:`ResumeWarning`) when other optimisation settings
    change. ``shards``: the data shards in effect in the saved run (``None`` if it did not
    record them) and now: ``train.data_shards=0`` means one per process, so the batches
    change with the process count, not with the field's value."""
    changes = config_changes(saved, config)
    if saved.get("model", {}).get("name", config.model.name) == config.model.name:  # fields the model ignores
        used = set(model_fields(config.model.name))
        changes = [change for change in changes if not change[0].startswith("model.")
                   or change[0] == "model.name" or change[0].split(".", 1)[1] in used]
    if shards is not None and shards[0] is not None:
        changes = [change for change in changes if change[0] != "train.data_shards"]
        if shards[0] != shards[1]:
            changes.append(("train.data_shards (shards in effect)", shards[0], shards[1]))
    refused = [change for change in changes if _refused(change[0])]
    if refused:
        raise ResumeError(f"{workdir} holds a run with a different configuration ({_describe(refused)}); use a new "
                          "--workdir or the original values")
    max_steps = config.train.max_steps
    if latest > max_steps:
        raise ResumeError(f"{workdir} already holds {latest} training steps, more than train.max_steps={max_steps}; "
                          f"a run cannot be shortened: use a new --workdir for a {max_steps}-step run, or "
                          f"train.max_steps >= {latest} to keep this one (python -m sams_jax.evaluate --workdir "
                          f"{workdir} scores it)")
    fields = {f"train.{field}" for field in OPTIMISATION_FIELDS}
    optimisation = [change for change in changes if change[0].split(" ")[0] in fields]
    if not optimisation:
        return
    saved_train = {**base_config().train.to_dict(), **saved.get("train", {})}
    before = jax.eval_shape(create_optimizer(ml_collections.ConfigDict(saved_train)).init, params)
    now = jax.eval_shape(create_optimizer(config.train).init, params)
    if jax.tree.structure(before) != jax.tree.structure(now):
        raise ResumeError(f"{workdir} cannot resume with other optimizer settings ({_describe(optimisation)}): "
                          "switching weight decay, gradient clipping or the mask learning rate on or off changes "
                          "the optimizer's state; use a new --workdir or the original values")
    if latest < max_steps:  # else nothing is left to train with them
        warnings.warn(f"{workdir} resumes at step {latest} with other optimisation settings "
                      f"({_describe(optimisation)}); the rest of the run uses the new values", ResumeWarning,
                      stacklevel=3)


def _make_workdir(workdir: str) -> None:
    """Create ``workdir`` (and its parents); :class:`ConfigError` where that is impossible
    (a file in the way, no permission), instead of an OS traceback."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"cannot use --workdir {workdir!r} as the run's directory ({reason}: "
                          f"{error.filename or workdir!r}); give a writable directory, new or holding this run") \
            from None


def _progress(train_loss: float, val_loss: float, cells_per_s: float) -> dict[str, str]:
    """The progress bar's figures; "-" for one not measured yet (NaN)."""
    figures = {"loss": f"{train_loss:.3f}", "val": f"{val_loss:.3f}", "cells_s": f"{cells_per_s:,.0f}"}
    values = {"loss": train_loss, "val": val_loss, "cells_s": cells_per_s}
    return {name: text if np.isfinite(values[name]) else "-" for name, text in figures.items()}


def _read_history(path: str, upto_step: int) -> list[dict]:
    if not os.path.exists(path):
        return []
    frame = pd.read_csv(path, float_precision="round_trip")  # rows rewritten on resume keep their digits
    return frame[frame["step"] <= upto_step].to_dict("records")


def train_and_evaluate(config, workdir: str, data: PerturbationData | None = None) -> dict[str, float]:
    """Train (or resume) the configured model in ``workdir`` and return final metrics.

    ``data`` may be given directly (Python API); otherwise it is built from
    ``config.data``. All input checks run before anything is compiled or written.

    Several processes: every process calls this with the same config after
    :func:`sams_jax.distributed.initialize` (the CLI does); each keeps its own shards of
    the training cells on its devices, and only process 0 writes ``history.csv`` and
    ``metrics.json`` (checkpoints are written together, by Orbax). Every process
    returns the same metrics. A preemption notice (SIGTERM; in a multi-process run, to any
    process) during training saves a checkpoint at the step reached (one every process
    agrees on) and raises :class:`Preempted`; called in the main thread of a process
    outside ``jax.distributed``, this installs a SIGTERM handler for the training loop's
    duration (see :class:`sams_jax.distributed.PreemptionNotices`).
    """
    distributed.check_same_config(config, workdir)  # first: every process reaches it, whatever its config
    validate_config(config)
    main_process = is_main_process()
    _refuse_busy_workdir(workdir, main_process)  # before reading the data, which may take long
    data_source = "config" if data is None else "python"  # python: config.data does not describe the data
    if data is None:
        data = load_data(config.data, config.model.likelihood)
    data.validate(config.model.likelihood)
    if not np.any(data.split == "val"):
        source = f"obs[{config.data.split_key!r}] has no 'val' values" if config.data.get("split_key") \
            else "the data have no validation cells (split == 'val')"
        raise DataError(f"{source}: training scores the validation cells every train.eval_every steps to pick the "
                        "best checkpoint; label some cells 'val' (e.g. a random 20% of the training cells), or "
                        "leave the split to the task or a random split (--config.data.split_key='')")
    validate_against_data(config, data)
    distributed.process_devices(config.train.num_devices)  # the same number of devices in every process
    check_model_data(config.model.name, data)  # e.g. SVAE+ accepts one-hot dosages only
    objective = ObjectiveConfig.from_config(config.objective)

    model = create_model(config.model, data.n_genes, data.n_perturbations)
    optimizer = create_optimizer(config.train)
    stats = data.normalization_stats(config.model.normalization)
    metadata = {**data.metadata(config.model.normalization, stats), "data_source": data_source}
    config_dict = json.loads(config.to_json_best_effort())
    if data_source == "config" and config.data.get("path"):  # evaluation may run from another directory
        config_dict["data"]["path"] = os.path.abspath(config.data.path)
    init_key, train_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)
    state = create_train_state(model, optimizer, stats, init_key)
    try:
        check_objective_variables(model.apply, state.variables, data.cell_arrays(data.rows("train")[:1]), objective)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    with _claim_workdir(workdir, main_process):  # one run at a time in a work directory
        # data parallelism over every device of every process (sams_jax.distributed):
        # parameters, optimizer state and keys replicated; each step's batch split across all
        # devices (device placement: the training cells split into shards, each process holding its own)
        parallel = DataParallel(config.train.num_devices)
        n_shards = config.train.data_shards or parallel.n_processes
        metadata["data_shards"] = n_shards  # in effect: decides the batches, recorded for resuming
        state = parallel.replicate(state)
        train_key = parallel.replicate(train_key)

        checkpointer = Checkpointer(workdir)
        history_path = os.path.join(workdir, "history.csv")
        history: list[dict] = []
        latest = checkpointer.latest_step()
        if latest is not None:
            saved_config, saved_metadata = checkpointer.restore_json(latest)
            try:
                _check_resume(saved_config, config, workdir, latest, state.params,
                              shards=(saved_metadata.get("data_shards"), n_shards))
                differ = metadata_differences(saved_metadata, metadata)
                if differ:
                    raise ResumeError(f"{workdir} holds a run trained on other data ({'; '.join(differ)} differ from "
                                      "the checkpoint's metadata); use a new --workdir or the original data")
            except ConfigError:
                checkpointer.close()
                raise
            finished_at = saved_config.get("train", {}).get("max_steps")
            if main_process and finished_at is not None and finished_at <= latest < config.train.max_steps:
                warnings.warn(f"{workdir} holds a finished run of {latest:,} steps: continuing it to "
                              f"train.max_steps={config.train.max_steps:,} (--config.train.max_steps={latest} "
                              "evaluates it again without training)", ResumeWarning, stacklevel=2)
            state = checkpointer.restore_state(latest, state)
            history = _read_history(history_path, latest)

        train_scale = parallel.replicate(plate_scale(data.cells_per_perturbation("train")))
        # validation (and the final test loss): every process on its first device, on the whole split, with
        # the split's own N_t (SPEC 3)
        def split_scale(split):
            return jnp.asarray(plate_scale(data.cells_per_perturbation(split)))

        chunk_size = config.train.eval_batch_size
        schedule = BatchSchedule(int((data.split == "train").sum()), config.train.batch_size, config.seed, n_shards)
        max_steps, eval_every = config.train.max_steps, config.train.eval_every
        step = int(state.step)
        plan = partial(dispatch_plan, max_steps=max_steps, eval_every=eval_every,
                       steps_per_dispatch=config.train.steps_per_dispatch)

        placement = resolve_placement(config.train.data_placement, data)
        where = f"{parallel.devices_per_process} {jax.default_backend()} device" \
            f"{'s' if parallel.devices_per_process > 1 else ''}" \
            f"{f' x {parallel.n_processes} processes' if parallel.n_processes > 1 else ''}, data on the {placement}"
        # a progress bar on a terminal; piped to a file (a batch job's log), one line per evaluation instead
        interactive = sys.stderr.isatty() or "ipykernel" in sys.modules  # a terminal, or a notebook's widget
        show_bar = bool(config.train.progress and main_process and interactive)
        log_lines = bool(config.train.progress and main_process and not show_bar)
        bar = tqdm(total=max_steps, initial=step, desc=f"train ({where})", unit="step", disable=not show_bar,
                   dynamic_ncols=True)
        if log_lines:
            print(f"train ({where}): from step {step:,} to {max_steps:,}", file=sys.stderr, flush=True)
        if placement == "device":
            shards = parallel.shards_of_process(n_shards)
            train_arrays = parallel.put_process_rows(_process_cells(data, n_shards, shards))
            split_arrays = {"val": jax.device_put(data.arrays("val"))}  # the test split's when first needed
            train_chunk = make_train_chunk(model.apply, objective, optimizer, parallel.gather)
            prefetcher = None

            def run_dispatch(state, first_step, n_steps):
                indices = parallel.put_batch_indices(schedule.local_indices(first_step, n_steps, shards))
                return train_chunk(state, train_arrays, train_scale, train_key, indices)

            @partial(jax.jit, compiler_options=compiler_options())
            def validation_loss_fn(variables, arrays, scale):
                return -split_objective(model.apply, objective, variables, eval_key, arrays, scale, chunk_size).mean()

            def split_loss(variables, split="val"):
                if split not in split_arrays:
                    split_arrays[split] = jax.device_put(data.arrays(split))
                return validation_loss_fn(parallel.local(variables), split_arrays[split], split_scale(split))
        else:  # one process only (validate_against_data): the same global batches, densified on the host
            train_chunk = make_batch_train_chunk(model.apply, objective, optimizer)
            train_cells = data.rows("train")

            def produce(dispatch):  # runs in the prefetch thread
                first_step, n_steps = dispatch
                batches = host_batches(data, train_cells, schedule.indices(first_step, n_steps))
                return jax.device_put(batches, parallel.batch)

            prefetcher = Prefetcher(produce, plan(step), depth=config.train.prefetch)

            def run_dispatch(state, first_step, n_steps):
                dispatch, batches = prefetcher.get()
                assert dispatch == (first_step, n_steps), (dispatch, first_step, n_steps)
                return train_chunk(state, batches, train_scale, train_key)

            @partial(jax.jit, compiler_options=compiler_options())
            def validation_block(variables, scale, arrays, first_chunk):
                return split_objective(model.apply, objective, variables, eval_key, arrays, scale, chunk_size,
                                       first_chunk)

            def split_loss(variables, split="val"):
                scores = host_cell_scores(partial(validation_block, parallel.local(variables), split_scale(split)),
                                          data, data.rows(split), chunk_size, put=jax.device_put)
                return -scores.mean()

        def last_good_checkpoint() -> str:
            latest = checkpointer.latest_step()
            if latest is None:
                return f"no checkpoint was written (the first would have been at step {min(eval_every, max_steps)})"
            return f"the last good checkpoint is step {latest} in {checkpointer.directory}"

        # cells_per_s: training cells per second of the window's dispatches, leaving out each dispatch that
        # compiled (the first of each number of steps in this call); NaN when every dispatch of the window did
        window_losses: list[np.ndarray] = []
        window_seconds, window_cells, compiled_sizes = 0.0, 0, set()
        run_start = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0)  # resumed: the time so far
        last_val = history[-1]["val_loss"] if history else float("nan")
        interrupted = False
        notices = distributed.PreemptionNotices()  # SIGTERM: a checkpoint, then Preempted
        try:
            for dispatch, (_, n_steps) in enumerate(plan(step)):
                dispatch_start = time.perf_counter()
                new_state, losses = run_dispatch(state, step, n_steps)
                losses = np.asarray(losses)
                if not np.all(np.isfinite(losses)):
                    bad = step + int(np.argmax(~np.isfinite(losses)))
                    raise TrainingDiverged(f"non-finite training loss at step {bad}; {last_good_checkpoint()}. Try a "
                                           "lower train.learning_rate or set train.grad_clip_norm")
                if n_steps in compiled_sizes:
                    window_seconds += time.perf_counter() - dispatch_start
                    window_cells += n_steps * config.train.batch_size
                compiled_sizes.add(n_steps)
                state, step = new_state, step + n_steps
                window_losses.append(losses)
                bar.update(n_steps)
                cells_per_s = window_cells / max(window_seconds, 1e-9) if window_cells else float("nan")
                train_loss = float(np.concatenate(window_losses).mean())
                bar.set_postfix(_progress(train_loss, last_val, cells_per_s))
                if step % eval_every == 0 or step == max_steps:
                    last_val = float(split_loss(state.variables))
                    if not np.isfinite(last_val):
                        raise TrainingDiverged(f"non-finite validation loss at step {step}; {last_good_checkpoint()}")
                    history.append({"step": step, "train_loss": train_loss, "val_loss": last_val,
                                    "cells_per_s": cells_per_s, "elapsed_s": time.perf_counter() - run_start,
                                    **mask_recovery(model, data, parallel.local(state.variables))})
                    checkpointer.save(step, state, last_val, config_dict, metadata)
                    if main_process:
                        columns = HISTORY_COLUMNS + [c for c in MASK_COLUMNS if c in history[-1]]
                        pd.DataFrame(history, columns=columns).to_csv(history_path, index=False)
                    bar.set_postfix(_progress(train_loss, last_val, cells_per_s))
                    if log_lines:
                        figures = _progress(train_loss, last_val, cells_per_s)
                        print(f"step {step:,}/{max_steps:,}: train loss {figures['loss']}, val loss {figures['val']}, "
                              f"{figures['cells_s']} cells/s", file=sys.stderr, flush=True)
                    window_losses, window_seconds, window_cells = [], 0.0, 0
                if notices.received(dispatch):
                    if checkpointer.latest_step() != step:  # to resume from; never the best (no validation
                        # here: the best stays an evaluation step's, as in an uninterrupted run)
                        checkpointer.save(step, state, float("inf"), config_dict, metadata)
                    raise Preempted(step)
            notices.close()  # from here on SIGTERM acts as it would have (every checkpoint is saved)
            bar.close()
            if checkpointer.latest_step() is None:  # max_steps == 0: keep the initial state
                checkpointer.save(step, state, float(split_loss(state.variables)), config_dict, metadata)

            best = checkpointer.best_step()
            best_state = checkpointer.restore_state(best, state)
            results = final_metrics(model, config, data, parallel.local(best_state.variables),
                                    jax.random.key(config.seed))
            for split in ("val", "test"):  # the training objective's loss, each split with its own N_t (SPEC 3)
                if data.mask(split).any():
                    results[f"{split}/loss"] = float(split_loss(best_state.variables, split))
            results["best_step"] = int(best)
            results["steps"] = int(step)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            notices.close()
            if prefetcher is not None:
                prefetcher.close()
            bar.close()
            if not (interrupted and jax.process_count() > 1):  # closing would wait for the other processes
                checkpointer.close()
        if main_process:
            metrics_lib.write_json(os.path.join(workdir, "metrics.json"), results)
        return results


def mask_recovery(model, data: PerturbationData, variables, full: bool = False) -> dict[str, float]:
    """For simulations of models with a mask: learned mask (``q(mask) > 0.5``) density and
    F1 against the truth (precision and recall too with ``full``); else ``{}``."""
    if data.truth is None or "mask" not in data.truth or not hasattr(model, "mask_probs"):
        return {}
    learned = np.asarray(model.apply(variables, method="mask_probs")) > 0.5
    scores = metrics_lib.mask_scores(data.truth["mask"], learned)
    if not full:
        scores = {"mask_f1": scores["mask_f1"]}
    return {**scores, "mask_density": float(learned.mean())}


def final_metrics(model, config, data: PerturbationData, variables, rng) -> dict[str, float]:
    """Predictive IWELBO per held-out split and, for simulations, mask recovery. With
    ``rng = jax.random.key(config.seed)`` the IWELBO equals ``sams_jax.load(workdir)
    .iwelbo(split, n_particles, seed=config.seed)``: cells are scored in chunks of
    :func:`~sams_jax.objective.iwelbo_chunk_size` (``n_particles`` x cells x genes
    intermediates of bounded size), not of ``train.eval_batch_size``."""
    n_particles = config.eval.iwelbo_n_particles
    chunk_size = iwelbo_chunk_size(n_particles, data.n_genes)
    results: dict[str, float] = {}

    @partial(jax.jit, compiler_options=compiler_options())
    def iwelbo(variables, arrays):
        return predictive_iwelbo(model.apply, variables, rng, arrays, n_particles, chunk_size).mean()

    @partial(jax.jit, compiler_options=compiler_options())
    def iwelbo_block(variables, arrays, first_chunk):
        return predictive_iwelbo(model.apply, variables, rng, arrays, n_particles, chunk_size, first_chunk)

    for split in ("val", "test"):
        if not data.mask(split).any():
            continue
        if matrix_lib.is_dense(data.x):
            results[f"{split}/IWELBO"] = float(iwelbo(variables, jax.device_put(data.arrays(split))))
        else:  # sparse or backed x: blocks of cells, never the whole split densified
            scores = host_cell_scores(partial(iwelbo_block, variables), data, data.rows(split), chunk_size,
                                      put=jax.device_put)
            results[f"{split}/IWELBO"] = float(scores.mean())
    results.update(mask_recovery(model, data, variables, full=True))
    return results


LOCK_FILE = ".sams_jax.lock"  # in the work directory, while a run trains there


@contextlib.contextmanager
def _claim_workdir(workdir: str, main_process: bool = True):
    """Create ``workdir`` (:func:`_make_workdir`) and hold an exclusive lock on it
    (``LOCK_FILE``, ``fcntl.flock``) while the run trains: a second run started in the same
    directory would write the same checkpoints and files, so it is a :class:`ConfigError`
    naming the process that holds it. The main process creates and locks; every process of
    a multi-process run learns the outcome, so all of them stop together. Where locks are
    unsupported (no ``fcntl``, some network file systems) nothing is locked."""
    handle, refusal = None, None
    if main_process:
        try:
            _make_workdir(workdir)
            handle = _lock(workdir)
        except ConfigError as error:
            refusal = str(error)
    try:
        _refuse_in_every_process(refusal, workdir)
    except ConfigError:
        if handle is not None:
            _unlock(handle)
        raise
    try:
        yield
    finally:
        if handle is not None:
            _unlock(handle)


def _refuse_busy_workdir(workdir: str, main_process: bool = True) -> None:
    """:class:`ConfigError` when another run holds an existing ``workdir``'s lock, checked
    early (the lock itself is taken by :func:`_claim_workdir` once the inputs pass their
    checks, so that a refused run writes nothing). Every process calls it."""
    refusal = None
    if main_process and os.path.isfile(os.path.join(workdir, LOCK_FILE)):  # else no run holds it
        try:
            handle = _lock(workdir)
        except ConfigError as error:
            refusal = str(error)
        except OSError:  # left to _claim_workdir, whose error says what is wrong with the directory
            handle = None
        else:
            if handle is not None:
                _unlock(handle)
    _refuse_in_every_process(refusal, workdir)


def _refuse_in_every_process(refusal: str | None, workdir: str) -> None:
    """:class:`ConfigError` in every process when the main process refused ``workdir``
    (``refusal``: its reason; None elsewhere). Every process calls it (a collective)."""
    if distributed.any_process(refusal is not None):
        raise ConfigError(refusal or f"the main process could not use --workdir {workdir!r} (its error says why)")


def _lock(workdir: str):
    """The open, locked ``LOCK_FILE`` of ``workdir`` (None where locks are unsupported);
    :class:`ConfigError` when another run holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    handle = open(os.path.join(workdir, LOCK_FILE), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"--workdir {workdir!r} is in use by another run ({holder}); two runs in one work "
                          "directory would overwrite each other's checkpoints: wait for it to finish, or use "
                          "another --workdir") from None
    except OSError:  # the file system does not lock: run unlocked
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {platform.node()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    return handle


def _unlock(handle) -> None:
    import fcntl

    handle.seek(0)
    handle.truncate()
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def _saved_steps(workdir: str) -> list[int]:
    """The steps of the finished checkpoints in ``workdir`` (their folders, named by the
    step once Orbax has finished writing them; read without Orbax, which would synchronise
    the processes of a multi-process run)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def main(argv) -> None:
    from absl import flags, logging

    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO
    warnings.formatwarning = cli_format_warning
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir
    try:
        validate_config(config)
        distributed.initialize(config)  # several processes: join them before any JAX computation
        results = train_and_evaluate(config, workdir)
    except (ConfigError, DataError, TrainingDiverged, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Preempted as error:
        print(f"{error}; run the same command again to resume from it", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM, as a process ended by the signal
    except KeyboardInterrupt:
        saved = _saved_steps(workdir)
        kept = f"its checkpoints (last: step {saved[-1]}) are kept" if saved else "no checkpoint had been written"
        several = jax.distributed.is_initialized() and jax.process_count() > 1
        others = "; the other processes of this run stop when JAX notices this one is gone (its heartbeat, " \
            "about a minute), or interrupt them too" if several else ""
        print(f"\ninterrupted: {kept}; run the same command again to resume from the last checkpoint (the resumed "
              f"run ends with the same parameters as an uninterrupted one){others}", file=sys.stderr, flush=True)
        if several:  # exit without the collective clean-up, which would wait for the others
            sys.stdout.flush()
            os._exit(130)
        sys.exit(130)
    if distributed.is_main_process():
        print(json.dumps(metrics_lib.json_safe(results), indent=2, sort_keys=True))


_default_format_warning = warnings.formatwarning
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def cli_format_warning(message, category, filename, lineno, line=None) -> str:
    """The command lines' warnings (training, evaluation): ``warning: <message>`` for those sams_jax raises (e.g.
    :class:`ResumeWarning`, ``DataWarning``), Python's format for the others."""
    if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(_PACKAGE_DIR):
        return f"warning: {message}\n"
    return _default_format_warning(message, category, filename, lineno, line)


def _config_path(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return None


def _parse_flags(argv):
    """absl flag parsing with clean errors (no traceback, exit code 2): a config file that
    cannot be loaded, or an unknown / mistyped ``--config.<field>`` (named, with the closest
    known field or else the known fields beside it: :func:`unknown_field_message`)."""
    import importlib.util

    from absl import flags

    try:
        remaining = flags.FLAGS(argv)
        flags.FLAGS.config.keys()  # raises if the config file failed to load
        return remaining
    except flags.Error as error:
        if "Error whilst parsing config file" in str(error) and error.__context__ is not None:
            print(f"error: {_config_file_failure(error.__context__, _config_path(argv))}", file=sys.stderr)
        else:
            print(f"error: {error}", file=sys.stderr)
    except OSError as error:
        print(f"error: {str(error).splitlines()[0]}: {_config_path(argv)!r} (a path to a configs/*.py file)",
              file=sys.stderr)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        overrides = [arg.split("=", 1)[0][len("--config."):] for arg in argv if arg.startswith("--config.")]
        try:
            spec = importlib.util.spec_from_file_location("user_config", _config_path(argv))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            config = module.get_config()
        except Exception as file_error:  # the config file itself failed, not an override
            print(f"error: {_config_file_failure(file_error, _config_path(argv))}", file=sys.stderr)
            sys.exit(2)
        message = next(filter(None, (unknown_field_message(config, o) for o in overrides)), None)
        if message is None:  # not an unknown field: ml_collections' message, on one line
            text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
            message = f"bad --config override: {'; '.join(filter(None, text.splitlines()))}"
        print(f"error: {message}", file=sys.stderr)
    except Exception as error:  # the config file itself failed: a syntax error, a failing import, get_config
        print(f"error: {_config_file_failure(error, _config_path(argv))}", file=sys.stderr)
    sys.exit(2)


def _config_file_failure(error: BaseException, path: str | None) -> str:
    """One line for a config file that raised while loading: the error and where in the file."""
    import traceback

    text = None  # ml_collections' unknown-field errors: a KeyError (maybe inside an AttributeError) with newlines
    inner = error.args[0] if isinstance(error, AttributeError) and error.args else error
    if isinstance(inner, KeyError) and inner.args and isinstance(inner.args[0], str):
        text = inner.args[0].replace("'", "")
    what = f"{type(error).__name__}: {'; '.join(text.strip(chr(39)).splitlines())}" if text is not None else \
        "".join(traceback.format_exception_only(type(error), error)).strip().splitlines()[-1]
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if path and os.path.abspath(frame.filename) == os.path.abspath(path)]
    # ml_collections re-raises a config file's error with the formatted traceback as its message
    lines += [int(line) for file, line in re.findall(r'File "([^"]+)", line (\d+)', str(error))
              if path and os.path.abspath(file) == os.path.abspath(path)]
    if isinstance(error, SyntaxError) and error.lineno:
        lines.append(error.lineno)
    where = f", line {lines[-1]}" if lines else ""
    return f"the config file {path!r} failed to load ({what}{where}); it must define get_config() returning an " \
        "ml_collections.ConfigDict, as configs/*.py do"


def cli() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py); override any of its fields with "
                                    "--config.<field>=<value>, e.g. --config.train.max_steps=5000 (every field and "
                                    "its default: sams_jax.config.base_config).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, history.csv and metrics.json.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    cli()
