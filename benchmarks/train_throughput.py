"""Training throughput of the jitted, scanned training step.

    python benchmarks/train_throughput.py --config configs/simulation.py --out benchmarks/out/train.json
    python benchmarks/train_throughput.py --config replogle_scale --num-devices 1 2
    python benchmarks/train_throughput.py --config replogle_scale --compute-dtype float32 bfloat16

``--config`` is a configs/*.py file or a named synthetic scale (``replogle_scale``,
``norman_scale``; see ``benchmarks/common.py``). Times the same ``make_train_chunk`` and
data-parallel placement that ``sams_jax.train`` uses, after one warm-up dispatch (whose
time is ``compile_s``). Writes JSON with ``cells_per_s``, ``steps_per_s``, ``compile_s``,
``peak_rss_mb``, peak device memory, the step's FLOPs (XLA cost analysis of one step;
on several devices the sum over devices, ``flops_per_step_per_device`` each), achieved
FLOP/s and its fraction of the float32 matmul rate measured in the same run (on several
devices, of that rate times the device count; simulated CPU devices share the cores, so
there the fraction understates the use of the CPU).
``--compute-dtype`` sets ``model.compute_dtype`` (bfloat16 matrix-multiply inputs of the
networks); give both values to compare them in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from sams_jax.data import load_data, plate_scale
from sams_jax.models import create_model
from sams_jax.objective import ObjectiveConfig
from sams_jax.distributed import DataParallel
from sams_jax.train import BatchSchedule, create_optimizer, create_train_state, make_train_chunk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HelpFormatter, cost_analysis, load_config, machine, matmul_rate, peak_device_memory_mb, write_json  # noqa: E402


class TrainingRun:
    """What ``sams_jax.train`` builds before its loop: the data, the train state and the
    jitted, scanned chunk of ``config.train.steps_per_dispatch`` steps, placed on
    ``num_devices`` devices; ``indices(dispatch)`` gives a dispatch's mini-batch indices."""

    def __init__(self, config, num_devices: int = 1):
        data = load_data(config.data)
        model = create_model(config.model, data.n_genes, data.n_perturbations)
        optimizer = create_optimizer(config.train)
        objective = ObjectiveConfig.from_config(config.objective)
        init_key, train_key = jax.random.split(jax.random.key(config.seed))
        state = create_train_state(model, optimizer, data.normalization_stats(config.model.normalization), init_key)
        self.parallel = parallel = DataParallel(num_devices)  # one process: the training cells on every device
        self.state = parallel.replicate(state)
        self.train_key = parallel.replicate(train_key)
        self.train_arrays = parallel.put_process_rows(data.arrays("train"))
        self.scale = parallel.replicate(plate_scale(data.cells_per_perturbation("train")))
        self.chunk = make_train_chunk(model.apply, objective, optimizer, parallel.gather)
        self.schedule = BatchSchedule(int((data.split == "train").sum()), config.train.batch_size, config.seed)
        self.n_steps = config.train.steps_per_dispatch

    def indices(self, dispatch: int, n_steps: int | None = None):
        n_steps = n_steps or self.n_steps
        return self.parallel.put_batch_indices(self.schedule.indices(dispatch * n_steps, n_steps))

    def step_cost(self) -> dict:
        """XLA's cost analysis of one step (a one-step chunk)."""
        return cost_analysis(self.chunk, self.state, self.train_arrays, self.scale, self.train_key,
                             self.indices(0, 1))

    def dispatch(self, batch_indices):
        """One chunk of steps; updates the state, returns the losses."""
        self.state, losses = self.chunk(self.state, self.train_arrays, self.scale, self.train_key, batch_indices)
        return losses

    def timed(self, n_dispatches: int, first: int = 0):
        """Seconds for dispatches ``first .. first + n_dispatches - 1`` (indices prepared
        beforehand) and the last losses."""
        indices = [self.indices(first + i) for i in range(n_dispatches)]
        start = time.perf_counter()
        for batch_indices in indices:
            losses = self.dispatch(batch_indices)
        jax.block_until_ready(losses)
        return time.perf_counter() - start, losses


