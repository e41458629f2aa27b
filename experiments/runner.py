"""Shared machinery of the paper's experiments: grid definition, local runner, aggregation, plots.

An experiment (``experiments/<name>/run.py``) builds a :class:`Grid`: model variants x
seeds x (optionally) fractions of some data field. Every cell of the grid is one training
run followed by its evaluation, executed in its own Python process (one JAX process per
run) by :func:`run_grid`; :func:`aggregate` then writes the experiment's table.

Output layout (``--out DIR``)::

    DIR/runs/<cell>/          the run's --workdir: checkpoints/, history.csv, metrics.json, eval/
    DIR/runs/<cell>/cell.json what to run: experiment, variant, seed, fraction, config, evaluation options
    DIR/runs/<cell>/log.txt   stdout and stderr of the run's process
    DIR/runs/<cell>/done.json written last: the cell's metrics; a cell with done.json recording
                              the same config and evaluation options is skipped on the next call
    DIR/runs.csv              one row per finished cell (metrics and relative IWELBO)
    DIR/table.csv, table.md   mean and std over seeds per (variant, fraction)
    DIR/relative_iwelbo.png, DIR/ate_pearson.png
    DIR/failures.txt          the cells that failed in the last call, with their logs

An interrupted cell resumes from its latest checkpoint (``sams_jax.train`` resumes runs).

The command line shared by every experiment (:func:`main`)::

    python experiments/<name>/run.py [--data PATH] [--smoke] [--workers N] [--out DIR]
        [--models a,b] [--seeds 0,1] [--fractions 0,0.5] [--set train.max_steps=1000 ...]
        [--list] [--aggregate-only]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import pathlib
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Metric columns of every table: (key in <workdir>/eval/metrics.json, column name).
# Test-split metrics: for Norman OOD / data efficiency the test split holds the held-out
# pairs only, as in the paper's tables.
STANDARD_METRICS = (
    ("IWELBO-test", "test_IWELBO"),
    ("ATE_pearsonr-test", "ATE_pearson"),
    ("ATE_pearsonr_top20-test", "ATE_pearson_top20"),
)
RELATIVE = "relative_IWELBO"  # test IWELBO minus the reference run's on the same seed

# Tiny networks and a short schedule: the whole pipeline in minutes on a 2-core CPU.
SMOKE_OVERRIDES = {
    "model.n_latent": 4,
    "model.decoder_n_hidden": 16,
    "model.basal_encoder_n_hidden": 16,
    "model.embedding_encoder_n_layers": 1,
    "model.embedding_encoder_n_hidden": 16,
    "objective.n_particles": 2,
    "train.batch_size": 32,
    "train.max_steps": 50,
    "train.eval_every": 25,
    "train.steps_per_dispatch": 25,
    "train.eval_batch_size": 256,
    "eval.iwelbo_n_particles": 8,
}


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Options of ``sams_jax.evaluate.evaluate`` for every cell (paper: 100 / 2,500 particles)."""

    iwelbo_particles: int = 100
    ate_particles: int = 2_500
    ate_method: str = "paper"
    ate_metrics_over: str = "observed"  # sams_jax.evaluate.ATE_METRICS_OVER
    plots: bool = True
    seed: int = 0


EVALUATION_COLUMNS = ("iwelbo_particles", "ate_particles", "ate_method", "ate_metrics_over")  # runs.csv


def recorded_evaluation(done: Mapping[str, Any], directory: pathlib.Path) -> dict:
    """The evaluation options of the ``done.json`` of the cell in ``directory``. A run
    evaluated before ``ate_metrics_over`` existed had its ATE metrics over the learned
    interventions only: where its ``eval/ate.h5ad`` has an observed intervention that was
    not learned it counts as ``"learned"`` (so the default evaluates it again), else as
    ``"observed"`` (the same metrics: nothing to redo)."""
    recorded = dict(done.get("evaluation") or {})
    if "ate_metrics_over" not in recorded:
        recorded["ate_metrics_over"] = "learned" if _has_unlearned_observed(directory / "eval" / "ate.h5ad") \
            else "observed"
    return recorded


def _has_unlearned_observed(path: pathlib.Path) -> bool:
    """Whether the ``ate.h5ad`` at ``path`` has an observed intervention whose ``learned``
    is False (False without the file or the columns)."""
    if not path.is_file():
        return False
    import h5py
    from anndata.io import read_elem

    try:
        with h5py.File(path, "r") as handle:
            obs = read_elem(handle["obs"])
    except (OSError, KeyError):
        return False
    if not {"observed", "learned"} <= set(obs.columns):
        return False
    return bool((obs["observed"].astype(bool) & ~obs["learned"].astype(bool)).any())


