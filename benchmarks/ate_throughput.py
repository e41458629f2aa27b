"""Evaluation throughput at simulation and Replogle scale, and the ATE estimators' errors.

Throughput of the held-out IWELBO and the model ATEs, plus the Monte-Carlo error of the
two ATE estimators.

    python benchmarks/ate_throughput.py --task simulation --workdir runs/simulation --out benchmarks/out/ate_sim.json
    python benchmarks/ate_throughput.py --task replogle --out benchmarks/out/ate_replogle.json

``simulation``: 10,000 cells x 100 particles IWELBO; ATEs of 99 perturbations x 2,500
particles x 100 genes (``mean`` scale). With ``--workdir`` the trained run is used (needed
for a meaningful estimator comparison), otherwise freshly initialised parameters.
``replogle``: a synthetic screen of 23,729 held-out cells x 1,187 genes x 681
perturbations, K = 100, encoder / decoder 1 x 400, correlated guide with a 2 x 200
embedding encoder, library-size NB; ``perturbseq`` ATEs with 2,500 particles.

Each timing is the median of ``--repeats`` identical calls after the first (which compiles).
FLOPs come from XLA's cost analysis of single-chunk calls (XLA counts a loop body once),
scaled to the whole run; achieved FLOP/s is reported next to the float32
matrix-multiply rate measured in the same process. Data-dependent loops of the count
samplers are counted once per chunk (elementwise work, small beside the dense layers).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HelpFormatter, flops, machine, matmul_rate, peak_device_memory_mb, write_json  # noqa: E402

from sams_jax.ate import ate_chunk_sizes  # noqa: E402
from sams_jax.config import base_config  # noqa: E402
from sams_jax.models import create_model  # noqa: E402
from sams_jax.objective import iwelbo_chunk_size  # noqa: E402
from sams_jax.predictor import Predictor, load  # noqa: E402
from sams_jax.train import create_optimizer, create_train_state  # noqa: E402


def _timed(fn, *args, repeats: int = 3, **kwargs):
    """(output, first call's seconds incl. compilation, median seconds of ``repeats`` more calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args, **kwargs))
    first = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        seconds.append(time.perf_counter() - start)
    return out, first, float(np.median(seconds))


def evaluation_config(task: str):
    """``(config, n_genes, n_perturbations, n_held_out_cells)`` of the ``simulation`` or
    ``replogle`` evaluation task (see the module docstring)."""
    config = base_config()
    if task == "simulation":
        config.model.update(n_latent=15, likelihood="normal", normalization="standardize", decoder_n_hidden=50,
                            basal_encoder_n_hidden=50, embedding_encoder_n_hidden=50)
        return config, 100, 100, 10_000
    config.model.update(n_latent=100, likelihood="library_nb", decoder_n_hidden=400, basal_encoder_n_hidden=400,
                        embedding_encoder_n_layers=2, embedding_encoder_n_hidden=200)
    return config, 1_187, 681, 23_729


def fresh_predictor(task: str) -> tuple[Predictor, int]:
    config, n_genes, n_perturbations, n_cells = evaluation_config(task)
    model = create_model(config.model, n_genes, n_perturbations)
    stats = {"mean": np.zeros(n_genes, np.float32), "scale": np.ones(n_genes, np.float32)}
    state = create_train_state(model, create_optimizer(config.train), stats, jax.random.key(0))
    # the simulation measures ATEs against perturbation "0", as a trained simulation run does (99 interventions)
    metadata = {"feature_names": [f"g{i}" for i in range(n_genes)],
                "perturbation_names": [str(i) for i in range(n_perturbations)],
                "control": "0" if task == "simulation" else "control"}
    return Predictor(model, state.variables, config, metadata, 0, ""), n_cells


def synthetic_cells(n_cells: int, g: int, t: int, counts: bool) -> dict[str, np.ndarray]:
    """``n_cells`` cells of ``g`` genes (Poisson(2) counts or standard normals), each with
    one of ``t`` perturbations at random (seed 0)."""
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, size=(n_cells, g)).astype(np.float32) if counts else \
        rng.normal(size=(n_cells, g)).astype(np.float32)
    dosages = np.zeros((n_cells, t), np.float32)
    dosages[np.arange(n_cells), rng.integers(0, t, n_cells)] = 1.0
    return {"x": x, "dosages": dosages, "library_size": np.maximum(x.sum(1), 1.0)}


