"""Training from a screen on disk: host streaming against the in-memory path.

    python benchmarks/streaming_throughput.py --path /tmp/screen_1m.h5ad --out benchmarks/out/streaming.json

1. Writes a synthetic count screen (default 1,000,000 cells x 2,000 genes, about 10%
   non-zero, 1,000 perturbations + control, ``obs["perturbation"]`` and ``obs["split"]``)
   to an ``.h5ad`` without ever holding it dense: CSR blocks of 20,000 cells, the first
   written with ``anndata.io.write_elem`` and the others appended to the on-disk matrix
   (``anndata.io.sparse_dataset(...).append``). An existing file written with the same
   settings is reused (``--rewrite`` forces a new one; ``--delete`` removes it at the end).
2. Times training of the same SAMS-VAE (library-size NB, K = 100, 1 x 400 encoder and
   decoder, 2 x 200 embedding encoder, batch 512, 5 particles), each mode in a process
   of its own so that each peak RSS (``ru_maxrss``) is its own:

   * ``stream``: ``data.backed=True``, host placement: the rows of each dispatch read
     from the file, densified and put on the device by the prefetch thread;
   * ``memory``: the in-memory device path (dense training split on the device, batches
     gathered there) on the first ``--memory-cells`` training cells of the same file
     (the dense 1,000,000 x 2,000 split alone is 8 GB, and a second copy on the device);
     a step's cost does not depend on how many cells it is drawn from;
   * ``sparse``: the counts in memory as CSR, host placement (no disk reads);
   * ``paired`` (the speed comparison): the ``stream`` and ``memory`` paths in one
     process, ``--rounds`` alternating phases of ``--dispatches`` dispatches each, so both
     see the same load on a shared machine.

   Every mode registers the file (with the block-wise checks), builds the model with the
   building blocks of ``sams_jax.train`` (``BatchSchedule``, ``Prefetcher`` /
   ``host_batches``, ``make_batch_train_chunk`` / ``make_train_chunk``), runs one
   dispatch to compile, then times phases of ``steps_per_dispatch``-step dispatches,
   waiting for each dispatch's losses as the training loop does. A host phase is timed
   from the start of its prefetch thread (its first read is included; nothing is
   prefetched before the clock starts).

Writes JSON: per mode ``cells_per_s`` (paired: both paths, per round and overall, and
``stream_vs_memory``), ``peak_rss_gb``, ``load_s`` (registration and checks),
``compile_s``, and ``host_s_per_dispatch``: the prefetch thread's time per dispatch to
read, densify and place the batches, which overlaps the device's work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HelpFormatter, machine, write_json  # noqa: E402

MODES = ("stream", "paired", "memory", "sparse")


# ----------------------------------------------------------------------------- the file


SCREEN_ATTRIBUTE = "streaming_throughput_screen"  # the settings a file was written with


def screen_settings(n_cells: int, n_genes: int, n_perturbations: int, density: float, seed: int = 0) -> dict:
    return {"n_cells": n_cells, "n_genes": n_genes, "n_perturbations": n_perturbations, "density": density,
            "seed": seed}


VAL_TEST_CELLS = 2_048  # cells in each of the validation and test splits
BATCH_SIZE = 512


def write_screen(path: str, n_cells: int, n_genes: int, n_perturbations: int, density: float = 0.1,
                 block: int = 20_000, seed: int = 0, val_test_cells: int = VAL_TEST_CELLS) -> dict:
    """Write the synthetic screen block by block; returns its size and the time taken.

    Cells: 5% controls, the rest spread over ``n_perturbations`` perturbations. A cell's
    non-zero genes are drawn with probability ``density``; a value is ``1 + Poisson(rate
    of the gene x fold change of the cell's perturbation)`` (each perturbation changes 20
    genes by 2x up or down). ``val_test_cells`` random cells each form the validation and
    test splits, the rest the training split.
    """
    import anndata
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    names = [f"P{t:04d}" for t in range(n_perturbations)]
    labels = rng.integers(0, n_perturbations, n_cells)
    labels[rng.random(n_cells) < 0.05] = -1
    split = np.full(n_cells, "train", dtype=object)
    held_out = rng.choice(n_cells, 2 * val_test_cells, replace=False)
    split[held_out[:val_test_cells]], split[held_out[val_test_cells:]] = "val", "test"
    categories = ["control", *names]
    obs = pd.DataFrame({"perturbation": pd.Categorical.from_codes(labels + 1, categories),
                        "split": pd.Categorical(split, categories=["train", "val", "test"])},
                       index=pd.Index([f"cell{i:07d}" for i in range(n_cells)], dtype=object))
    var = pd.DataFrame(index=pd.Index([f"gene{g:04d}" for g in range(n_genes)], dtype=object))  # object: writable under pandas >= 3
    rate = rng.lognormal(0.0, 1.0, n_genes).astype(np.float32)
    fold = np.ones((n_perturbations + 1, n_genes), np.float32)  # row 0: control
    for t in range(n_perturbations):
        fold[t + 1, rng.choice(n_genes, 20, replace=False)] = rng.choice([0.5, 2.0], 20)

    with h5py.File(path, "w") as handle:
        handle.attrs["encoding-type"], handle.attrs["encoding-version"] = "anndata", "0.1.0"
        write_elem(handle, "obs", obs)
        write_elem(handle, "var", var)
        for first in range(0, n_cells, block):
            rows = np.arange(first, min(first + block, n_cells))
            cell, gene = np.nonzero(rng.random((len(rows), n_genes), dtype=np.float32) < density)
            values = 1.0 + rng.poisson(rate[gene] * fold[labels[rows][cell] + 1, gene]).astype(np.float32)
            counts = sp.csr_matrix((values, (cell, gene)), shape=(len(rows), n_genes), dtype=np.float32)
            if first == 0:
                write_elem(handle, "X", counts)
            else:
                sparse_dataset(handle["X"]).append(counts)
        nnz = int(handle["X"]["data"].shape[0])
        handle.attrs[SCREEN_ATTRIBUTE] = json.dumps(screen_settings(n_cells, n_genes, n_perturbations, density, seed))
    anndata.read_h5ad(path, backed="r").file.close()  # readable by anndata itself
    return {"n_cells": n_cells, "n_genes": n_genes, "n_perturbations": n_perturbations, "nnz": nnz,
            "density": nnz / (n_cells * n_genes), "file_gb": os.path.getsize(path) / 1e9,
            "write_s": time.perf_counter() - start}


# --------------------------------------------------------------------------- one mode


def model_config(path: str, mode: str, steps_per_dispatch: int):
    from sams_jax.config import base_config

    config = base_config()
    config.data.update(source="anndata", path=path, counts_layer="", split_key="split", backed=mode == "stream")
    config.model.update(n_latent=100, likelihood="library_nb", guide="correlated", normalization="log_standardize",
                        decoder_n_layers=1, decoder_n_hidden=400, basal_encoder_n_layers=1,
                        basal_encoder_n_hidden=400, embedding_encoder_n_layers=2, embedding_encoder_n_hidden=200)
    config.objective.n_particles = 5
    config.train.update(learning_rate=3e-4, batch_size=BATCH_SIZE, steps_per_dispatch=steps_per_dispatch, progress=False,
                        num_devices=1, data_placement="device" if mode == "memory" else "host", prefetch=2)
    return config


def first_training_cells(data, n_train: int):
    """The data restricted to its first ``n_train`` training cells (and all held-out
    cells), with a dense ``x``."""
    import dataclasses

    from sams_jax.data import matrix as matrix_lib

    train = data.rows("train")[:n_train]
    cells = np.sort(np.concatenate([train, data.rows("val"), data.rows("test")]))
    return dataclasses.replace(data, x=matrix_lib.dense_rows(data.x, cells), dosages=data.dosages[cells],
                               split=data.split[cells], library_size=data.library_size[cells])


class Trainer:
    """One model trained on ``data`` through one placement, a phase of dispatches at a
    time, with the building blocks of ``sams_jax.train``."""

    def __init__(self, config, data, placement: str):
        import jax
        import jax.numpy as jnp

        from sams_jax.data import plate_scale
        from sams_jax.models import create_model
        from sams_jax.objective import ObjectiveConfig
        from sams_jax.train import (BatchSchedule, create_optimizer, create_train_state, data_parallel_shardings,
                                    make_batch_train_chunk, make_train_chunk)

        self.data, self.placement, self.prefetch = data, placement, config.train.prefetch
        self.batch_size, self.steps_per_dispatch = config.train.batch_size, config.train.steps_per_dispatch
        model = create_model(config.model, data.n_genes, data.n_perturbations)
        optimizer = create_optimizer(config.train)
        objective = ObjectiveConfig.from_config(config.objective)
        init_key, self.train_key = jax.random.split(jax.random.key(config.seed))
        replicated, self.batch_sharding = data_parallel_shardings(1)
        stats = data.normalization_stats(config.model.normalization)
        self.state = jax.device_put(create_train_state(model, optimizer, stats, init_key), replicated)
        self.scale = jnp.asarray(plate_scale(data.cells_per_perturbation("train")))
        self.train_cells = data.rows("train")
        self.schedule = BatchSchedule(len(self.train_cells), self.batch_size, config.seed)
        self.host_seconds: list[float] = []
        self.next_step = 0
        if placement == "device":
            self.arrays = jax.device_put(data.arrays("train"), replicated)
            self.chunk = make_train_chunk(model.apply, objective, optimizer)
        else:
            self.chunk = make_batch_train_chunk(model.apply, objective, optimizer)

    def _produce(self, dispatch):  # in the prefetch thread
        import jax

        from sams_jax.streaming import host_batches

        begin = time.perf_counter()
        batches = host_batches(self.data, self.train_cells, self.schedule.indices(*dispatch))
        batches = jax.block_until_ready(jax.device_put(batches, self.batch_sharding))
        self.host_seconds.append(time.perf_counter() - begin)
        return batches

    def phase(self, n_dispatches: int) -> float:
        """Run ``n_dispatches`` dispatches, waiting for each one's losses as the training
        loop does; returns the seconds from the start (for the host path: the start of
        its prefetch thread, so its first read is included) to the last losses."""
        import jax

        from sams_jax.streaming import Prefetcher

        plan = [(self.next_step + i * self.steps_per_dispatch, self.steps_per_dispatch) for i in range(n_dispatches)]
        self.next_step += n_dispatches * self.steps_per_dispatch
        start = time.perf_counter()
        if self.placement == "device":
            for first_step, n_steps in plan:
                indices = jax.device_put(self.schedule.indices(first_step, n_steps), self.batch_sharding)
                self.state, losses = self.chunk(self.state, self.arrays, self.scale, self.train_key, indices)
                self.losses = np.asarray(losses)
        else:
            with Prefetcher(self._produce, plan, depth=self.prefetch) as prefetcher:
                for _ in plan:
                    _, batches = prefetcher.get()
                    self.state, losses = self.chunk(self.state, batches, self.scale, self.train_key)
                    self.losses = np.asarray(losses)
        return time.perf_counter() - start

    def cells_per_s(self, seconds: float, n_dispatches: int) -> float:
        return n_dispatches * self.steps_per_dispatch * self.batch_size / seconds


def load(path: str, mode: str, steps_per_dispatch: int):
    from sams_jax.data import load_data

    config = model_config(path, mode, steps_per_dispatch)
    start = time.perf_counter()
    data = load_data(config.data, config.model.likelihood)
    data.validate(config.model.likelihood)
    return config, data, time.perf_counter() - start


def run_mode(path: str, mode: str, n_dispatches: int, steps_per_dispatch: int, memory_cells: int,
             rounds: int) -> dict:
    """One mode in this process (see the module docstring); ``paired`` alternates
    ``rounds`` phases of the streaming and the in-memory path in one process, so that
    both see the same machine load."""
    config, data, load_s = load(path, "stream" if mode == "paired" else mode, steps_per_dispatch)
    row = {"mode": mode, "n_cells": int(data.x.shape[0]), "load_s": load_s, "batch_size": config.train.batch_size,
           "steps_per_dispatch": steps_per_dispatch, "n_latent": config.model.n_latent,
           "n_particles": config.objective.n_particles}
    if mode in ("stream", "sparse", "memory"):
        if mode == "memory":
            data = first_training_cells(data, memory_cells)
        trainer = Trainer(config, data, "device" if mode == "memory" else "host")
        row["compile_s"] = trainer.phase(1)
        seconds = trainer.phase(n_dispatches)
        row.update(placement=trainer.placement, storage=data.storage, n_train=len(trainer.train_cells),
                   cells_per_s=trainer.cells_per_s(seconds, n_dispatches), timed_steps=n_dispatches *
                   steps_per_dispatch, timed_s=seconds, device_s_per_dispatch=seconds / n_dispatches,
                   host_s_per_dispatch=float(np.mean(trainer.host_seconds[1:])) if trainer.host_seconds else None,
                   final_loss=float(trainer.losses[-1]))
    else:
        stream = Trainer(config, data, "host")
        memory = Trainer(config, first_training_cells(data, memory_cells), "device")
        row["compile_s"] = stream.phase(1) + memory.phase(1)
        per_round = []
        for _ in range(rounds):
            host_s, device_s = stream.phase(n_dispatches), memory.phase(n_dispatches)
            per_round.append({"stream_cells_per_s": stream.cells_per_s(host_s, n_dispatches),
                              "memory_cells_per_s": memory.cells_per_s(device_s, n_dispatches),
                              "load_average": os.getloadavg()[0]})
        total_stream = sum(r["stream_cells_per_s"] ** -1 for r in per_round)
        total_memory = sum(r["memory_cells_per_s"] ** -1 for r in per_round)
        row.update(rounds=per_round, stream_cells_per_s=len(per_round) / total_stream,
                   memory_cells_per_s=len(per_round) / total_memory, stream_vs_memory=total_memory / total_stream,
                   memory_n_train=len(memory.train_cells), timed_steps_per_path=rounds * n_dispatches *
                   steps_per_dispatch, host_s_per_dispatch=float(np.mean(stream.host_seconds[1:])))
    row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return row


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--path", default="/tmp/sams_jax_screen.h5ad", help="where the .h5ad is written")
    parser.add_argument("--cells", type=int, default=1_000_000,
                        help=f"cells in the screen; {VAL_TEST_CELLS:,} each form the validation and test splits, the "
                             "rest train")
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--perturbations", type=int, default=1_000)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--modes", nargs="*", default=["stream", "paired"], choices=MODES)
    parser.add_argument("--dispatches", type=int, default=8,
                        help="timed dispatches per mode (per phase in the paired mode)")
    parser.add_argument("--rounds", type=int, default=3, help="paired mode: alternating phases of each path")
    parser.add_argument("--steps-per-dispatch", type=int, default=25)
    parser.add_argument("--memory-cells", type=int, default=100_000,
                        help="training cells held dense on the device by the memory mode")
    parser.add_argument("--rewrite", action="store_true", help="write the file even if one with these settings exists")
    parser.add_argument("--delete", action="store_true", help="delete the file at the end")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # one mode, in a child process
    args = parser.parse_args()
    smallest = 2 * VAL_TEST_CELLS + BATCH_SIZE  # validation and test splits, then one training batch
    if args.cells < smallest:
        parser.error(f"--cells must be at least {smallest:,}: {VAL_TEST_CELLS:,} cells each form the validation and "
                     f"test splits and training needs a batch of {BATCH_SIZE}; the rest train (for a meaningful "
                     "comparison, many times that)")

    if args.mode:
        print(json.dumps(run_mode(args.path, args.mode, args.dispatches, args.steps_per_dispatch,
                                  args.memory_cells, args.rounds)))
        return

    screen = None
    if os.path.exists(args.path) and not args.rewrite:
        import h5py

        wanted = screen_settings(args.cells, args.genes, args.perturbations, args.density)
        with h5py.File(args.path, "r") as handle:  # reused only if written with the same settings
            if json.loads(handle.attrs.get(SCREEN_ATTRIBUTE, "{}")) == wanted:
                screen = {**wanted, "nnz": int(handle["X"]["data"].shape[0]),
                          "file_gb": os.path.getsize(args.path) / 1e9, "reused": True}
    if screen is None:
        screen = write_screen(args.path, args.cells, args.genes, args.perturbations, args.density)
    print(json.dumps({"screen": screen}), flush=True)

    results = {"screen": screen, "machine": machine(), "modes": []}
    for mode in args.modes:
        command = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--path", args.path,
                   "--dispatches", str(args.dispatches), "--steps-per-dispatch", str(args.steps_per_dispatch),
                   "--memory-cells", str(args.memory_cells), "--rounds", str(args.rounds)]
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:
            print(child.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"mode {mode} failed")
        row = json.loads(child.stdout.strip().splitlines()[-1])
        row["load_average"] = os.getloadavg()
        print(json.dumps(row), flush=True)
        results["modes"].append(row)
    for row in results["modes"]:
        if row["mode"] == "paired":
            print(f"paired phases: streaming / in-memory cells/s = {row['stream_vs_memory']:.3f}")
    write_json(args.out, results)
    if args.delete:
        os.remove(args.path)


if __name__ == "__main__":
    main()
