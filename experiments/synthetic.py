"""Small synthetic screens in the layouts of the paper's files, for ``--smoke`` runs and tests.

Counts are negative binomial around ``library x softmax(base + effect)``; every targeted
gene has a sparse effect on the log rates and a pair's effect is the sum of its members'
(so additive models have something to learn). Deterministic given ``seed``.

* :func:`norman_like`: the curated Norman et al. 2019 file of the sc-pert collection: raw
  counts in ``layers["counts"]`` (CSR), log1p in X, one 0/1 ``guide_<gene>`` obs column
  per targeted gene, ``guide_ids``, ``guide_identity``, ``var["highly_variable"]``.
* :func:`replogle_like`: the filtered Replogle et al. 2022 file: counts in X, one guide
  pair label per cell in ``obs["sgID_AB"]`` (names containing ``+`` and ``|``), several
  ``non-targeting_*|non-targeting_*`` control pairs.
"""

from __future__ import annotations

import itertools
import os

import numpy as np

from sams_jax.data.anndata_io import write_h5ad


def _counts(effects: np.ndarray, rng: np.random.Generator, n_genes: int) -> np.ndarray:
    """NB counts ``[cells, genes]`` for per-cell log-rate shifts ``effects [cells, genes]``."""
    base = rng.normal(0.0, 1.0, n_genes)
    logits = base + effects
    rho = np.exp(logits - logits.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    library = rng.lognormal(np.log(2_000.0), 0.3, len(effects))
    mean = library[:, None] * rho
    concentration = 10.0
    return rng.poisson(rng.gamma(concentration, mean / concentration)).astype(np.float32)


def _sparse_effects(rng: np.random.Generator, n: int, n_genes: int, n_active: int = 4) -> np.ndarray:
    """``[n, genes]``: ``n_active`` genes per row with effects of magnitude about 1.5."""
    effects = np.zeros((n, n_genes))
    for row in effects:
        genes = rng.choice(n_genes, n_active, replace=False)
        row[genes] = rng.choice([-1.0, 1.0], n_active) * rng.normal(1.5, 0.3, n_active)
    return effects


def norman_like(path: str | os.PathLike, n_singles: int = 6, n_pairs: int = 12, n_genes: int = 48,
                cells_per_condition: int = 25, n_control: int = 80, seed: int = 0) -> str:
    """Write a tiny Norman-like ``.h5ad`` (singles ``G0..``, ``n_pairs`` pairs); return its path."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_singles)]
    pairs = list(itertools.combinations(genes, 2))[:n_pairs]
    single_effects = dict(zip(genes, _sparse_effects(rng, n_singles, n_genes)))
    conditions = [()] * n_control + [(g,) for g in genes for _ in range(cells_per_condition)] \
        + [p for p in pairs for _ in range(cells_per_condition)]
    effects = np.stack([sum((single_effects[g] for g in c), np.zeros(n_genes)) for c in conditions])
    counts = _counts(effects, rng, n_genes)
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(len(conditions))])
    for gene in genes:
        obs[f"guide_{gene}"] = [int(gene in c) for c in conditions]
    obs["guide_ids"] = [",".join(c) for c in conditions]
    guides = [("NegCtrl0", "NegCtrl0") if not c else tuple((list(c) * 2)[:2]) for c in conditions]
    obs["guide_identity"] = ["_".join(pair) + "__" + "_".join(pair) for pair in guides]
    var = pd.DataFrame({"highly_variable": np.arange(n_genes) % 4 != 3}, index=[f"gene{g}" for g in range(n_genes)])
    adata = anndata.AnnData(X=np.log1p(counts), obs=obs, var=var, layers={"counts": sp.csr_matrix(counts)})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_h5ad(adata, path)
    return os.fspath(path)


def replogle_like(path: str | os.PathLike, n_targets: int = 8, n_genes: int = 32, cells_per_target: int = 30,
                  n_control_pairs: int = 3, cells_per_control_pair: int = 30, seed: int = 0) -> str:
    """Write a tiny Replogle-like ``.h5ad`` (counts in X, ``obs["sgID_AB"]``, pathway gene
    sets in ``uns["pathways"]``); return its path."""
    import anndata
    import pandas as pd

    rng = np.random.default_rng(seed)
    targets = [f"T{i}_+_{100 + i}.23-P1P2|T{i}_-_{200 + i}.23-P1P2" for i in range(n_targets)]
    controls = [f"non-targeting_{i:05d}|non-targeting_{i + 50:05d}" for i in range(n_control_pairs)]
    target_effects = dict(zip(targets, _sparse_effects(rng, n_targets, n_genes)))
    labels = [c for c in controls for _ in range(cells_per_control_pair)] \
        + [t for t in targets for _ in range(cells_per_target)]
    effects = np.stack([target_effects.get(label, np.zeros(n_genes)) for label in labels])
    counts = _counts(effects, rng, n_genes)
    obs = pd.DataFrame({"sgID_AB": labels, "gene": [label.split("_")[0] for label in labels]},
                       index=[f"BC{i}-1" for i in range(len(labels))])
    var = pd.DataFrame({"gene_name": [f"gene{g}" for g in range(n_genes)]}, index=[f"ENSG{g:05d}" for g in range(n_genes)])
    adata = anndata.AnnData(X=counts, obs=obs, var=var)
    # pathway gene sets as prepare_replogle writes them: the targets in groups of up to three
    adata.uns["pathways"] = {f"PATHWAY_{i // 3}": [f"T{j}" for j in range(i, min(i + 3, n_targets))]
                             for i in range(0, n_targets, 3)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_h5ad(adata, path)
    return os.fspath(path)
