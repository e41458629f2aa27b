"""The grid shared by the two Norman et al. 2019 experiments (OOD combinations and data
efficiency): SAMS-VAE (correlated guide), CPA-VAE, conditional VAE and SVAE+ with the
settings of ``configs/<model>_norman_<task>.py`` (SPEC 7), five split seeds, five fractions.
"""

from __future__ import annotations

import argparse

from experiments import runner, synthetic
from sams_jax.data.anndata_io import NORMAN_URL

DATA_HELP = (f"the curated Norman et al. 2019 file of the sc-pert collection, {NORMAN_URL} "
             "(used as is: counts in layers['counts'], guide_* obs columns, var['highly_variable'])")
MODELS = ("sams_vae", "cpa_vae", "conditional_vae", "svae_plus")
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
SEEDS = (0, 1, 2, 3, 4)


def make_grid(name: str, task: str, fraction_field: str, args: argparse.Namespace) -> runner.Grid:
    """``task``: ``norman_ood`` or ``norman_data_efficiency`` (the config suffix). Each
    split seed is both ``data.split_seed`` and the model's ``seed``. ``--smoke``: a tiny
    Norman-like file written to ``<out>/data/``, tiny networks, 2 seeds, fractions 0 and 1."""
    variants = tuple(runner.Variant(model, task if model == "sams_vae" else f"{model}_{task}") for model in MODELS)
    common = dict(seed_fields=("seed", "data.split_seed"), fraction_field=fraction_field, reference="sams_vae")
    if args.smoke:
        path = args.out / "data" / "norman_like.h5ad"
        if not path.is_file():
            synthetic.norman_like(path)
        return runner.Grid(name, variants, seeds=(0, 1), fractions=(0.0, 1.0),
                           overrides={**runner.SMOKE_OVERRIDES, "data.path": str(path.resolve())},
                           evaluation=runner.SMOKE_EVALUATION, memory_gb=1.0, **common)
    # about 111,000 cells x 5,000 highly variable genes, densified: ~2 GB on the host and again on the device
    return runner.Grid(name, variants, seeds=SEEDS, fractions=FRACTIONS, overrides={"data.path": args.data},
                       memory_gb=10.0, **common)