def estimator_spread(predictor: Predictor, interventions, seeds: int = 5) -> dict:
    """Monte-Carlo error (std over seeds, mean over entries) of each estimator by particles."""
    rows = []
    for method, particle_counts in (("paper", (2_500,)), ("crn", (25, 100, 250, 2_500))):
        for n in particle_counts:
            runs = np.stack([predictor.ate(interventions, method=method, n_particles=n, seed=s).X
                             for s in range(seeds)])
            rows.append({"method": method, "n_particles": n, "mc_std": float(runs.std(0).mean())})
    return {"estimator_spread": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--task", choices=["simulation", "replogle"], default="simulation")
    parser.add_argument("--workdir", default=None, help="trained run to load (simulation task)")
    parser.add_argument("--ate-particles", type=int, default=2_500)
    parser.add_argument("--iwelbo-particles", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first (median reported)")
    parser.add_argument("--spread", action="store_true", help="also measure estimator Monte-Carlo error")
    parser.add_argument("--ate-chunks", nargs="*", default=[], metavar="INTERVENTIONSxPARTICLES",
                        help="also time the ATEs at these chunks of generated cells, e.g. 8x256 32x1024 "
                             "(ate_s_by_chunk; default: only model_expectations' own choice)")
    parser.add_argument("--iwelbo-chunk-sizes", type=int, nargs="*", default=[],
                        help="also time the IWELBO at these cells per chunk (iwelbo_s_by_chunk; default: only "
                             "objective.iwelbo_chunk_size's choice)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    if args.workdir:
        if args.task != "simulation":
            parser.error("--workdir times a trained run of the default simulation (task simulation); the replogle "
                         "task uses freshly initialised parameters")
        predictor = load(args.workdir)
        source = predictor.config.data.get("source")
        if source != "simulation":
            parser.error(f"--workdir {args.workdir} was trained on data.source={source!r}, not the simulation; the "
                         "simulation task's figures (synthetic cells of its shape) would not describe that run")
        n_cells = 10_000
    else:
        predictor, n_cells = fresh_predictor(args.task)
    counts = predictor.default_scale == "perturbseq"
    cells = synthetic_cells(n_cells, len(predictor.feature_names), len(predictor.perturbation_names), counts)
    arrays = {k: jnp.asarray(v) for k, v in cells.items()}
    interventions = [p for p in predictor.perturbation_names if p != predictor.control][:681]
    row = {"task": args.task, "trained": bool(args.workdir), "n_cells": n_cells,
           "iwelbo_particles": args.iwelbo_particles, "n_interventions": len(interventions),
           "ate_particles": args.ate_particles, "ate_scale": predictor.default_scale, **machine()}

    key = jax.random.key(0)
    iwelbo_kwargs = dict(n_particles=args.iwelbo_particles,
                         chunk_size=iwelbo_chunk_size(args.iwelbo_particles, len(predictor.feature_names)))
    row["iwelbo_chunk_size"] = iwelbo_kwargs["chunk_size"]
    _, row["iwelbo_compile_s"], row["iwelbo_s"] = _timed(predictor._iwelbo, predictor.variables, key, arrays,
                                                          repeats=args.repeats, **iwelbo_kwargs)
    row["iwelbo_s_by_chunk"] = {}
    for size in args.iwelbo_chunk_sizes:  # the chunk rule's alternatives, in the same process
        _, _, row["iwelbo_s_by_chunk"][size] = _timed(predictor._iwelbo, predictor.variables, key, arrays,
                                                      repeats=args.repeats, **{**iwelbo_kwargs, "chunk_size": size})
    # XLA's cost analysis counts a loop body once, so count single-chunk calls of c and 2c
    # cells: their difference is the per-cell cost, the rest the once-per-call global draws.
    chunk = min(iwelbo_kwargs["chunk_size"], n_cells // 2)
    single = [flops(predictor._iwelbo, predictor.variables, key, {k: v[:c] for k, v in arrays.items()},
                    n_particles=args.iwelbo_particles, chunk_size=c) for c in (chunk, 2 * chunk)]
    per_cell = (single[1] - single[0]) / chunk
    row["iwelbo_flops"] = single[0] - chunk * per_cell + n_cells * per_cell

    dosages = jnp.asarray(predictor.dosages([predictor.control, *interventions]))
    ate_kwargs = dict(n_particles=args.ate_particles, scale=predictor.default_scale, method="paper", max_active=1)
    _, row["ate_compile_s"], row["ate_s"] = _timed(predictor._expectations, predictor.variables, dosages, key,
                                                    repeats=args.repeats, **ate_kwargs)
    row["ate_s_by_chunk"] = {}
    for text in args.ate_chunks:  # other chunk shapes, in the same process
        try:
            per_row, particles_per_chunk = (int(part) for part in text.lower().split("x"))
        except ValueError:
            parser.error(f"--ate-chunks {text!r}: write INTERVENTIONSxPARTICLES, e.g. 8x256")
        _, _, row["ate_s_by_chunk"][text] = _timed(
            predictor._expectations, predictor.variables, dosages, key, repeats=args.repeats,
            **ate_kwargs, intervention_chunk=per_row, particle_chunk=particles_per_chunk)
    # One chunk of interventions x particles (model_expectations' defaults), times the chunks.
    rows, particles = ate_chunk_sizes(len(predictor.feature_names), args.ate_particles)
    rows = min(rows, dosages.shape[0])
    row["ate_chunk"] = f"{rows}x{particles}"
    row["ate_flops"] = flops(predictor._expectations, predictor.variables, dosages[:rows], key,
                             **{**ate_kwargs, "n_particles": particles}) \
        * -(-dosages.shape[0] // rows) * -(-args.ate_particles // particles)
    if args.spread:
        row.update(estimator_spread(predictor, interventions[:20]))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["peak_device_mb"] = peak_device_memory_mb()
    row["matmul_flops_per_s"] = matmul_rate()  # after the evaluation, so the peaks above are its own
    for name in ("iwelbo", "ate"):
        row[f"{name}_flops_per_s"] = row[f"{name}_flops"] / row[f"{name}_s"]
        row[f"{name}_fraction_of_matmul"] = row[f"{name}_flops_per_s"] / row["matmul_flops_per_s"]
    print(json.dumps(row, indent=2))
    write_json(args.out, row)


if __name__ == "__main__":
    main()