SMOKE_EVALUATION = Evaluation(iwelbo_particles=8, ate_particles=32, plots=False)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A row label of the table: a config file of ``configs/`` plus field overrides.

    ``config`` names ``configs/<config>.py``; ``overrides`` maps dotted config fields
    (``"model.guide"``) to values.
    """

    name: str
    config: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the grid. ``fraction`` is None for grids without a fraction axis."""

    experiment: str
    variant: str
    seed: int
    fraction: float | None
    config: dict  # the full config (ConfigDict.to_dict()), JSON-serialisable
    evaluation: Evaluation

    @property
    def id(self) -> str:
        frac = "" if self.fraction is None else f"-f{self.fraction:g}"
        return f"{self.variant}{frac}-s{self.seed}"

    def spec(self) -> dict:
        """What ``cell.json`` / ``done.json`` record; equal specs mean the same run."""
        return {"experiment": self.experiment, "variant": self.variant, "seed": self.seed,
                "fraction": self.fraction, "config": self.config,
                "evaluation": dataclasses.asdict(self.evaluation)}


@dataclasses.dataclass(frozen=True)
class Grid:
    """Variants x seeds x fractions of one experiment.

    Each seed is written to every field of ``seed_fields`` (e.g. ``("seed",
    "data.split_seed")``) and each fraction to ``fraction_field`` (e.g.
    ``"data.frac_combinations_train"``). ``overrides`` apply to every cell (the data path,
    the smoke settings) before the variant's own, so a variant keeps what defines it (the
    K = 200 variant stays K = 200 in a smoke run); ``settings`` (the command line's
    ``--set``, which may not name a field a variant, the seeds or the fractions set) after
    them. The relative IWELBO of a run is its test IWELBO minus that of ``reference`` at
    the grid's smallest fraction on the same seed.
    ``memory_gb`` is the per-run host memory estimate that sizes the default number of
    parallel workers.
    """

    name: str
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    seed_fields: tuple[str, ...] = ("seed",)
    fractions: tuple[float, ...] = ()
    fraction_field: str | None = None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reference: str = "sams_vae"
    metrics: tuple[tuple[str, str], ...] = STANDARD_METRICS
    evaluation: Evaluation = Evaluation()
    memory_gb: float = 2.0

    def __post_init__(self):
        if bool(self.fractions) != bool(self.fraction_field):
            raise ValueError("a grid has both fractions and fraction_field, or neither")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate variant names in {names}")

    def subset(self, models: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
               fractions: Sequence[float] | None = None) -> Grid:
        """The grid restricted to some variants, seeds or fractions (unknown values are an error)."""
        variants = self.variants
        if models:
            known = {v.name: v for v in self.variants}
            unknown = [m for m in models if m not in known]
            if unknown:
                raise ValueError(f"unknown model(s) {unknown}; this grid has {sorted(known)}")
            variants = tuple(known[m] for m in models)
        if fractions and not self.fractions:
            raise ValueError(f"the {self.name} grid has no fraction axis")
        return dataclasses.replace(self, variants=variants, seeds=tuple(seeds) if seeds else self.seeds,
                                   fractions=tuple(fractions) if fractions else self.fractions)

    def check_settings(self, settings: Mapping[str, Any]) -> None:
        """``ValueError`` for ``--set`` fields that the grid sets itself: the seeds, the
        fractions, or a field one of its variants is defined by."""
        configs = {v.name: _variant_config(v) for v in self.variants} if settings else {}
        for field in settings:
            if field in self.seed_fields:
                raise ValueError(f"--set {field}: the grid sets it from each cell's seed; use --seeds")
            if field == self.fraction_field:
                raise ValueError(f"--set {field}: the grid sets it from each cell's fraction; use --fractions")
            values = {name: _field(config, field) for name, config in configs.items()}
            if field == "model.name" and any(value != settings[field] for value in values.values()):
                raise ValueError(f"--set model.name: the models' names define them ({values}); choose models with "
                                 "--models")
            defining = [v.name for v in self.variants if field in v.overrides]
            if defining or len({json.dumps(value, sort_keys=True, default=str) for value in values.values()}) > 1:
                raise ValueError(f"--set {field}: the models differ in it ({values}), it defines them; leave those "
                                 "you do not want to change out with --models")

    def cells(self) -> list[Cell]:
        """Every cell: seeds outermost (each seed's table is complete early, and parallel
        workers start runs of different shapes, so a seed's runs reuse the compilations of
        the previous seed's through the persistent cache), then variants, then fractions."""
        cells = []
        for seed in self.seeds:
            for variant in self.variants:
                for fraction in self.fractions or (None,):
                    config = load_config(variant.config)
                    set_fields(config, self.overrides)
                    set_fields(config, variant.overrides)
                    # the user's settings, but not a field that defines this variant (a run of other models
                    # may have set it: their tables still gather this variant's own runs)
                    set_fields(config, {k: v for k, v in self.settings.items() if k not in variant.overrides})
                    set_fields(config, {field: seed for field in self.seed_fields})
                    if fraction is not None:
                        set_fields(config, {self.fraction_field: float(fraction)})
                    config.train.progress = False  # no tqdm bar in the log files
                    cells.append(Cell(self.name, variant.name, seed, fraction, config.to_dict(), self.evaluation))
        return cells


