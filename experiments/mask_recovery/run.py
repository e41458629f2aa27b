"""Sparse mechanism recovery: the paper's objective and each mask option, five seeds.

    python experiments/mask_recovery/run.py [--workers N] [--out DIR] [--models a,b]
    python experiments/mask_recovery/run.py --smoke            # minutes on a CPU
    python experiments/mask_recovery/run.py --counts            # the count-valued simulation

Every run trains SAMS-VAE (correlated guide) on the default simulation
(``configs/simulation.py``: K = 15, T = 100, true mask density 198 / 1,500, prior 2/15,
20,000 steps) with the model's ``seed`` varied; the data set is the same for every run.
Variants (config overrides; see the README's "Sparse masks" notes for what each changes):

* ``paper``: the paper's objective and estimator (the default);
* ``analytic_kl``: closed-form KL terms for mask, embedding and z_basal;
* ``sparse_init``: mask logits initialised at -4 (``q(mask) = 0.018``) instead of 0;
* ``sparse_init_analytic``: both of the above;
* ``prior_weight_<w>``: the mask's KL multiplied by ``w`` (``objective.variable_weights``),
  closed-form;
* ``per_cell_prior``: the mask's KL counted once per cell (an extra weight ``N_t``, an
  option of the paper's code), closed-form;
* ``cold_gumbel``: straight-through temperature 0.3 with the sparse initialisation;
* ``wide_embedding_prior``: embedding prior scale 5 (the simulated effects have size 5)
  with the sparse initialisation.

Table: mask precision / recall / F1 (``q(mask) > 0.5``, Hungarian-matched dimensions),
test IWELBO, ATE Pearson (mean and std over seeds). ``masks.md`` adds the F1 of the
decision rule ``q(mask) > 0.5 and |E[embedding]| > 1`` and of the mask read in the sparse
basis (``sams_jax.basis``: the shifts ``E[embedding] * q(mask)`` in the linear basis of the
latent space where they are sparsest, entries above Otsu's threshold); ``masks.png``
shows seed 0's learned mask probabilities of every variant, and its mask in the sparse basis, against the
true mask.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from experiments import runner  # noqa: E402

ANALYTIC = {"objective.analytic_kl": "mask,embedding,z_basal"}
SPARSE_INIT = {"model.mask_init_logits": -4.0}
VARIANTS = (
    runner.Variant("paper", "simulation"),
    runner.Variant("analytic_kl", "simulation", ANALYTIC),
    runner.Variant("sparse_init", "simulation", SPARSE_INIT),
    runner.Variant("sparse_init_analytic", "simulation", {**SPARSE_INIT, **ANALYTIC}),
    runner.Variant("prior_weight_30", "simulation", {**ANALYTIC, "objective.variable_weights": "mask=30"}),
    runner.Variant("prior_weight_100", "simulation", {**ANALYTIC, "objective.variable_weights": "mask=100"}),
    runner.Variant("per_cell_prior", "simulation", {**ANALYTIC, "objective.per_cell_variables": "mask"}),
    runner.Variant("cold_gumbel", "simulation", {**SPARSE_INIT, "model.gs_temperature": 0.3}),
    runner.Variant("wide_embedding_prior", "simulation", {**SPARSE_INIT, "model.embedding_prior_scale": 5.0}),
)
METRICS = (("mask_precision", "mask_precision"), ("mask_recall", "mask_recall"), ("mask_f1", "mask_F1"),
           ("sparse_basis_f1", "sparse_basis_F1"), ("IWELBO-test", "test_IWELBO"),
           ("ATE_pearsonr-test", "ATE_pearson"))
EFFECT_THRESHOLD = 1.0  # |E[embedding]| of the decision rule that uses both q(mask) and the embedding

SMOKE_DATA = {"data.n_latent": 3, "data.n_perturbations": 6, "data.n_genes": 12, "data.mask_prob": 0.3,
              "data.cells_per_perturbation": (40, 10, 10), "model.n_latent": 3, "model.mask_prior_prob": 0.3}
COUNTS = {"data.observation": "library_nb", "model.likelihood": "library_nb",
          "model.normalization": "log_standardize"}


def make_grid(args) -> runner.Grid:
    counts = COUNTS if getattr(args, "counts", False) else {}
    if args.smoke:
        return runner.Grid("mask_recovery", VARIANTS, seeds=(0, 1), metrics=METRICS, reference="paper",
                           overrides={**runner.SMOKE_OVERRIDES, **SMOKE_DATA, **counts},
                           evaluation=runner.SMOKE_EVALUATION, memory_gb=1.0)
    return runner.Grid("mask_recovery", VARIANTS, seeds=(0, 1, 2, 3, 4), metrics=METRICS, reference="paper",
                       overrides=counts, memory_gb=1.5)


def mask_report(grid: runner.Grid, out: pathlib.Path) -> None:
    """``masks.md`` (F1 of both decision rules, mean ± std over seeds) and ``masks.png``
    (seed 0 of every variant against the truth), from the finished runs' checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    from absl import logging

    import sams_jax
    from sams_jax.metrics import mask_scores, match_dimensions

    logging.set_verbosity(logging.ERROR)  # Orbax warns on every read-only restore

    rows, panels, truth = [], [], None
    for cell in grid.cells():
        directory = runner.cell_dir(out, cell)
        if not runner.is_done(out, cell, evaluation=False, config=False):  # the masks alone: as the tables
            continue
        predictor = sams_jax.load(str(directory))
        truth = _true_mask(cell.config) if truth is None else truth
        probs = predictor.mask_probs().to_numpy()
        effects = np.abs(predictor.embeddings().to_numpy())
        on = probs > 0.5
        both = on & (effects > EFFECT_THRESHOLD)
        try:
            sparse = predictor.sparse_basis(seed=cell.seed).mask.to_numpy()
        except ValueError as error:  # shifts of rank < K: no basis (see sams_jax.basis)
            print(f"{cell.id}: no sparse basis: {error}")
            sparse = np.zeros_like(on)
        rows.append({"variant": cell.variant, "seed": cell.seed, "density": on.mean(),
                     "F1 q>0.5": mask_scores(truth, on)["mask_f1"],
                     f"F1 q>0.5 and abs(E)>{EFFECT_THRESHOLD:g}": mask_scores(truth, both)["mask_f1"],
                     "F1 sparse basis": mask_scores(truth, sparse)["mask_f1"],
                     "density sparse basis": sparse.mean()})
        if cell.seed == min(grid.seeds):
            for title, learned, image in ((cell.variant, on, probs), (f"{cell.variant}, sparse basis", sparse, sparse)):
                true_dims, learned_dims = match_dimensions(truth, learned)
                panels.append((title, image[:, learned_dims[np.argsort(true_dims)]].astype(float)))
    if not rows:
        return
    frame = pd.DataFrame(rows)
    summary = frame.drop(columns="seed").groupby("variant", sort=False).agg(["mean", "std"])
    lines = ["| variant | " + " | ".join(c for c in frame.columns[2:]) + " |", "|---" * (len(frame.columns) - 1) + "|"]
    for variant, row in summary.iterrows():
        cells = [f"{row[(c, 'mean')]:.3f}" + ("" if pd.isna(row[(c, 'std')]) else f" ± {row[(c, 'std')]:.3f}")
                 for c in frame.columns[2:]]  # one seed: no spread, as in table.md
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    text = (f"# Mask decision rules\n\nTrue mask density {truth.mean():.3f}. Mean ± std over seeds "
            f"({len(frame)} runs).\n\n" + "\n".join(lines) + "\n")
    (out / "masks.md").write_text(text)
    print(text)

    fig, axes = plt.subplots(len(panels) + 1, 1, figsize=(12, 1.1 * (len(panels) + 1) + 0.6), sharex=True)
    for ax, (title, image) in zip(axes, [("truth", truth.astype(float))] + panels):
        ax.imshow(image.T, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
        ax.set_yticks([])
    axes[-1].set_xlabel("perturbation")
    fig.suptitle("q(mask), and the mask in the sparse basis, per perturbation (x) and latent dimension (y), "
                 "dimensions matched to the truth; seed "
                 f"{min(grid.seeds)}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_size_inches()[1]))  # room for the title above the panels
    fig.savefig(out / "masks.png", dpi=120)
    plt.close(fig)


def _true_mask(config: dict):
    """The simulation's true mask ``[T, K]`` (the data is deterministic given its config)."""
    import ml_collections

    from sams_jax.data import load_data

    config = ml_collections.ConfigDict(config)
    return load_data(config.data, config.model.likelihood).truth["mask"]


def main(argv=None) -> int:
    import argparse

    def add_counts(parser):
        parser.add_argument("--counts", action="store_true",
                            help="the count-valued simulation (configs/simulation_counts.py); default --out: "
                                 "runs/experiments/mask_recovery_counts[_smoke]")

    parser = argparse.ArgumentParser(add_help=False)
    add_counts(parser)
    known, _ = parser.parse_known_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if known.counts and not any(a.startswith("--out") for a in argv):  # the count runs' own default folder
        folder = "mask_recovery_counts_smoke" if "--smoke" in argv else "mask_recovery_counts"
        argv += ["--out", str(runner.ROOT / "runs" / "experiments" / folder)]
    description = (f"{__doc__.split(chr(10) * 2)[0]} Variants (--models; the module docstring says what each "
                   f"changes): {', '.join(v.name for v in VARIANTS)}.")
    return runner.main("mask_recovery", make_grid, description, argv=argv,
                       after_aggregate=mask_report, fractions=False, add_arguments=add_counts)


if __name__ == "__main__":
    sys.exit(main())
