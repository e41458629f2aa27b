"""Replogle et al. 2022, filtered genome-wide K562 screen (SPEC 6, 7; the paper's Replogle table).

    python -m sams_jax.data.prepare_replogle K562_gwps_raw_singlecell_01.h5ad replogle.h5ad
    python experiments/replogle/run.py --data replogle.h5ad [--workers N] [--out DIR]
    python experiments/replogle/run.py --smoke            # synthetic Replogle-like file, minutes on a CPU

Grid: SAMS-VAE (correlated; K = 100, mask prior 0.01: the reference), its published
variants (K = 200; mask prior 0.1 and 0.001), CPA-VAE, conditional VAE and SVAE+, all with
the settings of ``configs/replogle.py`` (150,000 steps), x seeds 0-4 (the model's
``seed``; the random 64/16/20 split stays that of ``data.split_seed = 0``). Metrics on the
test split: test IWELBO, relative IWELBO (minus SAMS-VAE on the same seed), ATE Pearson;
how the learned masks and embeddings group the perturbations of the eight pathways (the
file's ``uns["pathways"]``): 5-nearest-neighbour purity, and its chance level.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from experiments import runner, synthetic  # noqa: E402
from sams_jax.data.anndata_io import REPLOGLE_RAW_URL  # noqa: E402

DATA_HELP = (f"the filtered Replogle et al. 2022 file: download K562_gwps_raw_singlecell_01.h5ad ({REPLOGLE_RAW_URL}, "
             "about 60 GB) and build it with python -m sams_jax.data.prepare_replogle "
             "K562_gwps_raw_singlecell_01.h5ad replogle.h5ad")
VARIANTS = (
    runner.Variant("sams_vae", "replogle"),
    runner.Variant("sams_vae_K200", "replogle", {"model.n_latent": 200}),
    runner.Variant("sams_vae_mask0.1", "replogle", {"model.mask_prior_prob": 0.1}),
    runner.Variant("sams_vae_mask0.001", "replogle", {"model.mask_prior_prob": 0.001}),
    runner.Variant("cpa_vae", "replogle", {"model.name": "cpa_vae", "model.guide": "mean_field"}),
    runner.Variant("conditional_vae", "replogle", {"model.name": "conditional_vae"}),
    runner.Variant("svae_plus", "replogle", {"model.name": "svae_plus", "model.mask_beta_a": 1.0,
                                             "model.mask_beta_b": 2.0}),
)

# the standard columns, then how the learned masks and embeddings group each pathway's perturbations
# (the prepared file's uns["pathways"]; sams_jax.metrics.pathway_grouping): 5-nearest-neighbour purity
METRICS = runner.STANDARD_METRICS + (
    ("pathway_mask_knn_purity", "pathway_purity_mask"),
    ("pathway_embedding_knn_purity", "pathway_purity_embedding"),
    ("pathway_embedding_knn_chance", "pathway_purity_chance"),
)


def make_grid(args) -> runner.Grid:
    if args.smoke:
        path = args.out / "data" / "replogle_like.h5ad"
        if not path.is_file():
            synthetic.replogle_like(path)
        return runner.Grid("replogle", VARIANTS, seeds=(0, 1), metrics=METRICS,
                           overrides={**runner.SMOKE_OVERRIDES, "data.path": str(path.resolve())},
                           evaluation=runner.SMOKE_EVALUATION, memory_gb=1.0)
    # 118,641 cells x 1,187 genes, densified: ~0.6 GB on the host and again on the device
    return runner.Grid("replogle", VARIANTS, seeds=(0, 1, 2, 3, 4), metrics=METRICS, overrides={"data.path": args.data},
                       memory_gb=4.0)


def main(argv=None) -> int:
    return runner.main("replogle", make_grid, __doc__.split("\n\n")[0], data_help=DATA_HELP, argv=argv,
                       fractions=False)


if __name__ == "__main__":
    sys.exit(main())