# ----------------------------------------------------------------------------- configs


def _variant_config(variant: Variant):
    """A variant's config file with its own overrides (no grid settings)."""
    config = load_config(variant.config)
    set_fields(config, variant.overrides)
    return config


def _field(config, dotted: str):
    """A dotted field's value (``None`` for an unknown field: :func:`set_fields` names it)."""
    node = config
    for key in dotted.split("."):
        try:
            node = node[key]
        except (KeyError, TypeError):
            return None
    return node.to_dict() if hasattr(node, "to_dict") else node


def load_config(name: str):
    """``configs/<name>.py``'s ``get_config()``, loaded without absl flags."""
    path = CONFIGS / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.py"))
        raise FileNotFoundError(f"no config {path}; known configs: {known}")
    return runpy.run_path(str(path))["get_config"]()


def set_fields(config, overrides: Mapping[str, Any]) -> None:
    """Set dotted fields (``"train.max_steps"``) of a ConfigDict; an unknown field (named
    with the closest known one, as the training command does) or a value of the wrong type
    is a ``ValueError``."""
    from sams_jax.train import unknown_field_message

    for dotted, value in overrides.items():
        message = unknown_field_message(config, dotted, flag="--set ")
        if message:
            raise ValueError(message)
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node[key]
        try:
            node[leaf] = value
        except TypeError:
            current = node[leaf]
            raise ValueError(f"--set {dotted}={value!r}: the field is of type {type(current).__name__} (its "
                             f"value here {current!r}); give a value of that type") from None


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"train.max_steps=1000"`` -> ``("train.max_steps", 1000)`` (Python literals, else a string)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


# ------------------------------------------------------------------------------ runner


def available_memory_gb() -> float:
    """Host memory available to new processes (``MemAvailable``), in GiB."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


def usable_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def default_workers(memory_gb: float) -> int:
    """As many parallel runs as there are cores and memory for: ``min(cores, available / memory_gb)``."""
    by_memory = int(available_memory_gb() // max(memory_gb, 1e-3))
    return max(1, min(len(usable_cores()), by_memory))


def cell_dir(out: pathlib.Path, cell: Cell) -> pathlib.Path:
    return out / "runs" / cell.id


def _runner_message(error: Exception) -> str:
    """An error's message for this command line: a ``KeyError``'s without the quotes
    ``str`` adds, and the training command's ``--config.FIELD=VALUE`` hints as the runner's
    ``--set FIELD=VALUE``."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return re.sub(r"--config\.([\w.]+)=", r"--set \1=", str(message))


def is_done(out: pathlib.Path, cell: Cell, evaluation: bool = True, config: bool = True) -> bool:
    """True when the cell's ``done.json`` records this very run: the same config (unless
    ``config=False``: the tables, which gather a cell's finished run whatever ``--set``
    values it was trained with; a field the run's config lacks counts as its default) and
    evaluation options (unless ``evaluation=False``: the
    tables gather runs evaluated with any options)."""
    done = _done(out, cell)
    if done is None:
        return False
    keys = [k for k in cell.spec() if (evaluation or k != "evaluation") and k != "config"]
    recorded = {k: recorded_evaluation(done, cell_dir(out, cell)) if k == "evaluation" else done.get(k)
                for k in keys}
    same = recorded == {k: v for k, v in _roundtrip(cell.spec()).items() if k in keys}
    # the config compared field by field: one the run lacks (added in a later version) counts as its default
    return same and (not config or not config_differences(done.get("config") or {}, cell.config))