def benchmark(config, n_dispatches: int = 20, num_devices: int = 1) -> dict:
    run = TrainingRun(config, num_devices)
    n_steps = run.n_steps
    # XLA's cost analysis of a program split over devices counts one device's share (which
    # includes the work every device repeats, e.g. the global variables' draws)
    devices = run.parallel.n_devices
    device_flops = run.step_cost().get("flops", float("nan"))
    step_flops = device_flops * devices

    compile_s, _ = run.timed(1)
    elapsed, losses = run.timed(n_dispatches, first=1)
    steps = n_dispatches * n_steps
    return {
        "num_devices": devices,
        "steps_per_s": steps / elapsed,
        "cells_per_s": steps * config.train.batch_size / elapsed,
        "compile_s": compile_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mb": peak_device_memory_mb(),
        "flops_per_step": step_flops,
        "flops_per_step_per_device": device_flops,
        "flops_per_s": step_flops * steps / elapsed,
        "batch_size": config.train.batch_size,
        "compute_dtype": config.model.compute_dtype,
        "n_particles": config.objective.n_particles,
        "steps_per_dispatch": n_steps,
        "final_loss": float(np.asarray(losses)[-1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--config", default="configs/simulation.py",
                        help="a configs/*.py file, or a benchmark scale: replogle_scale, norman_scale")
    parser.add_argument("--batch-size", type=int, nargs="*", default=None,
                        help="batch sizes to measure (default: the config's)")
    parser.add_argument("--steps-per-dispatch", type=int, default=None,
                        help="training steps per jitted call (default: the config's train.steps_per_dispatch)")
    parser.add_argument("--dispatches", type=int, default=20,
                        help="timed calls after the compiling one (cells/s and steps/s are over these)")
    parser.add_argument("--num-devices", type=int, nargs="*", default=[1],
                        help="data-parallel device counts to measure")
    parser.add_argument("--compute-dtype", nargs="*", default=None, choices=["float32", "bfloat16"],
                        help="model.compute_dtype values to measure (default: the config's)")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args()

    available = jax.local_device_count()
    for count in args.num_devices:
        if not 1 <= count <= available:
            parser.error(f"--num-devices {count}: this process has {available} {jax.default_backend()} device(s) "
                         "(simulate more CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    config = load_config(args.config)
    for count in args.num_devices:
        for batch_size in args.batch_size or [config.train.batch_size]:
            if batch_size % count:
                parser.error(f"batch size {batch_size} is not divisible by --num-devices {count}")
    if args.steps_per_dispatch:
        config.train.steps_per_dispatch = args.steps_per_dispatch
    results = []
    for compute_dtype in args.compute_dtype or [config.model.compute_dtype]:
        config.model.compute_dtype = compute_dtype
        for num_devices in args.num_devices:
            for batch_size in args.batch_size or [config.train.batch_size]:
                config.train.batch_size = batch_size
                before = machine()  # the load average before this benchmark's own threads
                row = {"config": os.path.basename(args.config), **benchmark(config, args.dispatches, num_devices),
                       **before}
                print(json.dumps(row))
                results.append(row)
    rate = matmul_rate()  # after the training, so peak_device_mb is the model's, not this product's
    for row in results:  # per device: the step's FLOP/s on all devices over their summed matmul rates
        row.update(matmul_flops_per_s=rate,
                   fraction_of_matmul=row["flops_per_s"] / (rate * row["num_devices"]))
    print(json.dumps([{k: row[k] for k in ("config", "num_devices", "batch_size", "cells_per_s", "fraction_of_matmul")}
                      for row in results]))
    write_json(args.out, results)


if __name__ == "__main__":
    main()
