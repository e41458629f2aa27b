"""Run the training and evaluation benchmarks on every backend and device count present.

The results go to one JSON file plus a markdown table.

    python benchmarks/compare_accelerators.py --out benchmarks/out/compare
    python benchmarks/compare_accelerators.py --quick          # small settings, a smoke run

Each measurement runs in its own process (``JAX_PLATFORMS`` selects the backend), using
``train_throughput.py`` (``--configs``, default the default simulation and the Replogle-
and Norman-scale synthetic screens) and ``ate_throughput.py`` (simulation and Replogle
scale). ``--quick`` runs few dispatches and particles on the default simulation only
(the screens need several GB of memory and minutes to simulate; name them in ``--configs``
to include them). The markdown table starts with the machine: CPU, cores, JAX version,
date, ``XLA_FLAGS`` (simulated CPU devices share the CPU's cores) and the load average
the benchmark processes saw, with a warning where it exceeded the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def backends(names=("cpu", "cuda", "rocm", "tpu")) -> dict[str, int]:
    """``{backend: local device count}`` for the backends among ``names`` JAX can start here."""
    found = {}
    for name in names:
        probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.local_device_count())"],
                               env={**os.environ, "JAX_PLATFORMS": name}, capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip().isdigit():
            found[name] = int(probe.stdout.strip())
    return found


def run(script: str, args: list[str], backend: str, timeout: float | None = None) -> list[dict]:
    """One benchmark in its own process; ``[]`` (and a message) when it fails or times out."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        command = [sys.executable, os.path.join(HERE, script), *args, "--out", out]
        print("running:", " ".join(command[1:]), f"[{backend}]", flush=True)
        try:
            result = subprocess.run(command, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": backend},
                                    capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"{script} {' '.join(args)} on {backend} timed out after {timeout} s", file=sys.stderr)
            return []
        if result.returncode != 0:
            print(f"{script} {' '.join(args)} on {backend} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
            return []
        rows = json.load(open(out))
    return rows if isinstance(rows, list) else [rows]


def machine_line(rows: list[dict] = ()) -> str:
    """The machine the figures come from, for the top of the table: CPU model, the features
    that change XLA's CPU code, cores, JAX, date, and the highest load average seen by the
    benchmark processes (``rows``), with a warning where it exceeded the cores."""
    import datetime

    import jax

    sys.path.insert(0, HERE)
    from common import cpu_description, load_average

    cpu, features = cpu_description()
    flags = os.environ.get("XLA_FLAGS", "")
    loads = [r["load_average"] for r in rows if r.get("load_average") is not None] or \
        [load for load in [load_average()] if load is not None]
    busy = ""
    if loads and max(loads) > (os.cpu_count() or 1):
        busy = (f" **Busy machine: load average up to {max(loads):.1f} on {os.cpu_count()} cores; the CPU figures "
                "(the matmul rate included) are lower than on an idle machine.**")
    return (f"Machine: {cpu} ({', '.join(features) or 'no AVX2/AVX-512/SVE'}), {os.cpu_count()} cores; JAX "
            f"{jax.__version__}; {datetime.date.today().isoformat()}"
            + (f"; XLA_FLAGS={flags}" if flags else "")
            + (f"; load average {min(loads):.1f}-{max(loads):.1f}" if loads else "") + "." + busy)


def _gflops(value) -> str:
    return "-" if value is None else f"{value / 1e9:,.0f}"


def markdown(train_rows: list[dict], eval_rows: list[dict]) -> str:
    lines = [machine_line([*train_rows, *eval_rows]), "",
             "FLOP/step: the step's XLA FLOPs summed over its devices; GFLOP/s: achieved; matmul GFLOP/s: the "
             "float32 matrix-multiply rate measured in the same process, per device; % of matmul: achieved over "
             "matmul times the device count.", "",
             "| backend | device | devices | config | batch | cells/s | steps/s | compile s | FLOP/step | GFLOP/s | "
             "matmul GFLOP/s | % of matmul | peak RSS MB | peak device MB |", "|" + "---|" * 14]
    for r in train_rows:
        lines.append(f"| {r['backend']} | {r['device']} | {r['num_devices']} | {r['config']} | {r['batch_size']} | "
                     f"{r['cells_per_s']:,.0f} | {r['steps_per_s']:,.1f} | {r['compile_s']:.1f} | "
                     f"{r['flops_per_step']:.3g} | {_gflops(r.get('flops_per_s'))} | "
                     f"{_gflops(r.get('matmul_flops_per_s'))} | {100 * r['fraction_of_matmul']:.0f} | "
                     f"{r['peak_rss_mb']:,.0f} | "
                     f"{'-' if r['peak_device_mb'] is None else format(r['peak_device_mb'], ',.0f')} |")
    lines += ["", "| backend | device | task | IWELBO cells x particles | IWELBO s | IWELBO compile s | IWELBO "
              "GFLOP/s (% of matmul) | ATE interventions x particles | ATE s | ATE compile s | ATE GFLOP/s (% of "
              "matmul) | matmul GFLOP/s | peak RSS MB |", "|" + "---|" * 13]
    for r in eval_rows:
        rates = {name: f"{_gflops(r.get(f'{name}_flops_per_s'))} "
                       f"({100 * r.get(f'{name}_fraction_of_matmul', float('nan')):.0f}%)" for name in ("iwelbo", "ate")}
        lines.append(f"| {r['backend']} | {r['device']} | {r['task']} | {r['n_cells']:,} x {r['iwelbo_particles']} | "
                     f"{r['iwelbo_s']:.3g} | {r.get('iwelbo_compile_s', float('nan')):.1f} | {rates['iwelbo']} | "
                     f"{r['n_interventions']} x {r['ate_particles']} | {r['ate_s']:.3g} | "
                     f"{r.get('ate_compile_s', float('nan')):.1f} | {rates['ate']} | "
                     f"{_gflops(r.get('matmul_flops_per_s'))} | {r['peak_rss_mb']:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.path.insert(0, HERE)
    from common import HelpFormatter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", default="benchmarks/out/compare", help="output prefix (.json and .md)")
    parser.add_argument("--quick", action="store_true", help="few dispatches and particles (smoke run)")
    parser.add_argument("--backends", nargs="*", default=None,
                        help="backends to measure (default: every one JAX can start: cpu, cuda, rocm, tpu)")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=None,
                        help="training batch sizes at the two screen scales (default: the paper's 512)")
    parser.add_argument("--configs", nargs="*", default=None,
                        help="training configs (configs/*.py files or named scales; default: configs/simulation.py "
                             "replogle_scale norman_scale, with --quick configs/simulation.py)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation benchmarks")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per benchmark process")
    args = parser.parse_args()
    dispatches = ["--dispatches", "2" if args.quick else "10"]
    particles = ["--ate-particles", "50", "--iwelbo-particles", "5"] if args.quick else []
    batches = ["--batch-size", *map(str, args.batch_sizes)] if args.batch_sizes else []
    found = backends(args.backends) if args.backends else backends()
    if args.backends and set(args.backends) - set(found):
        parser.error(f"backend(s) {sorted(set(args.backends) - set(found))} cannot start here")
    train_rows, eval_rows = [], []

    def save() -> str:  # after every benchmark, so a timeout later loses nothing
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as handle:
            json.dump({"train": train_rows, "eval": eval_rows}, handle, indent=2)
        table = markdown(train_rows, eval_rows)
        with open(args.out + ".md", "w") as handle:
            handle.write(table)
        return table

    configs = args.configs or (["configs/simulation.py"] if args.quick else
                               ["configs/simulation.py", "replogle_scale", "norman_scale"])
    tasks = [] if args.no_eval else ["simulation"] if args.quick and not args.configs else ["simulation", "replogle"]
    for backend, n_devices in found.items():
        counts = sorted({1, n_devices})
        device_args = ["--num-devices", *map(str, counts)]
        for config in configs:
            # the batch sizes apply to the screens; the default simulation keeps its own
            sizes = [] if config.endswith("simulation.py") else batches
            train_rows += run("train_throughput.py", ["--config", config, *dispatches, *device_args, *sizes],
                              backend, args.timeout)
            save()
        for task in tasks:
            eval_rows += run("ate_throughput.py", ["--task", task, *particles], backend, args.timeout)
            save()
    print(save())


if __name__ == "__main__":
    main()