def _done(out: pathlib.Path, cell: Cell) -> dict | None:
    """The cell's ``done.json`` (None when missing or unreadable)."""
    path = cell_dir(out, cell) / "done.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def config_differences(done_config: Mapping[str, Any], asked: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.max_steps": 50, ...}``: the fields of a finished run's config (``done_config``)
    whose value differs from ``asked`` (the config the grid asks for now), with the run's value;
    a field the run's config lacks (added in a later version) counts as its default, as when
    ``sams_jax.train`` resumes a run (:func:`sams_jax.train.config_changes`)."""
    import ml_collections

    from sams_jax.train import config_changes

    return {field: old for field, old, _ in config_changes(dict(done_config), ml_collections.ConfigDict(dict(asked)))}


def _roundtrip(value):
    return json.loads(json.dumps(value))


@dataclasses.dataclass
class Outcome:
    """A cell that ran: its exit code, wall time and log file."""

    cell: Cell
    returncode: int
    seconds: float
    log: pathlib.Path


def run_grid(cells: Sequence[Cell], out: pathlib.Path, workers: int = 1,
             echo: Callable[[str], None] = print) -> list[Outcome]:
    """Run the unfinished cells, ``workers`` processes at a time; return the failures.

    With several workers each process is pinned to its own share of the cores (so JAX's
    thread pools do not oversubscribe the machine) and GPU memory is allocated on demand.
    """
    todo = [c for c in cells if not is_done(out, c)]
    workers = max(1, min(workers, len(todo)))
    echo(f"{len(cells)} cells, {len(cells) - len(todo)} already finished, {len(todo)} to run "
         f"with {workers} worker{'s' if workers > 1 else ''}; logs in {out / 'runs'}/<cell>/log.txt")
    cores = usable_cores()
    per_slot = max(1, len(cores) // workers)
    slots = [cores[i * per_slot:(i + 1) * per_slot] or cores for i in range(workers)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if workers > 1:
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # runs of the same shapes (e.g. the seeds of a simulation variant) compile once
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / "jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    pending = list(todo)
    active: dict[int, tuple[subprocess.Popen, Cell, float, Any]] = {}
    failures: list[Outcome] = []
    finished = 0
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:  # kill: stop the running cells too
        previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while pending or active:
            for slot in range(workers):
                if slot in active or not pending:
                    continue
                cell = pending.pop(0)
                directory = cell_dir(out, cell)
                directory.mkdir(parents=True, exist_ok=True)
                (directory / "cell.json").write_text(json.dumps(cell.spec(), indent=2))
                log = open(directory / "log.txt", "a")
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {cell.id}\n")
                log.flush()
                cpus = set(slots[slot]) if workers > 1 and hasattr(os, "sched_setaffinity") else None
                process = subprocess.Popen(
                    [sys.executable, "-m", "experiments.runner", "cell", str(directory)], cwd=ROOT, env=env,
                    stdout=log, stderr=subprocess.STDOUT)
                if cpus:  # from here (no fork-time hook in a possibly multithreaded parent), before JAX starts
                    try:
                        os.sched_setaffinity(process.pid, cpus)
                    except OSError:  # already exited
                        pass
                active[slot] = (process, cell, time.perf_counter(), log)
            time.sleep(0.2)
            for slot, (process, cell, start, log) in list(active.items()):
                if process.poll() is None:
                    continue
                log.close()
                del active[slot]
                finished += 1
                seconds = time.perf_counter() - start
                outcome = Outcome(cell, process.returncode, seconds, cell_dir(out, cell) / "log.txt")
                status = "done" if process.returncode == 0 else f"FAILED (exit code {process.returncode})"
                echo(f"[{finished}/{len(todo)}] {cell.id}: {status} in {seconds:.0f} s")
                if process.returncode != 0:
                    failures.append(outcome)
    except KeyboardInterrupt:
        for process, _, _, _ in active.values():
            process.terminate()
        for process, _, _, log in active.values():
            process.wait()
            log.close()
        echo(f"interrupted; {len(active)} running cell(s) stopped (they resume from their latest checkpoint)")
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
    return failures


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def report_failures(failures: Sequence[Outcome], out: pathlib.Path, echo: Callable[[str], None] = print) -> None:
    """Print the failed cells with the end of their logs; write ``failures.txt``."""
    path = out / "failures.txt"
    if not failures:
        path.unlink(missing_ok=True)
        return
    lines = [f"{len(failures)} cell(s) failed:"]
    for outcome in failures:
        tail = _tail(outcome.log, 6)
        lines.append(f"- {outcome.cell.id} (exit code {outcome.returncode}), log {outcome.log}")
        lines.extend(f"    {line}" for line in tail)
    path.write_text("\n".join(lines) + "\n")
    echo("\n".join(lines))


def _tail(path: pathlib.Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def run_cell(directory: str) -> None:
    """Body of one cell's process: train (or resume), evaluate, then write ``done.json``."""
    import ml_collections
    from absl import logging

    from sams_jax.config import ConfigError
    from sams_jax.data import DataError, load_data
    from sams_jax.evaluate import evaluate
    from sams_jax.train import Preempted, ResumeError, train_and_evaluate

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO
    from sams_jax.train import cli_format_warning

    warnings.formatwarning = cli_format_warning  # the cell's log: "warning: ..." lines
    directory = pathlib.Path(directory)
    spec = json.loads((directory / "cell.json").read_text())
    config = ml_collections.ConfigDict(spec["config"])
    options = spec["evaluation"]
    start = time.perf_counter()
    try:
        data = load_data(config.data, config.model.likelihood)
    except (DataError, ConfigError) as error:  # the runner's own words, without a traceback
        sys.exit(f"error: {_runner_message(error)}")
    try:
        train_metrics = train_and_evaluate(config, str(directory), data=data)
    except ResumeError as error:  # the folder holds this cell's run with other --set values
        sys.exit(f"error: {error}\n(the experiment runner's --workdir of this cell is {directory}: for other --set "
                 "values use a new --out, or repeat the earlier ones)")
    except (ConfigError, DataError) as error:
        sys.exit(f"error: {_runner_message(error)}")
    except Preempted as error:  # SIGTERM (e.g. the runner stopped): the checkpoint is saved, the cell resumes
        print(f"{error}; the runner resumes this cell from it", file=sys.stderr, flush=True)
        sys.exit(143)
    print("train:", json.dumps(train_metrics, sort_keys=True), flush=True)
    train_seconds = time.perf_counter() - start
    metrics = evaluate(str(directory), iwelbo_particles=options["iwelbo_particles"],
                       ate_particles=options["ate_particles"], ate_method=options["ate_method"],
                       ate_metrics_over=options.get("ate_metrics_over", "observed"),
                       seed=options["seed"], plots=options["plots"], data=data)
    print("eval:", json.dumps(metrics, sort_keys=True), flush=True)
    done = dict(spec, metrics=metrics, train_metrics=train_metrics, train_seconds=train_seconds,
                seconds=time.perf_counter() - start)
    tmp = directory / "done.json.tmp"
    tmp.write_text(json.dumps(done, indent=2))
    tmp.replace(directory / "done.json")


