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
