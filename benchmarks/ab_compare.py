"""Before/after timings in one process, the two programs alternated call by call.

The programs: two versions of sams_jax, or one program compiled with different XLA options.

    python benchmarks/ab_compare.py --task iwelbo --old HEAD~1                  # this tree vs a revision
    python benchmarks/ab_compare.py --task train --scale replogle --old afc25ec
    python benchmarks/ab_compare.py --task ate --options '{"xla_cpu_prefer_vector_width": 512}'

On a shared or throttled machine, the speed of separate processes can differ by 15% or
more minutes apart, more than most changes gain. Here both programs are compiled in one
process and timed alternately, ``--rounds`` times, on the same inputs; the report gives
each one's median and how many rounds the second won. With ``--old REV`` the revision's
``sams_jax`` is unpacked (``git archive``) as a package named ``sams_jax_old`` and
compared with the working tree's; outputs are compared too (same numbers, or how far
apart). Each version's program is compiled with that version's own compiler options
(``sams_jax.objective.compiler_options`` where it has them; the ATEs with none). With
``--options``, the working tree's program is also compiled with each JSON dict *instead*
of its own options (``'{}'`` gives XLA's defaults).

Tasks (freshly initialised parameters, synthetic inputs; ``--scale simulation``: K = 15,
100 genes and perturbations, normal likelihood; ``replogle``: K = 100, 1,187 genes, 681
perturbations, library-size NB, correlated guide with a 2 x 200 embedding encoder):

* ``iwelbo``: predictive IWELBO of 10,000 cells (``replogle``: 4,096), 100 particles;
* ``ate``: paper-estimator ATEs of every perturbation, 2,500 particles (``replogle``: 256);
* ``train``: ``--steps`` training steps in one jitted scan (``make_train_chunk``: gather,
  loss, gradients, Adam), batch 128 (``replogle``: 512), 5 particles.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ate_throughput import evaluation_config, synthetic_cells  # noqa: E402
from common import HelpFormatter, machine, write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unpack_revision(revision: str, into: str) -> str:
    """``sams_jax`` at ``revision`` as the package ``sams_jax_old`` under ``into``."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", revision, "sams_jax"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    package = os.path.join(into, "sams_jax_old")
    os.rename(os.path.join(into, "sams_jax"), package)
    for folder, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(re.sub(r"\bsams_jax\b", "sams_jax_old", text))
    return "sams_jax_old"


def model_config(scale: str):
    """``(config, n_genes, n_perturbations)``: the evaluation benchmark's model
    (``ate_throughput.evaluation_config``) with the paper's batch size and learning rate."""
    config, n_genes, n_perturbations, _ = evaluation_config(scale)
    if scale == "simulation":
        config.train.update(batch_size=128, learning_rate=1e-3)
    else:
        config.train.update(batch_size=512, learning_rate=3e-4)
    return config, n_genes, n_perturbations


def device_cells(n_cells: int, n_genes: int, n_perturbations: int, counts: bool) -> dict:
    cells = synthetic_cells(n_cells, n_genes, n_perturbations, counts)
    return {key: jnp.asarray(value, jnp.float32) for key, value in cells.items()}