# ------------------------------------------------------------------------- aggregation


def collect(cells: Sequence[Cell], out: pathlib.Path):
    """One row per finished cell: ``variant, fraction, seed, seconds``, the evaluation's
    particle counts and method, ``settings`` (the config fields in which the run differs from
    the config asked for now, as JSON: ``{}`` for none) and every metric of
    ``eval/metrics.json`` (a pandas DataFrame; empty when nothing has finished). A cell's
    finished run counts whatever ``--set`` values or evaluation options it had (a run of
    some models with other settings does not drop the others' runs from the tables; the
    columns say which differ)."""
    import pandas as pd

    rows = []
    for cell in cells:
        if is_done(out, cell, evaluation=False, config=False):
            done = _done(out, cell)
            evaluation = recorded_evaluation(done, cell_dir(out, cell))
            rows.append({"variant": cell.variant, "fraction": cell.fraction, "seed": cell.seed,
                         "seconds": done.get("seconds"),
                         **{key: evaluation.get(key) for key in EVALUATION_COLUMNS},
                         "settings": json.dumps(config_differences(done.get("config") or {}, cell.config),
                                                sort_keys=True, default=str),
                         **done["metrics"]})
    return pd.DataFrame(rows)


def _mixed_runs_note(runs) -> str:
    """A line for ``table.md`` when its runs were trained or evaluated differently."""
    notes = []
    if not runs.empty:
        other = runs[runs["settings"] != "{}"]
        if len(other):
            fields = sorted({field for text in other["settings"] for field in json.loads(text)})
            notes.append(f"{len(other)} of {len(runs)} runs were trained with other settings than asked for now "
                         f"({', '.join(fields[:6])}{' ...' if len(fields) > 6 else ''}: runs.csv, column `settings`)")
        options = runs[list(EVALUATION_COLUMNS)].astype(str).drop_duplicates()
        if len(options) > 1:
            notes.append("the runs were evaluated with different particle counts, ATE methods or ATE metric "
                         f"interventions (runs.csv, columns {', '.join(f'`{c}`' for c in EVALUATION_COLUMNS)})")
        else:  # one evaluation for all: say where it is not the paper's
            paper = Evaluation()
            differ = [f"{column}={runs[column].iloc[0]} (the paper's: {getattr(paper, column)})"
                      for column in EVALUATION_COLUMNS if str(runs[column].iloc[0]) != str(getattr(paper, column))]
            if differ:
                notes.append(f"the runs were evaluated with {', '.join(differ)}")
    return "".join(f"**Note:** {note}.\n\n" for note in notes)


