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
LAYERS = (1,)  # encoder and decoder depths of the grid; the paper's sweep (SPEC 7): --layers 1,2,4


def add_layers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=runner.int_list, default=list(LAYERS),
                        help="encoder and decoder depths (x 400 units) to run, e.g. 1,2,4 for the paper's sweep; "
                             "each depth d > 1 adds the models <model>_L<d>, and --models sams_vae then runs "
                             "sams_vae_L<d> too (default: 1, the configs' depth)")


def variants(task: str, layers) -> tuple[runner.Variant, ...]:
    """The models at each depth: ``<model>`` at one layer (the configs' own), ``<model>_L<d>``
    with ``model.basal_encoder_n_layers`` and ``model.decoder_n_layers`` set to ``d``."""
    if not layers or any(depth < 1 for depth in layers):
        raise ValueError(f"--layers takes depths of at least 1, e.g. 1,2,4; got {layers}")
    out = []
    for depth in dict.fromkeys(layers):
        for model in MODELS:
            config = task if model == "sams_vae" else f"{model}_{task}"
            if depth == 1:
                out.append(runner.Variant(model, config))
            else:
                out.append(runner.Variant(f"{model}_L{depth}", config, {"model.basal_encoder_n_layers": depth,
                                                                         "model.decoder_n_layers": depth}))
    return tuple(out)


def make_grid(name: str, task: str, fraction_field: str, args: argparse.Namespace) -> runner.Grid:
    """``task``: ``norman_ood`` or ``norman_data_efficiency`` (the config suffix). Each
    split seed is both ``data.split_seed`` and the model's ``seed``. ``--smoke``: a tiny
    Norman-like file written to ``<out>/data/``, tiny networks, 2 seeds, fractions 0 and 1."""
    layers = getattr(args, "layers", None) or list(LAYERS)
    # the tables keep the one-layer models, the relative IWELBO's reference, whatever depths run now
    grid_variants = variants(task, [1, *layers])
    if getattr(args, "models", None) is None and 1 not in layers:
        args.models = [variant.name for variant in variants(task, layers)]  # run the depths asked for
    elif getattr(args, "models", None) and layers != [1]:  # a model named plainly runs at every depth asked for
        args.models = list(dict.fromkeys(name if name not in MODELS or depth == 1 else f"{name}_L{depth}"
                                         for name in args.models for depth in dict.fromkeys(layers)))
    common = dict(seed_fields=("seed", "data.split_seed"), fraction_field=fraction_field, reference="sams_vae")
    if args.smoke:
        path = args.out / "data" / "norman_like.h5ad"
        if not path.is_file():
            synthetic.norman_like(path)
        return runner.Grid(name, grid_variants, seeds=(0, 1), fractions=(0.0, 1.0),
                           overrides={**runner.SMOKE_OVERRIDES, "data.path": str(path.resolve())},
                           evaluation=runner.SMOKE_EVALUATION, memory_gb=1.0, **common)
    # about 111,000 cells x 5,000 highly variable genes, densified: ~2 GB on the host and again on the device
    return runner.Grid(name, grid_variants, seeds=SEEDS, fractions=FRACTIONS, overrides={"data.path": args.data},
                       memory_gb=10.0, **common)
