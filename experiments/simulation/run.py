"""Simulation study (SPEC 6): every model on the paper's default simulation, five seeds.

    python experiments/simulation/run.py [--workers N] [--out DIR]
    python experiments/simulation/run.py --smoke          # minutes on a CPU

Each seed is the model's ``config.seed`` (initialisation, particles, mini-batch order);
the simulated data set is the same for every run (``data.seed = 0``, the data of
``configs/simulation.py``). Table: test IWELBO, relative IWELBO (minus SAMS-VAE
correlated on the same seed), ATE Pearson (all genes, top-20 DE genes), mask F1, MCC.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from experiments import runner  # noqa: E402

VARIANTS = (
    runner.Variant("sams_vae", "simulation"),  # correlated guide: the reference
    runner.Variant("sams_vae_mean_field", "simulation", {"model.guide": "mean_field"}),
    runner.Variant("sams_vae_beta_bernoulli", "sams_vae_beta_bernoulli_simulation"),
    runner.Variant("cpa_vae", "cpa_vae_simulation"),
    runner.Variant("conditional_vae", "conditional_vae_simulation"),
    runner.Variant("svae_plus", "svae_plus_simulation"),
)
METRICS = runner.STANDARD_METRICS + (("mask_f1", "mask_F1"), ("mcc", "MCC"))

# configs/test.py's tiny simulation: K = 3, T = 6, G = 12, 40 / 10 / 10 cells per perturbation
SMOKE_DATA = {"data.n_latent": 3, "data.n_perturbations": 6, "data.n_genes": 12, "data.mask_prob": 0.3,
              "data.cells_per_perturbation": (40, 10, 10), "model.n_latent": 3, "model.mask_prior_prob": 0.3}


def make_grid(args) -> runner.Grid:
    if args.smoke:
        return runner.Grid("simulation", VARIANTS, seeds=(0, 1), metrics=METRICS,
                           overrides={**runner.SMOKE_OVERRIDES, **SMOKE_DATA},
                           evaluation=runner.SMOKE_EVALUATION, memory_gb=1.0)
    return runner.Grid("simulation", VARIANTS, seeds=(0, 1, 2, 3, 4), metrics=METRICS, memory_gb=1.5)


def main(argv=None) -> int:
    return runner.main("simulation", make_grid, __doc__.split("\n\n")[0], argv=argv, fractions=False)


if __name__ == "__main__":
    sys.exit(main())