def build(package: str, task: str, scale: str, steps: int):
    """``(lowered program, its arguments, default compiler options)`` of ``task`` with
    ``package``'s code (``sams_jax`` or ``sams_jax_old``); parameters from a fixed key."""
    modules = {name: importlib.import_module(f"{package}.{name}")
               for name in ("models", "objective", "ate", "train")}
    config, n_genes, n_perturbations = model_config(scale)
    model = modules["models"].create_model(config.model, n_genes, n_perturbations)
    optimizer = modules["train"].create_optimizer(config.train)
    stats = {"mean": np.zeros(n_genes, np.float32), "scale": np.ones(n_genes, np.float32)}
    state = modules["train"].create_train_state(model, optimizer, stats, jax.random.key(0))
    options_fn = getattr(modules["objective"], "compiler_options", None)
    if options_fn is None and task == "iwelbo":
        options_fn = getattr(modules["objective"], "iwelbo_compiler_options", None)  # its name at 34528b2
    options = options_fn() if options_fn else None
    key = jax.random.key(1)
    counts = config.model.likelihood != "normal"
    if task == "iwelbo":
        cells = device_cells(10_000 if scale == "simulation" else 4_096, n_genes, n_perturbations, counts)
        where = modules["objective"] if hasattr(modules["objective"], "iwelbo_chunk_size") else \
            importlib.import_module(f"{package}.predictor")  # its home before 2026-11-27
        chunk = where.iwelbo_chunk_size(100, n_genes)  # each version's own rule
        fn = jax.jit(partial(modules["objective"].predictive_iwelbo, model.apply, n_particles=100, chunk_size=chunk))
        args = (state.variables, key, cells)
    elif task == "ate":
        dosages = jnp.asarray(np.vstack([np.zeros((1, n_perturbations), np.float32),
                                         np.eye(n_perturbations, dtype=np.float32)]))
        fn = jax.jit(partial(modules["ate"].model_expectations, model.apply,
                             n_particles=2_500 if scale == "simulation" else 256,
                             scale="mean" if scale == "simulation" else "perturbseq", method="paper", max_active=1))
        args = (state.variables, dosages, key)
        options = None  # the ATEs keep XLA's defaults (see sams_jax.objective.compiler_options)
    else:
        objective = modules["objective"].ObjectiveConfig.from_config(config.objective)
        chunk = modules["train"].make_train_chunk(model.apply, objective, optimizer)
        cells = device_cells(8_192, n_genes, n_perturbations, counts)
        indices = jnp.asarray(np.random.default_rng(1).integers(0, 8_192, (steps, config.train.batch_size)))
        fn = getattr(chunk, "__wrapped__", chunk)
        fn = jax.jit(fn)
        args = (state, cells, jnp.full((n_perturbations,), 1.0 / 100), key, indices)
    return fn.lower(*args), args, options


def leaves(out):
    return [np.asarray(v) for v in jax.tree.leaves(out) if hasattr(v, "dtype") and not jax.dtypes.issubdtype(
        v.dtype, jax.dtypes.prng_key)]


def output_difference(first: list, other: list) -> float:
    """Largest absolute difference between two outputs' arrays (inf if their structures
    differ)."""
    if len(first) != len(other) or any(a.shape != b.shape for a, b in zip(first, other)):
        return float("inf")
    return max([float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) for a, b in zip(first, other)
                if a.size] or [0.0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--task", choices=["iwelbo", "ate", "train"], default="iwelbo")
    parser.add_argument("--scale", choices=["simulation", "replogle"], default="simulation")
    parser.add_argument("--old", default=None, help="git revision to compare the working tree with")
    parser.add_argument("--options", nargs="*", default=[], help="JSON dicts of XLA compiler options to compare")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20, help="training steps per call (task train)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not args.old and not args.options:
        parser.error("give --old REV and/or --options JSON ...")

    variants = []  # (label, compiled)
    with tempfile.TemporaryDirectory() as folder:
        if args.old:
            sys.path.insert(0, folder)
            old = unpack_revision(args.old, folder)
            lowered, inputs, options = build(old, args.task, args.scale, args.steps)
            variants.append((args.old, lowered.compile(options)))
        lowered, inputs, options = build("sams_jax", args.task, args.scale, args.steps)
        variants.append(("working tree", lowered.compile(options)))
        for extra in args.options:
            variants.append((f"working tree with {extra}", lowered.compile(json.loads(extra))))

        outputs = [leaves(compiled(*inputs)) for _, compiled in variants]
        differences = [output_difference(outputs[0], out) for out in outputs]
        seconds = [[] for _ in variants]
        for _ in range(args.rounds):
            for i, (_, compiled) in enumerate(variants):
                start = time.perf_counter()
                jax.block_until_ready(compiled(*inputs))
                seconds[i].append(time.perf_counter() - start)
    rows = [{"variant": label, "median_s": float(np.median(s)), "rounds_faster_than_first": int(
        sum(b < a for a, b in zip(seconds[0], s))), "max_abs_output_difference": d}
        for (label, _), s, d in zip(variants, seconds, differences)]
    report = {"task": args.task, "scale": args.scale, "rounds": args.rounds, **machine(), "variants": rows}
    for row in rows:
        print(f"{row['variant']:<60} {row['median_s'] * 1e3:9.2f} ms  faster than the first in "
              f"{row['rounds_faster_than_first']}/{args.rounds}; "
              f"outputs differ by {row['max_abs_output_difference']:.3g}")
    write_json(args.out, report)


if __name__ == "__main__":
    main()
