"""Where a training step's time goes, and how far it is from its floor.

    python benchmarks/profile_step.py --config replogle_scale --out benchmarks/out/profile_replogle.json
    python benchmarks/profile_step.py --config configs/simulation.py --top 20

Times the scanned training step (the same ``TrainingRun`` as ``train_throughput.py``),
then records two dispatches with ``jax.profiler`` and summarises the trace: on a GPU the
kernels of the device's streams, on the CPU the XLA operations of its worker threads,
each with its time and count per step, plus the fraction of the traced span the device
was busy (near 1: the step is its kernels' run time; well below 1: launch gaps). On the
CPU that fraction undercounts: XLA splits a large elementwise loop into parallel parts
(``outer_dimension_partitions`` in the compiled HLO) but the trace shows only the part
on the thread that started it, so the script also reports the process's CPU seconds per
wall second over the timed dispatches (``cpu_cores_used``, from ``resource``; worker
threads that spin while waiting count as used). The
floor is the larger of the step's FLOPs over the float32 matmul rate and XLA's "bytes
accessed" over the memory bandwidth, both measured in the same run (XLA counts the bytes
each fused kernel reads and writes, so this is the floor of the program as XLA fused
it, not of the model's minimal traffic); on the CPU, whose caches hold most of those
bytes, the FLOPs alone. Times are self times: an operation nested in another (a loop, the
CPU's thunk executor) is not counted twice; the CPU runtime's own events (the thunk
executor, waits on its thread pool) are not operations and are reported apart
(``runtime_us_per_step``). The Perfetto trace stays in ``--trace-dir``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import resource
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HelpFormatter, load_config, machine, matmul_rate, memory_bandwidth, write_json  # noqa: E402
from train_throughput import TrainingRun  # noqa: E402


RUNTIME_EVENTS = ("ThunkExecutor::", "SlinkyThreadPool::")  # XLA CPU runtime events, not operations


def summarise_trace(path: str, n_steps: int, top: int = 40) -> dict:
    """Kernel (GPU) or XLA-operation (CPU) times per step from a Perfetto trace file."""
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    processes, threads = {}, {}
    for event in events:
        if event.get("ph") == "M" and event.get("name") == "process_name":
            processes[event["pid"]] = event["args"]["name"]
        elif event.get("ph") == "M" and event.get("name") == "thread_name":
            threads[(event["pid"], event["tid"])] = event["args"]["name"]

    def device_work(event) -> bool:  # a GPU/TPU stream's kernel, or an XLA CPU worker's operation
        return processes.get(event["pid"], "").startswith("/device:") or \
            threads.get((event["pid"], event["tid"]), "").startswith("tf_XLAEigen")

    work = [event for event in events if event.get("ph") == "X" and device_work(event)]
    if not work:
        return {"error": f"no device events in {path}"}
    # self time: an event's duration less that of the events nested in it on its lane (the
    # CPU's thunk executor and loops enclose the operations they run)
    self_us = {}
    lanes = collections.defaultdict(list)
    for index, event in enumerate(work):
        lanes[(event["pid"], event["tid"])].append(index)
    for members in lanes.values():
        members.sort(key=lambda i: (work[i]["ts"], -work[i].get("dur", 0.0)))
        stack = []
        for i in members:
            start, end = work[i]["ts"], work[i]["ts"] + work[i].get("dur", 0.0)
            # enclosing events only: one that ended, or that this one outlasts (GPU kernels
            # on one stream can overlap by a few microseconds), is not a parent
            while stack and work[stack[-1]]["ts"] + work[stack[-1]].get("dur", 0.0) < end:
                stack.pop()
            self_us[i] = work[i].get("dur", 0.0)
            if stack:
                self_us[stack[-1]] -= end - start
            stack.append(i)
    per_name = collections.defaultdict(lambda: [0, 0.0])
    for i, event in enumerate(work):
        per_name[event.get("name", "?")][0] += 1
        per_name[event.get("name", "?")][1] += self_us[i]
    # the CPU runtime's own events (the thunk executor, waits on its thread pool): their self
    # time is scheduling and waiting, not an operation's work, so they are reported apart
    runtime = {name: per_name.pop(name) for name in list(per_name) if name.startswith(RUNTIME_EVENTS)}
    busy_us = sum(total for _, total in per_name.values())
    span_us = max(e["ts"] + e.get("dur", 0.0) for e in work) - min(e["ts"] for e in work)
    ranked = sorted(per_name.items(), key=lambda item: -item[1][1])
    return {
        "n_steps": n_steps, "lanes": len(lanes), "busy_fraction": busy_us / (span_us * len(lanes)),
        "runtime_us_per_step": {name: total / n_steps for name, (_, total) in runtime.items()},
        "launches_per_step": len(work) / n_steps, "busy_us_per_step": busy_us / n_steps,
        "span_us_per_step": span_us / n_steps, "distinct_names": len(per_name),
        "top": [{"name": name, "us_per_step": total / n_steps, "count_per_step": count / n_steps}
                for name, (count, total) in ranked[:top]],
    }


def process_cpu_seconds() -> float:
    """User plus system CPU seconds of this process (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--config", default="replogle_scale", help="a configs/*.py file or a named scale")
    parser.add_argument("--dispatches", type=int, default=10, help="timed dispatches (untraced)")
    parser.add_argument("--steps-per-dispatch", type=int, default=None)
    parser.add_argument("--top", type=int, default=40, help="operations listed")
    parser.add_argument("--trace-dir", default=None, help="where the trace stays (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args()

    config = load_config(args.config)
    if args.steps_per_dispatch:
        config.train.steps_per_dispatch = args.steps_per_dispatch
    run = TrainingRun(config)
    cost = run.step_cost()
    run.timed(1)  # compile
    cpu_start = process_cpu_seconds()
    seconds, _ = run.timed(args.dispatches, first=1)
    cores_used = (process_cpu_seconds() - cpu_start) / seconds
    ms_per_step = 1e3 * seconds / (args.dispatches * run.n_steps)

    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="sams_jax_profile_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        run.timed(2, first=args.dispatches + 1)
    traces = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    summary = summarise_trace(traces[-1], 2 * run.n_steps, args.top) if traces else {"error": "no trace written"}

    rate, bandwidth = matmul_rate(), memory_bandwidth()
    flops_ms = 1e3 * cost.get("flops", float("nan")) / rate
    bytes_ms = 1e3 * cost.get("bytes accessed", float("nan")) / bandwidth
    # on a CPU most of those bytes stay in its caches, so only the FLOPs set the floor there
    floor_ms = flops_ms if jax.default_backend() == "cpu" else max(flops_ms, bytes_ms)
    result = {"config": os.path.basename(args.config), "batch_size": config.train.batch_size,
              "ms_per_step": ms_per_step, "cost": cost, "matmul_flops_per_s": rate,
              "bandwidth_bytes_per_s": bandwidth, "flops_floor_ms": flops_ms, "bytes_floor_ms": bytes_ms,
              "floor_ms": floor_ms, "step_over_floor": ms_per_step / floor_ms, "cpu_cores_used": cores_used,
              "trace": traces[-1] if traces else None,
              "profile": summary, **machine()}
    write_json(args.out, result)
    print(f"{result['device']}: {ms_per_step:.3f} ms per step; floor {floor_ms:.3f} ms "
          f"(FLOPs {flops_ms:.3f} ms at {rate / 1e12:.1f} TFLOP/s, bytes {bytes_ms:.3f} ms at "
          f"{bandwidth / 1e9:.0f} GB/s{'; the bytes set no floor on the CPU, whose caches hold most of them' if jax.default_backend() == 'cpu' else ''}); "
          f"step / floor {result['step_over_floor']:.2f}")
    if "top" in summary:
        print(f"{summary['launches_per_step']:.0f} operations per step over {summary['lanes']} lane(s), "
              f"busy {100 * summary['busy_fraction']:.0f}% of the traced span; "
              f"{cores_used:.2f} of {os.cpu_count()} CPU cores used (process CPU time over wall time)")
        print(f"{'us/step':>9} {'count':>6}  operation")
        for row in summary["top"]:
            print(f"{row['us_per_step']:9.1f} {row['count_per_step']:6.1f}  {row['name'][:100]}")


if __name__ == "__main__":
    main()