def add_relative_iwelbo(runs, reference: str, iwelbo: str = "IWELBO-test", fraction: float | None = None):
    """``runs[RELATIVE]``: test IWELBO minus that of ``reference`` at ``fraction`` (the
    grid's smallest; None for grids without fractions) with the same seed (NaN where that
    run is missing or has not finished). Returns a new frame."""
    import numpy as np

    runs = runs.copy()
    if runs.empty:
        runs[RELATIVE] = []
        return runs
    base = runs[runs["variant"] == reference]
    if fraction is not None:
        base = base[np.isclose(base["fraction"].astype(float), fraction)]
    by_seed = dict(zip(base["seed"], base[iwelbo]))
    runs[RELATIVE] = runs[iwelbo] - runs["seed"].map(lambda s: by_seed.get(s, np.nan)).astype(float)
    return runs


def summarize(runs, metrics: Sequence[tuple[str, str]], variants: Sequence[str]):
    """Mean and (sample) standard deviation over seeds per ``(variant, fraction)``:
    columns ``variant, fraction, n_seeds, <name>_mean, <name>_std`` for every metric and
    the relative IWELBO, rows in the grid's variant order."""
    import numpy as np
    import pandas as pd

    columns = [(key, name) for key, name in metrics] + [(RELATIVE, RELATIVE)]
    header = ["variant", "fraction", "n_seeds"] + [f"{name}_{stat}" for _, name in columns for stat in ("mean", "std")]
    if runs.empty:
        return pd.DataFrame(columns=header)
    rows = []
    keys = runs[["variant", "fraction"]].drop_duplicates()
    order = {name: i for i, name in enumerate(variants)}
    keys = sorted(keys.itertuples(index=False), key=lambda k: (order.get(k.variant, len(order)),
                                                               -1 if pd.isna(k.fraction) else k.fraction))
    for variant, fraction in keys:
        group = runs[(runs["variant"] == variant) & ((runs["fraction"] == fraction) if pd.notna(fraction)
                                                     else runs["fraction"].isna())]
        row = {"variant": variant, "fraction": fraction, "n_seeds": len(group)}
        for key, name in columns:
            values = group[key].astype(float).to_numpy() if key in group else np.array([np.nan])
            finite = values[np.isfinite(values)]
            row[f"{name}_mean"] = finite.mean() if finite.size else np.nan
            row[f"{name}_std"] = finite.std(ddof=1) if finite.size > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=header)


