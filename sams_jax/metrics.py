"""Metrics, one implementation each (used by training, evaluation, experiments, tests).

Mask recovery (SPEC 5): latent dimensions are identifiable only up to permutation, so
learned dimensions are matched to true ones by the assignment that maximises true
positives (Hungarian algorithm on the ``K_true x K_learned`` overlap matrix).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def match_dimensions(true_mask: np.ndarray, learned_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(true_dims, learned_dims)`` maximising the summed overlap
    ``sum_t true_mask[t, a] * learned_mask[t, b]`` (``[T, K_true]``, ``[T, K_learned]``)."""
    overlap = true_mask.astype(np.float64).T @ learned_mask.astype(np.float64)  # [K_true, K_learned]
    return linear_sum_assignment(overlap, maximize=True)


def mask_scores(true_mask: np.ndarray, learned_mask: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of a binary learned mask after Hungarian matching.

    true_mask ``[T, K_true]``, learned_mask ``[T, K_learned]`` (0/1 or bool). Learned
    dimensions left unmatched (when ``K_learned > K_true``) count as false positives.
    """
    true_mask = np.asarray(true_mask).astype(bool)
    learned_mask = np.asarray(learned_mask).astype(bool)
    if true_mask.shape[0] != learned_mask.shape[0]:
        raise ValueError(f"masks cover different perturbations: {true_mask.shape} vs {learned_mask.shape}")
    true_dims, learned_dims = match_dimensions(true_mask, learned_mask)
    true_positive = float((true_mask[:, true_dims] & learned_mask[:, learned_dims]).sum())
    n_learned, n_true = float(learned_mask.sum()), float(true_mask.sum())
    precision = true_positive / n_learned if n_learned else 0.0
    recall = true_positive / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"mask_precision": precision, "mask_recall": recall, "mask_f1": f1}


# --- agreement between model and data ATEs (SPEC 5) -------------------------------------

def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two flattened arrays (NaN entries of either are dropped)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def r2(truth: np.ndarray, prediction: np.ndarray) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` with ``truth`` (the data ATE)
    as the reference, on flattened arrays (as ``sklearn.metrics.r2_score``)."""
    t, p = np.asarray(truth, np.float64).ravel(), np.asarray(prediction, np.float64).ravel()
    keep = np.isfinite(t) & np.isfinite(p)
    t, p = t[keep], p[keep]
    total = ((t - t.mean()) ** 2).sum()
    return float(1.0 - ((t - p) ** 2).sum() / total) if total > 0 else float("nan")


def top_k_genes(data_ate: np.ndarray, k: int = 20) -> np.ndarray:
    """``[I, G]`` boolean mask of the ``k`` genes with the largest ``|data ATE|`` per row."""
    order = np.argsort(-np.abs(np.nan_to_num(data_ate)), axis=1)[:, :k]
    mask = np.zeros(data_ate.shape, bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def ate_agreement(data_ate: np.ndarray, model_ate: np.ndarray, k: int = 20) -> dict[str, float]:
    """Pearson r and R^2 between flattened data and model ATEs (``[I, G]`` each), overall
    and on each intervention's top-``k`` genes by ``|data ATE|``."""
    top = top_k_genes(data_ate, k)
    return {
        "ATE_pearsonr": pearson(data_ate, model_ate),
        "ATE_r2": r2(data_ate, model_ate),
        f"ATE_pearsonr_top{k}": pearson(data_ate[top], model_ate[top]),
        f"ATE_r2_top{k}": r2(data_ate[top], model_ate[top]),
    }


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # [I, G], [J, G] -> [I, J]
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def _rmse_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # [I, G], [J, G] -> [I, J]
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0) / a.shape[1])


def _mean_rank(scores: np.ndarray, higher_is_better: bool) -> float:
    """For each row ``i`` of the ``[I, I]`` prediction-vs-observation score matrix, the
    fraction of other observations that match prediction ``i`` better than observation
    ``i`` does; averaged. 0 is perfect, about 0.5 is chance; NaN (undefined) for fewer
    than two interventions, which leave nothing to rank against."""
    scores = scores if higher_is_better else -scores
    own = np.diag(scores)[:, None]
    n = scores.shape[0]
    return float(((scores > own).sum(1) / (n - 1)).mean()) if n > 1 else float("nan")


def perturbench_metrics(data_mean: np.ndarray, model_mean: np.ndarray, data_ate: np.ndarray,
                        model_ate: np.ndarray) -> dict[str, float]:
    """PerturBench-style metrics over interventions (rows; NaN rows are dropped):

    * ``cosine_logfc``: mean cosine similarity of predicted and observed effects (ATEs on
      the evaluation's scale: log fold changes on the ``perturbseq`` scale, differences of
      means on the ``mean`` scale), and ``cosine_logfc_rank``;
    * ``rmse_average``: mean RMSE between predicted and observed average expression per
      intervention, and ``rmse_rank``.

    Rank variants: how often another intervention's observation is closer to the
    prediction than the intervention's own (0 = perfect, 0.5 = chance).
    """
    keep = np.all(np.isfinite(data_mean), axis=1) & np.all(np.isfinite(data_ate), axis=1)
    data_mean, model_mean, data_ate, model_ate = data_mean[keep], model_mean[keep], data_ate[keep], model_ate[keep]
    if not keep.any():
        return {}
    cosine = cosine_similarity(model_ate, data_ate)
    rmse = _rmse_matrix(model_mean, data_mean)
    return {
        "cosine_logfc": float(np.diag(cosine).mean()),
        "cosine_logfc_rank": _mean_rank(cosine, higher_is_better=True),
        "rmse_average": float(np.diag(rmse).mean()),
        "rmse_rank": _mean_rank(rmse, higher_is_better=False),
    }


