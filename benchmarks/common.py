"""Shared pieces of the benchmark scripts: machine description, the float32 matmul rate,
config loading (a configs/*.py path or a named benchmark scale) and FLOP counts."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

SCALES = ("replogle_scale", "norman_scale")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in ``--help``, unless its help already says what it is."""

    def _get_help_string(self, action):
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve")  # those that change XLA's CPU code


def cpu_description() -> tuple[str, list[str]]:
    """The CPU's model name and which of ``CPU_FEATURES`` it has (from ``/proc/cpuinfo``)."""
    cpu, flags = platform.processor() or platform.machine(), set()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu in ("", platform.machine(), platform.processor()):
                cpu = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    return cpu, [feature for feature in CPU_FEATURES if feature in flags]


def load_average() -> float | None:
    """The 1-minute load average (runnable processes; above the core count, the figures of
    a CPU run are low), or None where the system does not say."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine() -> dict:
    cpu, features = cpu_description()
    device = jax.devices()[0]
    return {"cpu": cpu, "cpu_features": features, "cpu_count": os.cpu_count(), "load_average": load_average(),
            "backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device)),
            "local_devices_present": jax.local_device_count(), "jax": jax.__version__}


def matmul_rate(n: int | None = None, repeats: int = 10) -> float:
    """Measured float32 FLOP/s of an ``n x n`` matrix product on the default device, at
    JAX's default matmul precision (the precision the model's own products use; on recent
    NVIDIA GPUs that admits TF32). ``n`` defaults to 2,048 on CPUs and 8,192 on
    accelerators, where a smaller product is too short to time."""
    if n is None:
        n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def peak_device_memory_mb() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return peak / 2 ** 20 if peak is not None else None


def cost_analysis(jitted, *args, **kwargs) -> dict:
    """XLA's cost analysis of a compiled call (``flops``, ``bytes accessed``,
    ``transcendentals``; a loop body is counted once); ``{}`` where the backend gives none."""
    try:
        cost = jitted.lower(*args, **kwargs).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return {key: float(value) for key, value in (cost or {}).items()
                if key in ("flops", "bytes accessed", "transcendentals")}
    except Exception:  # best effort
        return {}


def flops(jitted, *args, **kwargs) -> float:
    """XLA's FLOP count of a compiled call (a loop body is counted once)."""
    return cost_analysis(jitted, *args, **kwargs).get("flops", float("nan"))


def memory_bandwidth(n: int | None = None, repeats: int = 10) -> float:
    """Measured bytes/s (read plus written) of a scaled copy of ``n`` float32 values on
    the default device; ``n`` defaults to 2^28 (1 GiB) on accelerators, 2^26 on CPUs."""
    if n is None:
        n = 2 ** 26 if jax.default_backend() == "cpu" else 2 ** 28
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda v: v * 1.0001)
    f(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(x)
    out.block_until_ready()
    return 2 * 4 * n * repeats / (time.perf_counter() - start)


def scale_config(name: str):
    """A synthetic screen at one of the paper's scales: ``configs/<name>.py`` (simulated
    counts, library-size NB, the paper's model settings for that data set), with the
    progress bar off.

    * ``replogle_scale``: 118,494 cells (681 x 174; the real file: 118,641) x 1,187 genes x 681 perturbations; K = 100,
      encoder and decoder 1 x 400, correlated guide with a 2 x 200 embedding encoder;
    * ``norman_scale``: 105 perturbations x 500 cells x 5,000 genes; K = 200, 1 x 400,
      embedding encoder 4 x 400.
    """
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; allowed: {SCALES}")
    config = load_config(os.path.join(ROOT, "configs", f"{name}.py"))
    config.train.progress = False
    return config


def load_config(path_or_scale: str):
    """A ``configs/*.py`` file's ``get_config()``, or a named scale (:func:`scale_config`)."""
    if path_or_scale in SCALES:
        return scale_config(path_or_scale)
    if not os.path.exists(path_or_scale):
        raise FileNotFoundError(f"no config file {path_or_scale!r}; give a configs/*.py path or one of {SCALES}")
    spec = importlib.util.spec_from_file_location("bench_config", path_or_scale)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def write_json(path: str | None, payload) -> None:
    """Write ``payload`` as JSON to ``path`` (creating its folder); nothing if no path."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as handle:
            json.dump(payload, handle, indent=2)