def markdown_table(table, metrics: Sequence[tuple[str, str]], has_fraction: bool) -> str:
    """``mean ± std`` cells (std over seeds; "–" where a metric does not apply)."""
    import pandas as pd

    names = [name for _, name in metrics]
    iwelbo = next((i for i, name in enumerate(names) if "IWELBO" in name), None)
    names.insert(len(names) if iwelbo is None else iwelbo + 1, RELATIVE)  # after the test IWELBO, as in the paper
    header = ["model"] + (["fraction"] if has_fraction else []) + ["seeds"] + names
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [row["variant"]] + ([f"{row['fraction']:g}"] if has_fraction else []) + [str(int(row["n_seeds"]))]
        for name in names:
            mean, std = row[f"{name}_mean"], row[f"{name}_std"]
            digits = 2 if "IWELBO" in name else 3
            if pd.isna(mean):
                cells.append("–")
            elif pd.isna(std):
                cells.append(f"{mean:.{digits}f}")
            else:
                cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_metric(table, name: str, ylabel: str, path: pathlib.Path, has_fraction: bool, xlabel: str,
                title: str) -> None:
    """Mean ± std over seeds of one metric: against the fraction (a line per model), or per
    model for grids without a fraction axis. Models without values (e.g. no reference run
    for the relative IWELBO) are named in a note instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5.5, 4))
    missing = sorted(set(table["variant"]) - set(table.loc[table[f"{name}_mean"].notna(), "variant"]))
    table = table[~table["variant"].isin(missing)]
    if missing:
        ax.text(0.02, 0.02, f"no values: {', '.join(missing)}", transform=ax.transAxes, fontsize=7, color="0.4")
    if has_fraction:
        for variant, group in table.groupby("variant", sort=False):
            ax.errorbar(group["fraction"], group[f"{name}_mean"], yerr=np.nan_to_num(group[f"{name}_std"]),
                        marker="o", capsize=3, label=variant)
        ax.set_xlabel(xlabel)
        if len(table):
            ax.legend(fontsize=8)
    else:
        x = np.arange(len(table))
        ax.errorbar(x, table[f"{name}_mean"], yerr=np.nan_to_num(table[f"{name}_std"]), fmt="o", capsize=3)
        ax.set_xticks(x, table["variant"], rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def aggregate(grid: Grid, out: pathlib.Path, echo: Callable[[str], None] = print):
    """Write ``runs.csv``, ``table.csv``, ``table.md`` and the two plots; return the table."""
    cells = grid.cells()
    runs = add_relative_iwelbo(collect(cells, out), grid.reference,
                               fraction=min(grid.fractions) if grid.fractions else None)
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "runs.csv", index=False)
    table = summarize(runs, grid.metrics, [v.name for v in grid.variants])
    table.to_csv(out / "table.csv", index=False)
    has_fraction = bool(grid.fractions)
    reference = f"{grid.reference} at fraction {min(grid.fractions):g}" if has_fraction else grid.reference
    text = (f"# {grid.name}\n\n{len(runs)} of {len(cells)} runs finished. Mean ± std over seeds; "
            f"{RELATIVE}: test IWELBO minus {reference} on the same seed.\n\n" + _mixed_runs_note(runs)
            + markdown_table(table, grid.metrics, has_fraction))
    (out / "table.md").write_text(text)
    xlabel = (grid.fraction_field or "").split(".")[-1]
    if not table.empty:
        title = f"{grid.name}: mean ± std over seeds"
        plot_metric(table, RELATIVE, f"relative test IWELBO (vs {reference})", out / "relative_iwelbo.png",
                    has_fraction, xlabel, title)
        plot_metric(table, "ATE_pearson", "ATE Pearson r (test)", out / "ate_pearson.png", has_fraction, xlabel,
                    title)
    echo(text)
    echo(f"tables: {out / 'table.md'}, {out / 'table.csv'}; per run: {out / 'runs.csv'}")
    return table


# -------------------------------------------------------------------- command line


def _number_list(cast: Callable[[str], Any], what: str, example: str) -> Callable[[str], list]:
    """An argparse type: comma-separated ``cast`` values; other text is a plain message."""
    def parse(text: str) -> list:
        try:
            return [cast(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}, e.g. {example}") \
                from None
    return parse


int_list = _number_list(int, "whole numbers", "0,1,2")  # argparse types, also for the experiments' own flags
float_list = _number_list(float, "numbers", "0,0.5,1")


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(name: str, make_grid: Callable[[argparse.Namespace], Grid], description: str,
         data_help: str | None = None, argv: Sequence[str] | None = None,
         after_aggregate: Callable[[Grid, pathlib.Path], None] | None = None, fractions: bool = True,
         add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """The command line of an experiment; returns the exit code (1 if any cell failed).

    ``make_grid(args)`` builds the grid from the parsed arguments (``args.data``,
    ``args.smoke``, ``args.out``). ``data_help`` is None for experiments without an input
    file (the simulation); otherwise ``--data`` is required outside ``--smoke`` and
    ``data_help`` says what to download. ``after_aggregate(grid, out)``, if given, adds an
    experiment's own tables or plots after the standard ones. ``fractions=False``: the
    experiment's grid has no fraction axis, so ``--fractions`` is not offered.
    ``add_arguments(parser)`` adds an experiment's own options (shown by ``--help``).
    """
    parser = argparse.ArgumentParser(prog=f"python experiments/{name}/run.py", description=description)
    if data_help is not None:
        parser.add_argument("--data", help=f"the input .h5ad file: {data_help}")
    parser.add_argument("--smoke", action="store_true",
                        help="the whole pipeline in minutes on a CPU: small synthetic data, tiny networks, "
                             f"50 steps, 2 seeds{', 2 fractions' if fractions else ''}")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel runs (default: min(cores, available memory / per-run estimate)); "
                             "1 runs the cells one after the other; on a single GPU use 1")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help=f"output directory (default: runs/experiments/{name}[_smoke])")
    parser.add_argument("--models", type=_str_list, default=None, help="comma-separated subset of the models")
    parser.add_argument("--seeds", type=int_list, default=None, help="comma-separated seeds, e.g. 0,1,2")
    if fractions:
        parser.add_argument("--fractions", type=float_list, default=None, help="comma-separated fractions")
    parser.add_argument("--set", type=parse_assignment, action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field of every cell, e.g. --set train.max_steps=5000")
    from sams_jax.ate import METHODS
    from sams_jax.evaluate import ATE_METRICS_OVER

    parser.add_argument("--iwelbo-particles", type=int, default=None,
                        help="particles of each cell's held-out IWELBO (default: 100, the paper's; --smoke: 8)")
    parser.add_argument("--ate-particles", type=int, default=None,
                        help="particles of each cell's model ATEs (default: 2,500, the paper's; --smoke: 32); fewer "
                             "make pilot grids cheaper (see also --ate-method crn)")
    parser.add_argument("--ate-method", choices=METHODS, default=None,
                        help="the model ATE estimator (default: paper; crn needs about 10x fewer particles for the "
                             "same Monte-Carlo error)")
    parser.add_argument("--ate-metrics-over", choices=ATE_METRICS_OVER, default=None,
                        help="the interventions of the ATE metrics (default: observed, the paper's: every "
                             "intervention observed in the split; learned: only those whose every member had "
                             "training cells)")
    parser.add_argument("--list", action="store_true", help="list the cells and whether they are finished")
    parser.add_argument("--aggregate-only", action="store_true", help="only rebuild the tables and plots")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    from sams_jax.train import cli_format_warning

    warnings.formatwarning = cli_format_warning  # "warning: ...", without the source line
    args.data = getattr(args, "data", None)
    args.fractions = getattr(args, "fractions", None)
    if args.out is None:
        args.out = ROOT / "runs" / "experiments" / (f"{name}_smoke" if args.smoke else name)
    if args.smoke and args.data:
        parser.error("--smoke writes and uses its own small synthetic data; drop --data (or drop --smoke)")
    if data_help is not None and not args.smoke:
        if not args.data:
            parser.error(f"--data is required (or --smoke for synthetic data): {data_help}")
        if not os.path.isfile(args.data):
            parser.error(f"--data {args.data!r}: no such file; {data_help}")
        args.data = os.path.abspath(args.data)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")
    try:
        if args.models is not None and not args.models:
            raise ValueError("--models is empty; name models, or leave --models out for all of them")
        grid = make_grid(args)
        evaluation = {field: value for field, value in (("iwelbo_particles", args.iwelbo_particles),
                                                        ("ate_particles", args.ate_particles),
                                                        ("ate_method", args.ate_method),
                                                        ("ate_metrics_over", args.ate_metrics_over))
                      if value is not None}
        for field in ("iwelbo_particles", "ate_particles"):
            if evaluation.get(field, 1) < 1:
                raise ValueError(f"--{field.replace('_', '-')} must be at least 1; got {evaluation[field]}")
        # a finished cell evaluated with other options is evaluated again (its training is kept)
        grid = dataclasses.replace(grid, settings=dict(args.set),
                                   evaluation=dataclasses.replace(grid.evaluation, **evaluation))
        # the cells to run; the tables aggregate every finished cell of the whole grid, extended by the
        # seeds and fractions asked for
        running = grid.subset(args.models, args.seeds, args.fractions)
        running.check_settings(grid.settings)
        cells = running.cells()
        grid = dataclasses.replace(grid, seeds=tuple(sorted({*grid.seeds, *(args.seeds or [])})),
                                   fractions=tuple(sorted({*grid.fractions, *(args.fractions or [])})))
        import ml_collections
        from sams_jax.config import validate_config

        for cell in cells:  # bad --set values fail here, once, not in every cell's process
            validate_config(ml_collections.ConfigDict(cell.config))
        if args.data and cells:  # a file in another layout fails here, once, without reading its counts
            from sams_jax.data.anndata_io import check_layout

            first = ml_collections.ConfigDict(cells[0].config)
            check_layout(first.data, first.model.likelihood)
    except (KeyError, ValueError, FileNotFoundError) as error:
        parser.error(_runner_message(error))
    out = args.out.resolve()
    if args.list:
        try:
            for cell in cells:
                print(f"{'done' if is_done(out, cell) else 'todo'}  {cell.id}")
            sys.stdout.flush()
        except BrokenPipeError:  # | head: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    failures = []
    if not args.aggregate_only:
        workers = args.workers or default_workers(grid.memory_gb)
        try:
            failures = run_grid(cells, out, workers)
        except KeyboardInterrupt:
            return 130
    aggregate(grid, out)
    if after_aggregate is not None:
        after_aggregate(grid, out)
    if not args.aggregate_only:  # an aggregation alone leaves the last run's failures.txt
        report_failures(failures, out)
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "cell":
        run_cell(sys.argv[2])
    else:
        sys.exit("usage: python -m experiments.runner cell DIR (started by run_grid; use experiments/<name>/run.py)")
