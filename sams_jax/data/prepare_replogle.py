"""Rebuild the paper's filtered Replogle et al. 2022 file from the public raw file (SPEC 6).

    python -m sams_jax.data.prepare_replogle K562_gwps_raw_singlecell_01.h5ad replogle.h5ad

The raw file (``K562_gwps_raw_singlecell_01.h5ad``, about 60 GB) is at
https://plus.figshare.com/ndownloader/files/35775507. The filter (the lists come with the
package, ``resources/replogle_filter.json``) follows Lopez et al. 2022 as the SAMS-VAE
authors ran it:

* cells whose target gene (``obs["gene"]``) is one of the 681 strong-effect
  ``perturbed_genes``, plus 2,000 ``non-targeting`` cells: the positions of all
  non-targeting cells in file order, shuffled by ``numpy.random.seed(0)``; the first 2,000;
* the genes whose ``var["gene_name"]`` (``var_names`` when that column is absent) is one of
  the ``measured_genes`` (1,186 names; one names two columns, so 1,187 columns).

Cells and genes keep their file order; obs and var columns are kept; X holds the raw
counts (CSR float32); ``uns["pathways"]`` the eight pathway gene sets. Expected result:
118,641 cells x 1,187 genes. The raw file is read in row chunks (``backed="r"``), so memory
stays near the size of the result.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import sys
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sams_jax.data.dataset import DataError
from sams_jax.data.anndata_io import write_h5ad

GENE_NAME_COLUMN = "gene_name"
CONTROL_SEED = 0  # numpy.random.seed(0) of the authors' preprocessing
EXPECTED_SHAPE = (118_641, 1_187)


def load_filter(path: str | None = None) -> dict[str, Any]:
    """The filter lists: the packaged ``replogle_filter.json``, or a JSON file with the
    same fields (``perturbation_column``, ``control_label``, ``n_control_cells``,
    ``perturbed_genes``, ``measured_genes``, ``pathways``)."""
    if path is None:
        return json.loads(importlib.resources.files("sams_jax.data").joinpath(
            "resources/replogle_filter.json").read_text())
    with open(path) as handle:
        return json.load(handle)


def select_cells(targets: pd.Series, spec: dict[str, Any]) -> np.ndarray:  # [n_kept] int, increasing
    """Positions of the kept cells: every cell targeting a perturbed gene, plus the first
    ``n_control_cells`` non-targeting cells after a ``RandomState(0)`` shuffle."""
    targets = targets.astype(str).to_numpy()
    perturbed = np.isin(targets, list(spec["perturbed_genes"]))
    controls = np.flatnonzero(targets == spec["control_label"])
    np.random.RandomState(CONTROL_SEED).shuffle(controls)
    keep = perturbed.copy()
    keep[controls[:spec["n_control_cells"]]] = True
    return np.flatnonzero(keep)


def select_genes(var: pd.DataFrame, spec: dict[str, Any]) -> np.ndarray:  # [n_kept] int, increasing
    names = var[GENE_NAME_COLUMN] if GENE_NAME_COLUMN in var.columns else var.index.to_series()
    return np.flatnonzero(np.isin(names.astype(str).to_numpy(), list(spec["measured_genes"])))


def _read_rows(matrix, rows: np.ndarray, columns: np.ndarray, chunk_size: int) -> sp.csr_matrix:
    """``matrix[rows][:, columns]`` as CSR float32, reading ``chunk_size`` rows at a time
    (``matrix``: dense h5py dataset, backed sparse dataset, or in-memory array)."""
    blocks = []
    for start in range(0, len(rows), chunk_size):
        block = matrix[rows[start:start + chunk_size]]
        block = block[:, columns] if sp.issparse(block) else np.asarray(block)[:, columns]
        blocks.append(sp.csr_matrix(block, dtype=np.float32))
    if not blocks:
        return sp.csr_matrix((0, len(columns)), dtype=np.float32)
    return sp.vstack(blocks, format="csr")


def prepare_replogle(raw_path: str, out_path: str, spec: dict[str, Any] | None = None,
                     chunk_size: int = 10_000) -> dict[str, Any]:
    """Filter ``raw_path`` into ``out_path`` (see the module docstring); returns a summary.
    Every check runs before anything is written."""
    import anndata

    spec = load_filter() if spec is None else spec
    if not os.path.isfile(raw_path):
        raise DataError(f"no file at {raw_path!r}; download K562_gwps_raw_singlecell_01.h5ad from "
                        "https://plus.figshare.com/ndownloader/files/35775507 (about 60 GB) and pass its path")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise DataError(f"the output folder {out_dir!r} does not exist; create it or choose another OUT path")
    if os.path.abspath(out_path) == os.path.abspath(raw_path):
        raise DataError("OUT must differ from RAW; the raw file is read while the result is written")
    if chunk_size < 1:
        raise DataError(f"chunk_size={chunk_size}: the raw rows read at a time must be >= 1")
    try:
        raw = anndata.read_h5ad(raw_path, backed="r")
    except Exception as error:
        raise DataError(f"{raw_path!r} is not a readable .h5ad file ({type(error).__name__}: {error}); "
                        "check that the download is complete") from None
    try:
        column = spec["perturbation_column"]
        for needed, what in ((column, "the target gene of each cell"),
                             (spec.get("guide_column"), "the guide pair of each cell, the model's perturbation")):
            if needed and needed not in raw.obs.columns:
                raise DataError(f"the raw file has no obs column {needed!r} ({what}); obs columns: "
                                f"{list(raw.obs.columns)}; is it the Replogle et al. 2022 raw single-cell file?")
        rows = select_cells(raw.obs[column], spec)
        columns = select_genes(raw.var, spec)
        if len(rows) == 0 or len(columns) == 0:
            raise DataError(f"the filter keeps {len(rows)} cells and {len(columns)} genes of {raw_path!r}; is it "
                            "the Replogle et al. 2022 raw single-cell file?")
        counts = _read_rows(raw.X, rows, columns, chunk_size)
        obs = raw.obs.iloc[rows].copy()
        var = raw.var.iloc[columns].copy()
        if GENE_NAME_COLUMN not in var.columns:  # configs/replogle.py reads the symbols from it
            var[GENE_NAME_COLUMN] = var.index.astype(str)
    finally:
        if raw.isbacked:
            raw.file.close()
    targets = obs[column].astype(str)
    found = set(targets.unique())
    missing_targets = sorted(set(spec["perturbed_genes"]) - found)
    result = anndata.AnnData(X=counts, obs=obs, var=var)
    result.uns["pathways"] = {name: list(genes) for name, genes in spec["pathways"].items()}
    result.uns["prepare_replogle"] = {"raw_file": os.path.basename(raw_path), "control_seed": CONTROL_SEED,
                                      "n_control_cells": int((targets == spec["control_label"]).sum())}
    write_h5ad(result, out_path)
    return {"n_cells": int(result.n_obs), "n_genes": int(result.n_vars),
            "n_control_cells": int((targets == spec["control_label"]).sum()),
            "n_targets": len(found - {spec["control_label"]}), "missing_targets": missing_targets}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sams_jax.data.prepare_replogle",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", help="K562_gwps_raw_singlecell_01.h5ad (Replogle et al. 2022, raw single-cell file)")
    parser.add_argument("out", help="the filtered .h5ad to write")
    parser.add_argument("--filter", default=None, help="a filter JSON (default: the packaged replogle_filter.json)")
    parser.add_argument("--chunk-size", type=int, default=10_000, help="raw rows read at a time")
    args = parser.parse_args(argv)
    try:
        summary = prepare_replogle(args.raw, args.out, load_filter(args.filter), args.chunk_size)
    except (DataError, OSError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {summary['n_cells']:,} cells x {summary['n_genes']:,} genes "
          f"({summary['n_control_cells']:,} non-targeting, {summary['n_targets']} targets); the paper's file: "
          f"{EXPECTED_SHAPE[0]:,} x {EXPECTED_SHAPE[1]:,}")
    if (summary["n_cells"], summary["n_genes"]) != EXPECTED_SHAPE:
        print(f"warning: the result is not the paper's {EXPECTED_SHAPE[0]:,} x {EXPECTED_SHAPE[1]:,}: is RAW the "
              "complete raw single-cell file (K562_gwps_raw_singlecell_01.h5ad)?", file=sys.stderr)
    if summary["missing_targets"]:
        print(f"note: {len(summary['missing_targets'])} perturbed genes of the filter have no cells: "
              f"{summary['missing_targets'][:10]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