def mean_correlation_coefficient(true_latents: np.ndarray, learned_latents: np.ndarray) -> float:
    """Mean absolute Pearson correlation between true and learned latent dimensions after
    Hungarian matching (``[n, K_true]``, ``[n, K_learned]``)."""
    k_true = true_latents.shape[1]
    corr = np.corrcoef(true_latents.T, learned_latents.T)[:k_true, k_true:]
    corr = np.abs(np.nan_to_num(corr))
    rows, cols = linear_sum_assignment(corr, maximize=True)
    return float(corr[rows, cols].mean())


def pathway_labels(perturbation_names, pathways: dict, keep: np.ndarray | None = None) -> np.ndarray:
    """``[P]`` the pathway of each perturbation (``""``: none), for the pathways with at least
    two perturbations among those ``keep`` (``[P]`` bool; default all) holds (the others'
    are ``""`` too: nothing to group). ``pathways`` maps a
    pathway to its genes (a gene in several: the first); a perturbation is a gene's when it
    is named by the gene, or by a guide-pair ID that starts with the gene and ``_``
    (Replogle's ``sgID_AB``, ``"AARS_+_70323216.23-P1P2|..."``; a gene's guide pairs are
    each a perturbation of its pathway)."""
    pathway_of: dict[str, str] = {}
    for name, genes in pathways.items():
        for gene in genes:
            pathway_of.setdefault(str(gene), str(name))
    labels = np.asarray([pathway_of.get(str(p), pathway_of.get(perturbation_gene(p), "")) for p in perturbation_names],
                        dtype=object)
    if keep is not None:
        labels[~np.asarray(keep, bool)] = ""
    labels[~_in_groups(labels)] = ""
    return labels


def perturbation_gene(name) -> str:
    """The gene a perturbation name points to besides its own name (:func:`pathway_labels`):
    the part before the first ``_`` of a guide-pair ID (``"AARS_+_70323216.23-P1P2|..."``)."""
    return str(name).split("_")[0]


def _in_groups(labels: np.ndarray) -> np.ndarray:  # [P] str -> [P] bool: in a pathway of two or more
    names, sizes = np.unique(labels[labels != ""], return_counts=True)
    return np.isin(labels, names[sizes >= 2])


def pathway_grouping(vectors: np.ndarray, labels: np.ndarray, k: int = 5) -> dict[str, float]:
    """How well per-perturbation vectors (``[P, K]``: mask probabilities, embeddings) group
    the perturbations of one pathway (``labels`` ``[P]``, ``""``: in no pathway, left out;
    :func:`pathway_labels`). Over the perturbations of pathways with at least two of them,
    by cosine similarity:

    * ``knn_purity``: the fraction of each one's ``k`` nearest others of the same pathway,
      averaged; ``knn_chance`` the same for random neighbours (the pathways' sizes alone);
    * ``within_cosine`` and ``between_cosine``: mean similarity of pairs of one pathway and
      of pairs of two.
    NaN where fewer than two pathways qualify."""
    labels = np.asarray(labels, dtype=object)
    keep = _in_groups(labels)
    nan = dict.fromkeys(("knn_purity", "knn_chance", "within_cosine", "between_cosine"), float("nan"))
    if len(np.unique(labels[keep])) < 2:
        return nan
    vectors, labels = np.asarray(vectors, np.float64)[keep], labels[keep]
    n = len(labels)
    cosine = cosine_similarity(vectors, vectors)
    same = labels[:, None] == labels[None, :]
    others = ~np.eye(n, dtype=bool)
    k = min(k, n - 1)
    nearest = np.argsort(np.where(others, -cosine, np.inf), axis=1, kind="stable")[:, :k]  # [n, k]
    return {
        "knn_purity": float(np.take_along_axis(same, nearest, axis=1).mean()),
        "knn_chance": float(((same & others).sum(1) / (n - 1)).mean()),
        "within_cosine": float(cosine[same & others].mean()),
        "between_cosine": float(cosine[~same].mean()),
    }


# --- files ------------------------------------------------------------------------------
def json_safe(value):
    """``value`` (nested dicts / lists of numbers) for strict JSON: an undefined score (NaN,
    e.g. a correlation over a split without interventions) or an infinite one becomes
    ``None`` (``null``), numpy scalars become Python numbers. Python's ``json`` would write
    ``NaN``, which stricter readers (``jq``, JavaScript, most other languages) reject."""
    import math

    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str, scores: dict) -> None:
    """Write ``scores`` (metric name -> number) to ``path`` as strict JSON (:func:`json_safe`),
    keys sorted."""
    import json

    with open(path, "w") as handle:
        json.dump(json_safe(scores), handle, indent=2, sort_keys=True, allow_nan=False)
