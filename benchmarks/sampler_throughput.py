"""Negative-binomial sampling speed: sams_jax.samplers against JAX's own samplers.

    python benchmarks/sampler_throughput.py --out benchmarks/out/sampler.json

One ATE chunk's worth of counts (2,048 generated cells x 1,187 genes, as at Replogle
scale) under two parameter sets: every gene at mean 8.4 with concentration 1 (a freshly
initialised library-size NB model), and log-normal means and concentrations like a
trained model's (``exp(N(-1.5, 2))`` and ``exp(N(0, 1))`` per gene). Baseline: numpyro's
``GammaPoisson.sample`` (``jax.random.gamma`` then ``jax.random.poisson``). Reports the
median of 5 calls after compilation, in seconds and counts per second.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HelpFormatter, machine, write_json  # noqa: E402

from sams_jax.samplers import sample_negative_binomial  # noqa: E402

CELLS, GENES = 2_048, 1_187


def _median_seconds(fn, *args, repeats: int = 5) -> tuple[float, float]:
    start = time.perf_counter()
    jax.block_until_ready(fn(jax.random.key(0), *args))
    first = time.perf_counter() - start
    seconds = []
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(jax.random.key(i + 1), *args))
        seconds.append(time.perf_counter() - start)
    return first, float(np.median(seconds))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", default="benchmarks/out/sampler.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    settings = {
        "fresh_init": (np.ones(GENES), np.full(GENES, 8.4)),
        "trained_like": (np.exp(rng.normal(0.0, 1.0, GENES)), np.exp(rng.normal(-1.5, 2.0, GENES))),
    }
    samplers = {
        "sams_jax": jax.jit(lambda key, r, m: sample_negative_binomial(key, r, m, (CELLS, GENES)).sum()),
        "jax_random": jax.jit(lambda key, r, m: dist.GammaPoisson(r, r / m).sample(key, (CELLS,)).sum()),
    }
    rows = []
    for setting, (r, m) in settings.items():
        r, m = jnp.asarray(r, jnp.float32), jnp.asarray(m, jnp.float32)
        for name, fn in samplers.items():
            first, seconds = _median_seconds(fn, r, m)
            rows.append({"setting": setting, "sampler": name, "counts": CELLS * GENES, "first_call_s": first,
                         "seconds": seconds, "counts_per_s": CELLS * GENES / seconds})
            print(f"{setting:13s} {name:10s} {seconds * 1e3:8.1f} ms  {CELLS * GENES / seconds / 1e6:6.1f} M counts/s"
                  f"  (first call {first:.1f} s)")
    write_json(args.out, {"rows": rows, **machine()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
