"""Evaluate a trained run from its checkpoint (SPEC 5):

    python -m sams_jax.evaluate --workdir runs/simulation [--checkpoint best|latest|<step>]

Needs no config file: the model, its config and the data metadata come from the
checkpoint; the data are rebuilt from the saved ``config.data`` (the simulation is
regenerated from its seed; files are read from their saved path, or ``--data-path``
where the file has moved). Writes
``<workdir>/eval/``:

* ``metrics.json`` / ``metrics.csv``: ``IWELBO-<split>``; ``ATE_pearsonr-<split>``,
  ``ATE_r2-<split>``, ``ATE_pearsonr_top20-<split>``, ``ATE_r2_top20-<split>`` (split in
  train / val / test: the interventions observed in that split; all: those of the data
  set, cells in no split included); PerturBench-style
  ``cosine_logfc``, ``cosine_logfc_rank``, ``rmse_average``, ``rmse_rank`` per split; and for
  simulations ``mask_precision``, ``mask_recall``, ``mask_f1``, ``mcc`` and the mask read in the
  sparse basis (``sams_jax.basis``): ``sparse_basis_precision``, ``sparse_basis_recall``,
  ``sparse_basis_f1``; where pathway gene sets are known (``uns["pathways"]`` of the data
  file, as ``prepare_replogle`` writes it, or ``--pathways FILE.json``), how the learned
  masks and embeddings group the perturbations of one pathway:
  ``pathway_<mask|embedding>_<knn_purity|knn_chance|within_cosine|between_cosine>``
  (:func:`sams_jax.metrics.pathway_grouping`);
* ``settings.json``: what produced the scores (checkpoint step, data, particle counts, ATE
  method and scale, control, seed, ...);
* ``sparse_effects.csv`` (perturbations x basis dimensions: the shifts in the sparse basis)
  and ``sparse_basis.csv`` (latent x basis dimensions: ``W``), for models with embeddings;
* ``ate.h5ad``: obs = interventions (split membership, cell counts, ``learned``,
  ``seen_in_training``: see :meth:`Predictor.seen_in_training`), var = genes (with
  ``gene_symbol`` where the data had ``data.gene_symbols_key``), layers ``model`` and
  ``data`` (NaN where not observed), ``uns["control"]``;
* ``top_genes.csv``: the 20 genes of largest |model ATE| per intervention, with the model
  and data ATEs (:func:`top_genes`);
* PNG plots: ``history.png``, ``ate_scatter.png`` (the top-20 genes by |data ATE| marked),
  ``mask_probs.png``, ``embeddings.png``, ``sparse_effects.png`` (the perturbations in one
  order), and with pathways ``pathways.png`` (the embeddings' cosine
  similarity among the pathways' perturbations, grouped by pathway).

Data ATEs use all cells of the data set (control cells included, whatever their split,
and the cells a task leaves out of every split, such as the Norman tasks' left-out pair
cells, which registration keeps with split ``""`` for this alone);
the metrics of a split are computed over the interventions observed in that split, and
``all`` over every intervention of the data set (those of cells in no split too, as in the
paper's code), so under a random split of cells (every intervention in every split) the
four give the same ATE metrics; they differ with intervention-level (out-of-distribution)
splits.
An intervention with a member that has no training cells (its effect is the prior's, never
learned; ``ate.h5ad``'s ``learned`` column) counts in the ATE metrics like any other, as
SPEC 5 and the paper's code count every observed intervention, with a warning;
``ate_metrics_over="learned"`` (``--ate-metrics-over learned``) leaves such interventions
out of the ATE metrics and the scatter plot. Without a control
label (a screen trained with ``control=None``) the ATE outputs are skipped unless
``control`` names one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections import Counter

import ml_collections
import numpy as np
import pandas as pd

from sams_jax import __version__ as sams_jax_version
from sams_jax import metrics as metrics_lib
from sams_jax.ate import data_expectations
from sams_jax.checkpoint import CheckpointError
from sams_jax.data import SPLITS, DataError, PerturbationData, load_data
from sams_jax.data.anndata_io import DataWarning, read_uns, write_h5ad
from sams_jax.likelihoods import LIBRARY_LIKELIHOODS
from sams_jax.predictor import (LAYOUT_KEYS, InterventionError, InterventionWarning, Predictor, check_features,
                                check_perturbations, check_scale, load, training_data_differences)

TOP_K = 20
TOP_GENES = 20  # top_genes.csv: genes per intervention
OUTPUTS = ("metrics.json", "metrics.csv", "settings.json", "ate.h5ad", "top_genes.csv", "sparse_effects.csv",
           "sparse_basis.csv", "history.png",
           "ate_scatter.png", "mask_probs.png", "embeddings.png", "sparse_effects.png",
           "pathways.png")  # what a run writes


class EvaluationError(ValueError):
    """Settings under which the evaluation's comparisons would be meaningless."""


