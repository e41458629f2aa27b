"""Training throughput of the jitted, scanned SAMS-VAE step.

    python benchmarks/train_throughput.py --config configs/simulation.py --out benchmarks/out/train.json

Times the same ``make_train_chunk`` that ``sams_jax.train`` uses, on the configured data,
after one warm-up dispatch (whose time is reported as ``compile_s``). Writes JSON with
``cells_per_s``, ``steps_per_s``, ``compile_s``, ``peak_rss_mb``, the config name,
batch size, particles and the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from sams_jax.data import load_data, plate_scale
from sams_jax.models import create_model
from sams_jax.objective import ObjectiveConfig
from sams_jax.train import BatchSchedule, create_optimizer, create_train_state, make_train_chunk


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    device = jax.devices()[0]
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
            "device": getattr(device, "device_kind", str(device)), "jax": jax.__version__}


def benchmark(config, n_dispatches: int = 20) -> dict:
    data = load_data(config.data)
    model = create_model(config.model, data.n_genes, data.n_perturbations)
    optimizer = create_optimizer(config.train)
    objective = ObjectiveConfig.from_config(config.objective)
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    state = create_train_state(model, optimizer, data.normalization_stats(config.model.normalization), init_key)
    train_arrays = jax.device_put(data.arrays("train"))
    scale = jnp.asarray(plate_scale(data.cells_per_perturbation("train")))
    chunk = make_train_chunk(model.apply, objective, optimizer)
    schedule = BatchSchedule(int((data.split == "train").sum()), config.train.batch_size, config.seed)
    n_steps = config.train.steps_per_dispatch

    start = time.perf_counter()
    state, losses = chunk(state, train_arrays, scale, train_key, jnp.asarray(schedule.indices(0, n_steps)))
    jax.block_until_ready(losses)
    compile_s = time.perf_counter() - start

    indices = [jnp.asarray(schedule.indices((i + 1) * n_steps, n_steps)) for i in range(n_dispatches)]
    start = time.perf_counter()
    for batch_indices in indices:
        state, losses = chunk(state, train_arrays, scale, train_key, batch_indices)
    jax.block_until_ready(losses)
    elapsed = time.perf_counter() - start
    steps = n_dispatches * n_steps
    return {
        "steps_per_s": steps / elapsed,
        "cells_per_s": steps * config.train.batch_size / elapsed,
        "compile_s": compile_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "batch_size": config.train.batch_size,
        "n_particles": config.objective.n_particles,
        "steps_per_dispatch": n_steps,
        "final_loss": float(np.asarray(losses)[-1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/simulation.py")
    parser.add_argument("--batch-size", type=int, nargs="*", default=None,
                        help="batch sizes to measure (default: the config's)")
    parser.add_argument("--steps-per-dispatch", type=int, default=None)
    parser.add_argument("--dispatches", type=int, default=20)
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args()

    config = load_config(args.config)
    if args.steps_per_dispatch:
        config.train.steps_per_dispatch = args.steps_per_dispatch
    results = []
    for batch_size in args.batch_size or [config.train.batch_size]:
        config.train.batch_size = batch_size
        row = {"config": os.path.basename(args.config), **benchmark(config, args.dispatches), **machine()}
        print(json.dumps(row))
        results.append(row)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