ATE_METRICS_OVER = ("observed", "learned")  # evaluate(ate_metrics_over=...): the interventions of the ATE metrics


class EvaluationWarning(UserWarning):
    """Parts of the evaluation left out or to read with care (no control, so no ATEs;
    interventions whose effects are the prior's; no sparse basis). The command line prints
    them as ``warning: ...``."""


def observed_interventions(predictor: Predictor, data: PerturbationData, control_row: np.ndarray):
    """Unique dosage rows of the data's cells, other than the control (the data's control
    cells, all-zero rows, are an intervention when ``control_row`` is another and the data
    have a control label): ``(names, rows [I, T], membership {split: [I] bool}, n_cells
    [I])``. The cells of no split count (e.g. the Norman OOD task's pairs that are neither
    training nor test pairs): the ``all`` scores cover them, as the paper's code, which
    scores every intervention of the data set; ``membership[split]``: a cell of the row is
    in that split; ``n_cells``: all cells with the row (the data ATE's cells);
    ``membership["learned"]``: every member has training cells."""
    rows, inverse, counts = np.unique(data.dosages, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    # with another control, the data's control cells (all-zero rows) too, where the data name them (a control label)
    named = np.any(rows != 0, axis=1) | (predictor.control is not None)
    keep = ~np.all(rows == control_row, axis=1) & named
    # singles before pairs, each in vocabulary order
    keep = sorted(np.nonzero(keep)[0], key=lambda i: (np.count_nonzero(rows[i]), tuple(np.nonzero(rows[i])[0])))
    keep = np.asarray(keep, dtype=np.int64)
    names = [predictor.intervention_name(row) for row in rows[keep]]
    membership = {split: np.isin(keep, np.unique(inverse[data.mask(split)])) for split in SPLITS}
    membership["learned"] = predictor.learned(rows[keep])
    return names, rows[keep], membership, counts[keep]


def check_trained_data(predictor: Predictor, data: PerturbationData, given: bool = False) -> None:
    """:class:`DataError` when the data rebuilt from a run's saved ``config.data`` (or, with
    ``given``, passed as ``evaluate(data=...)``) are not the data it was trained on, judged
    by the metadata saved with the checkpoint (perturbations, cells per split and
    perturbation, normalisation statistics): e.g. a run trained on data passed from Python,
    whose ``config.data`` describes other data, or the right cells split otherwise."""
    saved = predictor.metadata
    differ = training_data_differences(saved, data)
    if differ and given:
        raise DataError(f"the data passed to evaluate (data=) are not the data the run was trained on: "
                        f"{'; '.join(differ)} differ from the checkpoint's metadata. Its split metrics need the "
                        "training data with their split (the same PerturbationData, or the training file, which "
                        "evaluate registers as at training); to score other cells use "
                        "sams_jax.load(workdir).iwelbo(data) and .ate(...)")
    if differ:
        registration = saved.get("registration") or {}
        random_split = registration and not registration.get("split_key")  # every task's split shuffles cells
        order = (" (its random split follows the order of the cells: the same cells in another order are split "
                 "otherwise; a split column, data.split_key, fixes it)") if random_split else ""
        raise DataError(f"the data rebuilt from the run's saved config.data are not the data it was trained on: "
                        f"{'; '.join(differ)} differ from the checkpoint's metadata. A run on a file needs that file "
                        f"as it was{order} (at its saved path, or --data-path NEW); a run trained on data passed from "
                        "Python (train_and_evaluate(config, workdir, data=data)) is evaluated from Python with the "
                        "same data: sams_jax.evaluate.evaluate(workdir, data=data)")


def check_ate_scale(likelihood: str, scale: str) -> None:
    """:class:`EvaluationError` where model and data ATEs on ``scale`` are not comparable
    (or not defined: :func:`~sams_jax.predictor.check_scale`)."""
    try:
        check_scale(likelihood, scale)
    except ValueError as error:
        raise EvaluationError(str(error)) from None
    if scale == "mean" and likelihood in LIBRARY_LIKELIHOODS:
        raise EvaluationError(
            f"ATE scale 'mean' with the {likelihood!r} likelihood would compare the model's expected counts at a "
            "fixed library size of 10,000 (the paper's evaluation) with the data's raw count means at their own "
            "library sizes; use "
            "the 'perturbseq' scale (the default), which scales every cell to 10,000 counts on both sides, or "
            "Predictor.ate(..., scale='mean', library_size=...) for the model's counts alone")


def _registration_summary(data_config) -> str:
    """The registration fields of a saved ``config.data`` that a file must agree with (the
    set ones)."""
    fields = (*LAYOUT_KEYS, "split_key", "task", "use_highly_variable")
    return ", ".join(f"{field}={data_config.get(field)!r}" for field in fields if data_config.get(field))


def _rebuild_data(predictor: Predictor, data_path: str | None) -> PerturbationData:
    """The run's data from its saved ``config.data`` (``data_path`` replacing the file's
    path), checked against the checkpoint's metadata."""
    data_config = ml_collections.ConfigDict(predictor.config.data.to_dict())
    if data_path is not None:
        if data_config.source != "anndata":
            raise EvaluationError(f"--data-path (data_path=) replaces the path of a run trained on a file; this "
                                  f"run's data are data.source={data_config.source!r}, rebuilt from its config")
        data_config.path = str(data_path)
    # display names come from the checkpoint (predictor.feature_symbols): a file without the column still registers
    data_config.gene_symbols_key = ""
    if data_config.source == "anndata" and data_config.path and not os.path.exists(data_config.path):
        raise DataError(f"the run's data file {data_config.path!r} does not exist (moved or deleted?); pass its "
                        "new path with --data-path (data_path=)")
    with warnings.catch_warnings():  # the registration's warnings about the data were given at training
        warnings.simplefilter("ignore", DataWarning)
        try:
            data = load_data(data_config, predictor.config.model.likelihood)
        except DataError as error:
            if data_config.source != "anndata":
                raise
            # the registration's own advice (--config.data.<field>=...) is for training: here the file must
            # register as the run's did
            raise DataError(f"{data_config.path!r} does not register as the run's data did (the run's saved "
                            f"config.data: {_registration_summary(data_config)}): {error.args[0]}. Evaluation "
                            "needs the file the run was trained on (--data-path for one that has moved); to score "
                            "other data with this model, register them with sams_jax.load(workdir).register(adata, "
                            "...) (which takes this file's own layout) and pass the result to .iwelbo()") from None
    data.validate(predictor.config.model.likelihood)
    check_trained_data(predictor, data)
    return data


def evaluate(workdir: str, checkpoint: str | int = "best", iwelbo_particles: int = 100, ate_particles: int = 2_500,
             ate_scale: str | None = None, ate_method: str = "paper", control: str | None = None,
             interventions: list[str] | None = None, seed: int = 0, plots: bool = True,
             sparse_basis_restarts: int = 8,
             data=None, data_path: str | None = None,
             write: bool = True, pathways: dict[str, list[str]] | str | None = None,
             ate_metrics_over: str = "observed", verbose: bool = False) -> dict[str, float]:
    """Score a run's checkpoint and write ``<workdir>/eval/`` (see the module docstring);
    ``write=False`` returns the metrics and writes nothing (comparing runs from Python).

    The data are ``data`` (a PerturbationData, or an AnnData or ``.h5ad`` path registered as
    the training data were), or rebuilt from the run's saved ``config.data``; ``data_path``
    replaces its file's path there (a run trained on a file that has moved since). Rebuilt
    data must be those the run was trained on (:func:`check_trained_data`). ``pathways``:
    pathway gene sets (``{name: [genes]}``, or a JSON file of them) for the pathway
    metrics; default: the data file's ``uns["pathways"]`` where it has them.
    ``ate_metrics_over``: the interventions of each split's ATE metrics, ``"observed"``
    (default; SPEC 5, the paper's: every intervention observed in the split) or
    ``"learned"`` (only those whose every member had training cells). ``verbose``: say on
    stderr what is being computed (the command line does)."""
    say = (lambda message: print(message, file=sys.stderr, flush=True)) if verbose else (lambda message: None)
    if ate_metrics_over not in ATE_METRICS_OVER:
        raise EvaluationError(f"ate_metrics_over={ate_metrics_over!r} is not allowed; choose one of "
                              f"{list(ATE_METRICS_OVER)}")
    given = data
    predictor = load(workdir, checkpoint)
    say(f"evaluating {workdir}: checkpoint step {predictor.step} ({checkpoint})")
    from_python = predictor.metadata.get("data_source") == "python"
    registered = bool(predictor.metadata.get("registration"))  # the Python data were registered from an AnnData
    backed = bool(predictor.config.data.get("backed"))  # a file read backed at training is read backed here too
    if data is None and from_python and registered and data_path is not None:
        data = predictor.register_training_data(data_path, backed=backed)  # not in its config.data: registered
    elif data is None:
        try:
            data = _rebuild_data(predictor, data_path)
        except (DataError, EvaluationError):
            if not from_python:
                raise
            source = predictor.config.data.get("source")
            file = " or the .h5ad file they were registered from: --data-path FILE (evaluate(workdir, data_path=" \
                "FILE))" if registered else ""
            raise EvaluationError(f"{workdir} was trained on data passed from Python (train_and_evaluate(config, "
                                  "workdir, data=data)); its saved config.data (data.source="
                                  f"{source!r}) describes other data, not those; evaluate it with the same data: "
                                  f"sams_jax.evaluate.evaluate(workdir, data=data){file}") from None
    elif data_path is not None:
        raise EvaluationError("pass data= or data_path=, not both")
    elif not isinstance(data, PerturbationData):  # an AnnData or .h5ad path: registered as the training data were
        data = predictor.register_training_data(data, backed=backed and isinstance(data, (str, os.PathLike)))
    else:
        check_perturbations(predictor.perturbation_names, data.perturbation_names)
        check_trained_data(predictor, data, given=True)
    check_features(predictor.feature_names, data.feature_names)
    if data_path is not None or isinstance(given, (str, os.PathLike)):  # what settings.json records
        data_description = os.path.abspath(os.fspath(data_path if data_path is not None else given))
    elif given is not None:
        data_description = f"{type(given).__name__} passed from Python ({data.name})"
    else:
        data_description = predictor.config.data.get("path") or f"{data.name} (rebuilt from the saved config.data)"
    control = control or predictor.control
    scale = ate_scale or predictor.default_scale
    check_ate_scale(predictor.config.model.likelihood, scale)
    pathway_vectors, pathway_labels = _pathway_setup(predictor, pathways, data_path)  # a bad file fails here
    # extra names in the vocabulary's form ("B+A" -> "A+B"), each once; unknown names fail here, before any work
    extra = list(dict.fromkeys(predictor.canonical_name(name) for name in interventions or []))
    if control is None:
        skipped = f" (not computed either: {extra})" if extra else ""
        warnings.warn("the model's data have no control label, so there are no ATEs; pass --control <label> "
                      f"(a perturbation to measure the others against) to compute them{skipped}",
                      EvaluationWarning, stacklevel=2)
    else:
        control_row = predictor.control_dosage(control)
        if not np.all(data.dosages == control_row, axis=1).any():
            raise DataError(f"no cells of the control {control!r} in the data; ATEs need control cells "
                            "(pass --control with a label present in the data)")
        as_control = [name for name in extra if np.array_equal(predictor.control_dosage(name), control_row)]
        if as_control:
            warnings.warn(f"--interventions {as_control} is the control {control!r}, whose ATE is 0 by definition; "
                          "left out", EvaluationWarning, stacklevel=2)
            extra = [name for name in extra if name not in as_control]

    results: dict[str, float] = {}
    cells = ", ".join(f"{int(data.mask(split).sum()):,} {split}" for split in SPLITS if data.mask(split).any())
    say(f"IWELBO per split: {cells} cells x {iwelbo_particles} particles")
    per_cell = {split: predictor.iwelbo(data, iwelbo_particles, seed, split=split)
                for split in SPLITS if data.mask(split).any()}
    for split, values in per_cell.items():
        results[f"IWELBO-{split}"] = float(values.mean())
    results["IWELBO-all"] = float(np.concatenate(list(per_cell.values())).mean())

    ate = None
    if control is not None:
        names, rows, membership, n_cells = observed_interventions(predictor, data, control_row)
        extra = [e for e in extra if e not in names]
        all_names = [control, *names, *extra]
        say(f"ATEs: {len(names) + len(extra)} interventions x {ate_particles} particles ({ate_method} estimator, "
            f"{scale} scale, control {control!r})")
        model_means = predictor.expectations([control, *names], n_particles=ate_particles, scale=scale,
                                             method=ate_method, seed=seed)
        model_ate = model_means[1:] - model_means[0]
        if extra:  # a call of their own, each with its own control estimate: the observed scores stay the same
            # (crn: the same random numbers as the observed interventions; paper: independent ones)
            extra_means = predictor.expectations([control, *extra], n_particles=ate_particles, scale=scale,
                                                 method=ate_method, seed=seed, stream=0 if ate_method == "crn" else 1)
            model_ate = np.concatenate([model_ate, extra_means[1:] - extra_means[0]])
        data_means = data_expectations(data.x, data.dosages, np.concatenate([control_row[None], rows]), scale)
        data_ate = data_means[1:] - data_means[0]
        n_observed = len(names)
        scored = membership["learned"] if ate_metrics_over == "learned" else np.ones(n_observed, bool)
        if ate_metrics_over == "observed" and not membership["learned"].all():
            unlearned_observed = [name for name, learned in zip(names, membership["learned"]) if not learned]
            more = " ..." if len(unlearned_observed) > 10 else ""
            warnings.warn(f"observed interventions {unlearned_observed[:10]}{more} ({len(unlearned_observed)} in all) "
                          "have members without training "
                          "cells: their model ATEs are the prior's, and they count in the ATE metrics as in the "
                          "paper (SPEC 5); --ate-metrics-over learned (ate_metrics_over='learned') leaves them out",
                          EvaluationWarning, stacklevel=2)
        for split in ("all", *SPLITS):
            member = scored & membership.get(split, np.ones(n_observed, bool))
            if not member.any():
                continue
            agreement = metrics_lib.ate_agreement(data_ate[member], model_ate[:n_observed][member], TOP_K)
            agreement.update(metrics_lib.perturbench_metrics(
                data_means[1:][member], model_means[1:n_observed + 1][member], data_ate[member],
                model_ate[:n_observed][member]))
            results.update({f"{name}-{split}": value for name, value in agreement.items()})
        with warnings.catch_warnings():  # expectations() has warned about these names already
            warnings.simplefilter("ignore", InterventionWarning)
            all_rows = np.concatenate([rows, predictor.dosages(extra)]) if extra else rows  # [I, T]
        # the observed rows' learned flags come with membership; the extras' are computed here
        is_learned = np.concatenate([membership["learned"], predictor.learned(all_rows[n_observed:])])
        seen = predictor.seen_in_training(all_rows)
        unlearned = [name for name, learned in zip(all_names[1 + n_observed:], is_learned[n_observed:]) if not learned]
        if unlearned:
            warnings.warn(f"interventions {unlearned} have members without training cells; their effects are the "
                          "prior's, not learned (learned=False in ate.h5ad)", EvaluationWarning, stacklevel=2)
        ate = (all_names[1:], n_observed, membership, n_cells, is_learned, seen, model_ate, data_ate, scored)

    if data.truth is not None and "mask" in data.truth and hasattr(predictor.model, "mask_probs"):
        results.update(metrics_lib.mask_scores(data.truth["mask"], predictor.mask_probs().to_numpy() > 0.5))
    if data.truth is not None and "z_basal" in data.truth:  # every model has a basal (or local) latent
        test = data.mask("test")
        results["mcc"] = metrics_lib.mean_correlation_coefficient(
            data.truth["z_basal"][test], predictor.latent(data, seed=seed, split="test"))

    basis = _sparse_basis(predictor, seed, sparse_basis_restarts, say)
    if data.truth is not None and "mask" in data.truth and hasattr(predictor.model, "embedding_means"):
        scores = metrics_lib.mask_scores(data.truth["mask"], basis.mask.to_numpy()) if basis is not None else \
            dict.fromkeys(("mask_precision", "mask_recall", "mask_f1"), float("nan"))  # skipped: null, not left out
        results.update({f"sparse_basis_{name.removeprefix('mask_')}": value for name, value in scores.items()})

    if pathway_labels is not None:
        for name, frame in pathway_vectors.items():
            scores = metrics_lib.pathway_grouping(frame.to_numpy(), pathway_labels)
            results.update({f"pathway_{name}_{key}": value for key, value in scores.items()})

    results = {k: results[k] for k in sorted(results)}
    if not write:
        return results
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    for name in OUTPUTS:  # no file of an earlier evaluation stays to contradict this one
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    if basis is not None:
        basis.effects.to_csv(os.path.join(out_dir, "sparse_effects.csv"))
        pd.DataFrame(basis.weights, index=pd.Index(predictor.embeddings().columns, name="latent"),
                     columns=basis.effects.columns).to_csv(os.path.join(out_dir, "sparse_basis.csv"))
    metrics_lib.write_json(os.path.join(out_dir, "metrics.json"), results)
    metrics_lib.write_json(os.path.join(out_dir, "settings.json"), {
        "workdir": os.path.abspath(workdir), "checkpoint": str(checkpoint), "checkpoint_step": predictor.step,
        "data": data_description, "iwelbo_particles": iwelbo_particles, "ate_particles": ate_particles,
        "ate_method": ate_method, "ate_scale": scale, "control": control, "interventions": extra,
        "ate_metrics_over": ate_metrics_over, "seed": seed, "sparse_basis_restarts": sparse_basis_restarts,
        "pathways": (os.fspath(pathways) if isinstance(pathways, (str, os.PathLike)) else "given from Python"
                     if pathways else "the data file's uns['pathways']" if pathway_labels is not None else None),
        "sams_jax_version": sams_jax_version, "evaluated_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    pd.Series(results, name="value").rename_axis("metric").to_csv(os.path.join(out_dir, "metrics.csv"))
    if ate is not None:
        _write_ate(out_dir, predictor, *ate, control, scale, ate_method, ate_particles, ate_metrics_over)
    if plots:
        no_ate = ([], 0, {}, [], np.zeros(0, bool), None, [], [], np.zeros(0, bool))
        _, n_observed, _, _, _, _, model_ate, data_ate, scored = ate or no_ate  # scored: those of the ATE metrics
        _write_plots(out_dir, workdir, predictor, np.asarray(data_ate)[scored],
                     np.asarray(model_ate)[:n_observed][scored], basis,
                     f"checkpoint step {predictor.step}, control {control!r}, {scale} scale, {ate_method} "
                     f"estimator, {ate_particles:,} particles, Pearson r {results.get('ATE_pearsonr-all', np.nan):.3f}",
                     data.truth["mask"].mean() if data.truth is not None and "mask" in data.truth else None)
        if pathway_labels is not None:
            from sams_jax import plots as plots_lib

            name = "embedding" if "embedding" in pathway_vectors else "mask"
            purity = results.get(f"pathway_{name}_knn_purity", np.nan)
            chance = results.get(f"pathway_{name}_knn_chance", np.nan)
            plots_lib.plot_pathway_similarity(
                pathway_vectors[name], pathway_labels, os.path.join(out_dir, "pathways.png"),
                f"{'Embedding means' if name == 'embedding' else 'Mask probabilities'}: cosine similarity of the "
                f"pathways' perturbations; 5-nearest-neighbour purity {purity:.2f} (chance {chance:.2f})")
    say(f"wrote {out_dir}{os.sep}: {', '.join(name for name in OUTPUTS if os.path.exists(os.path.join(out_dir, name)))}")
    return results


def _pathway_setup(predictor: Predictor, pathways, data_path: str | None):
    """``(vectors {"mask" | "embedding": [P, K] frame}, labels [P] or None)`` of the pathway
    metrics: ``labels`` from :func:`sams_jax.metrics.pathway_labels` for the perturbations
    with training cells, None without pathway gene sets (given, from a JSON file, or the
    data file's ``uns["pathways"]``) or without grouped perturbations."""
    given = pathways is not None
    if isinstance(pathways, (str, os.PathLike)):
        try:
            with open(pathways) as handle:
                pathways = json.load(handle)
        except (OSError, ValueError) as error:
            raise EvaluationError(f"--pathways {os.fspath(pathways)!r}: {error}; give a JSON file of "
                                  '{"pathway": ["GENE1", "GENE2", ...], ...}') from None
    if pathways is None:
        path = data_path or (predictor.config.data.get("path") if predictor.config.data.get("source") == "anndata"
                             else None)
        try:
            pathways = read_uns(path, "pathways") if path and os.path.isfile(path) else None
        except DataError as error:  # an optional part of the evaluation: said, then left out
            warnings.warn(f"{error}; no pathway metrics", EvaluationWarning, stacklevel=3)
            pathways = None
        if pathways is None:
            return {}, None
    if not isinstance(pathways, dict) or not all(np.ndim(genes) == 1 for genes in pathways.values()):
        raise EvaluationError("pathway gene sets must map each pathway to a list of genes, "
                              '{"pathway": ["GENE1", "GENE2", ...], ...}')
    pathways = {str(name): [str(gene) for gene in genes] for name, genes in pathways.items()}
    vectors = {}
    if hasattr(predictor.model, "mask_probs"):
        vectors["mask"] = predictor.mask_probs()
    if hasattr(predictor.model, "embedding_means"):
        vectors["embedding"] = predictor.embeddings()
    if not vectors:
        if given:
            warnings.warn(f"model {predictor.config.model.name!r} has no masks or embeddings to group by pathway; "
                          "no pathway metrics", EvaluationWarning, stacklevel=3)
        return {}, None
    shared = sorted(gene for gene, n in Counter(g for members in pathways.values() for g in members).items() if n > 1)
    if shared:
        warnings.warn(f"{len(shared)} genes are in several pathway gene sets, e.g. {shared[:5]}; each counts for the "
                      "first set naming it", EvaluationWarning, stacklevel=3)
    # perturbations never trained on keep the prior's vectors: left out
    labels = metrics_lib.pathway_labels(predictor.perturbation_names, pathways,
                                        keep=predictor.learned(predictor.perturbation_names))
    if len(set(labels) - {""}) < 2:
        known = set(predictor.perturbation_names) | set(map(metrics_lib.perturbation_gene, predictor.perturbation_names))
        genes = list(dict.fromkeys(gene for members in pathways.values() for gene in members))
        unmatched = [gene for gene in genes if gene not in known]
        hint = (f" ({len(unmatched)} of the {len(genes)} genes in the sets name no perturbation of the model, e.g. "
                f"{unmatched[:10]}: a typo, or other gene identifiers than the perturbations' names)") if unmatched else ""
        warnings.warn(f"fewer than two of the {len(pathways)} pathway gene sets have two or more trained perturbations "
                      f"among the model's{hint}; no pathway metrics", EvaluationWarning, stacklevel=3)
        return vectors, None
    return vectors, labels


def _sparse_basis(predictor: Predictor, seed: int, n_restarts: int, say=lambda message: None):
    """The sparse basis of the model's shifts (``sams_jax.basis``), or None when
    ``n_restarts`` is 0, for models without embeddings and for shift matrices of rank < K
    (a warning says why)."""
    if n_restarts < 1 or not hasattr(predictor.model, "embedding_means"):
        return None
    n_perturbations, n_latent = predictor.embeddings().shape  # [T, K]
    if n_perturbations < n_latent:  # rank < K for certain
        warnings.warn(f"no sparse basis: the model has K = {n_latent} latent dimensions and only "
                      f"{n_perturbations} perturbations, and a sparse basis of the latent space needs at least K "
                      f"(rank K); train with --config.model.n_latent={n_perturbations} or fewer for one, or pass "
                      "--sparse-basis-restarts 0 to skip it", EvaluationWarning, stacklevel=3)
        return None
    say(f"sparse basis: {n_restarts} restarts")
    try:
        return predictor.sparse_basis(n_restarts=n_restarts, seed=seed)
    except ValueError as error:
        warnings.warn(f"no sparse basis: {error}", EvaluationWarning, stacklevel=3)
        return None


def _write_ate(out_dir, predictor, names, n_observed, membership, n_cells, learned, seen, model_ate, data_ate,
               scored, control, scale, method, n_particles, metrics_over) -> None:
    import anndata

    n = len(names)
    pad = lambda values, fill: np.concatenate([values, np.full(n - n_observed, fill, values.dtype)])
    obs = pd.DataFrame({"observed": pad(np.ones(n_observed, bool), False), "n_cells": pad(n_cells, 0),
                        **{f"in_{split}": pad(membership[split], False) for split in SPLITS},
                        "learned": learned,
                        **({} if seen is None else {"seen_in_training": seen}),
                        "in_metrics": pad(np.asarray(scored, bool), False)},
                       index=pd.Index(names, name="intervention", dtype=object))
    data_layer = np.full(model_ate.shape, np.nan, np.float32)
    data_layer[:n_observed] = data_ate
    result = anndata.AnnData(X=model_ate.astype(np.float32), obs=obs,
                             var=predictor.gene_table(),
                             layers={"model": model_ate.astype(np.float32), "data": data_layer})
    result.uns.update(control=control, scale=scale, method=method, n_particles=n_particles,
                      ate_metrics_over=metrics_over, checkpoint_step=predictor.step)
    write_h5ad(result, os.path.join(out_dir, "ate.h5ad"))
    top_genes(result).to_csv(os.path.join(out_dir, "top_genes.csv"), index=False)


def top_genes(ate, n: int = TOP_GENES) -> pd.DataFrame:
    """The ``n`` genes of largest |model ATE| per intervention, in that order: one row per
    intervention and gene with ``rank`` (1 = largest), ``gene`` (and ``gene_symbol`` where
    the data had them), ``model_ate``, ``data_ate`` (NaN where the intervention was not
    observed) and ``learned``. ``ate``: an ``ate.h5ad`` (layers ``model`` and ``data``) or
    what ``Predictor.ate`` returns (the model's ATEs in ``X``; no data ATEs)."""
    model = np.asarray(ate.layers["model"] if "model" in ate.layers else ate.X)
    data = np.asarray(ate.layers["data"]) if "data" in ate.layers else np.full(model.shape, np.nan, np.float32)
    n = min(n, model.shape[1])
    order = np.argsort(-np.abs(model), axis=1, kind="stable")[:, :n]  # [I, n]
    rows = np.repeat(np.arange(model.shape[0]), n)
    genes = order.reshape(-1)
    table = {"intervention": np.asarray(ate.obs_names)[rows], "rank": np.tile(np.arange(1, n + 1), model.shape[0]),
             "gene": np.asarray(ate.var_names)[genes]}
    if "gene_symbol" in ate.var:
        table["gene_symbol"] = ate.var["gene_symbol"].to_numpy()[genes]
    table.update(model_ate=model[rows, genes], data_ate=data[rows, genes],
                 learned=ate.obs["learned"].to_numpy()[rows])
    return pd.DataFrame(table)


def _write_plots(out_dir, workdir, predictor, data_ate, model_ate, basis=None, ate_settings: str = "",
                 true_mask_density: float | None = None) -> None:
    """The evaluation's PNGs; ``ate_settings`` completes the ATE scatter's title. The
    heatmaps show the perturbations in one order: by the similarity of their expected
    latent shifts (:meth:`Predictor.shifts`; the mask probabilities for a model without
    embeddings)."""
    from sams_jax import plots

    history_path = os.path.join(workdir, "history.csv")
    if os.path.exists(history_path):
        plots.plot_history(pd.read_csv(history_path), os.path.join(out_dir, "history.png"),
                           predictor.config.objective.get("kind", "elbo"), true_mask_density)
    if len(data_ate):
        plots.plot_ate_scatter(data_ate, model_ate, metrics_lib.top_k_genes(data_ate, TOP_K),
                               os.path.join(out_dir, "ate_scatter.png"),
                               f"Model vs data ATE of {len(data_ate)} interventions ({ate_settings})",
                               top_label=f"top-{TOP_K} genes by |data ATE|")
    has_mask, has_embeddings = hasattr(predictor.model, "mask_probs"), hasattr(predictor.model, "embedding_means")
    if not (has_mask or has_embeddings):
        return
    rows, note = plots.heatmap_rows(predictor.shifts() if has_embeddings else predictor.mask_probs(),
                                    measure="expected shift" if has_embeddings else "q(mask = 1)")
    order = f"rows ordered by the similarity of the {'expected shifts' if has_embeddings else 'mask probabilities'}"
    rows = (rows, f"{note}, {order}" if note else order)
    if has_mask:
        plots.plot_heatmap(predictor.mask_probs(), os.path.join(out_dir, "mask_probs.png"),
                           "Which latent dimensions each perturbation moves: q(mask = 1)", cmap="Greys",
                           value_range=(0.0, 1.0), value_label="probability the mask is on", rows=rows)
    if has_embeddings:
        plots.plot_heatmap(predictor.embeddings(), os.path.join(out_dir, "embeddings.png"),
                           "Embedding means: each perturbation's latent shift where its mask is on", cmap="RdBu_r",
                           center=True, value_label="latent shift", rows=rows)
    if basis is not None:
        plots.plot_heatmap(basis.effects, os.path.join(out_dir, "sparse_effects.png"),
                           f"Shifts in the sparse basis; dots: |shift|\u00a0>\u00a0{basis.threshold:.2f}", cmap="RdBu_r",
                           center=True, xlabel="sparse basis dimension", marked=basis.mask, value_label="latent shift",
                           rows=rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sams_jax.evaluate",
                                     description="Evaluate a trained run from its checkpoint: held-out IWELBO, ATEs "
                                     "and their metrics, plots, written to <workdir>/eval/ (README: 'Evaluation').")
    parser.add_argument("--workdir", required=True, help="the training run's --workdir")
    parser.add_argument("--checkpoint", default="best", help="best (default), latest, or a step number")
    parser.add_argument("--data-path", default=None,
                        help="the training data file's path, where it has moved since training (default: the path "
                             "saved with the checkpoint); it must hold the same data")
    parser.add_argument("--iwelbo-particles", type=int, default=100, help="particles per cell of the held-out "
                        "IWELBO (default: %(default)s)")
    parser.add_argument("--ate-particles", type=int, default=2_500, help="particles per intervention of the model "
                        "ATEs (default: %(default)s)")
    parser.add_argument("--ate-scale", choices=["mean", "perturbseq"], default=None,
                        help="default: perturbseq for count likelihoods, mean otherwise")
    parser.add_argument("--ate-method", choices=["paper", "crn"], default="paper",
                        help="paper (default): independent draws per intervention; crn: common random numbers")
    parser.add_argument("--ate-metrics-over", choices=ATE_METRICS_OVER, default="observed",
                        help="the interventions of each split's ATE metrics: observed (default; SPEC 5, the "
                             "paper's: every intervention observed in the split) or learned (only those whose every "
                             "member had training cells; the others' model ATEs are the prior's)")
    parser.add_argument("--control", default=None, help="control label (default: the data's)")
    parser.add_argument("--interventions", default="",
                        help="extra interventions to predict, comma-separated, e.g. 'A,B+C'")
    parser.add_argument("--seed", type=int, default=0, help="seed of the IWELBO and ATE draws (default: %(default)s)")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    parser.add_argument("--sparse-basis-restarts", type=int, default=8,
                        help="starts of the sparse-basis fit (sams_jax.basis); 0 skips it (about 1 s at K = 15, "
                             "17 s at K = 100 on a 2-core CPU)")
    parser.add_argument("--pathways", default=None, metavar="FILE.json",
                        help="pathway gene sets, {\"pathway\": [\"GENE1\", ...], ...}, for the pathway metrics "
                             "(default: the data file's uns['pathways'] where it has them)")
    args = parser.parse_args(argv)
    from absl import logging

    from sams_jax.train import cli_format_warning

    logging.set_verbosity(logging.ERROR)  # Orbax notes at WARNING that a read-only checkpointer saves nothing
    warnings.formatwarning = cli_format_warning
    for name in ("iwelbo_particles", "ate_particles"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.sparse_basis_restarts < 0:
        parser.error("--sparse-basis-restarts must be >= 0 (0 skips the sparse basis)")
    extra = [item.strip() for item in args.interventions.split(",") if item.strip()]
    try:
        results = evaluate(args.workdir, args.checkpoint, args.iwelbo_particles, args.ate_particles, args.ate_scale,
                           args.ate_method, args.control, extra, args.seed, plots=not args.no_plots,
                           sparse_basis_restarts=args.sparse_basis_restarts, data_path=args.data_path,
                           pathways=args.pathways, ate_metrics_over=args.ate_metrics_over, verbose=True)
    except (CheckpointError, FileNotFoundError, DataError, InterventionError, EvaluationError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(metrics_lib.json_safe(results), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
