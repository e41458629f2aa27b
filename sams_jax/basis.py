"""The sparse latent basis: read a trained model's perturbation effects in the linear basis
of its latent space in which they are sparsest.

The likelihood of SAMS-VAE and its relatives sees the latent space only through the
decoder, so a model whose latent frame is an invertible linear map of the true one
explains the data as well; the Normal priors on ``z_basal`` and on the embeddings do not
prefer either frame, and the mask prior prefers the axis-aligned one only weakly (README,
"Sparse masks"). After the paper's 20,000 steps on its default simulation, the learned
per-perturbation shifts are a linear map of the true sparse shifts, but the map is not a
permutation, so ``q(mask)`` is dense.

:func:`fit_sparse_basis` undoes that map without knowing the truth. Given the expected
shift matrix ``S`` (``[T, K]``: perturbations x latent dimensions), it finds an
invertible ``W`` (``[K, K]``) that makes ``S @ W`` sparse, as independent component
analysis with a Laplace source density does::

    minimise over W:   (1 / T) * sum_{t,k} sqrt((S W)[t, k]^2 + smoothing) - log |det W|

(the log-determinant keeps ``W`` invertible; ``S`` is first divided by its root mean
square so that ``smoothing`` is relative). Several starts (the identity, then random
orthogonal matrices) are run with L-BFGS and the best objective is kept. The columns of
``W`` are then scaled to unit norm, so every new coordinate ``z @ W[:, k]`` has unit
variance under the ``N(0, I)`` prior of ``z_basal``, signed so that the largest effect on
it is positive, and ordered to match the original dimensions where they already agree
(Hungarian matching on ``|W|``; a model whose shifts are already sparse keeps its frame).
An entry of the mask in the new basis is on when ``|(S W)[t, k]|`` exceeds a threshold,
by default Otsu's: the split of all ``|S W|`` values into two groups with the largest
between-group variance.

The basis is an interpretation of a trained model, not a change to it: predictions,
IWELBO and ATEs do not depend on it. Latent states map into it with
:meth:`SparseBasis.transform` (``z @ W``), so that ``z_basal`` and the shifts stay in one
frame.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment, minimize

RANK_TOLERANCE = 1e-6  # singular values below this fraction of the largest count as zero


@dataclasses.dataclass(frozen=True)
class SparseBasis:
    """A sparse basis of a latent space.

    ``weights``: ``[K, K]`` matrix ``W`` with unit-norm columns (new coordinates ``z @ W``);
    ``effects``: ``[T, K]`` shifts in the new basis (``shifts @ W``), rows named by
    perturbation, columns ``basis_<k>``; ``mask``: ``[T, K]`` booleans ``|effects| >
    threshold``; ``objective``: the minimised value (lower is sparser).
    """

    weights: np.ndarray
    effects: pd.DataFrame
    mask: pd.DataFrame
    threshold: float
    objective: float

    def transform(self, latents: np.ndarray) -> np.ndarray:
        """Latent states ``[n, K]`` (e.g. ``Predictor.latent``) in the sparse basis."""
        latents = np.asarray(latents)
        if latents.shape[-1] != self.weights.shape[0]:
            raise ValueError(f"latents have {latents.shape[-1]} dimensions; the basis has {self.weights.shape[0]}")
        return latents @ self.weights


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of a 1-D sample: the cut between two sorted neighbours that
    maximises the between-group variance ``n_low * n_high * (mean_high - mean_low)^2``."""
    v = np.sort(np.asarray(values, np.float64).ravel())
    if v.size < 2 or v[0] == v[-1]:
        raise ValueError(f"Otsu's threshold needs at least two distinct values; got {v.size} values")
    n = np.arange(1, v.size)  # size of the low group for each cut
    low_sum = np.cumsum(v)[:-1]
    low_mean = low_sum / n
    high_mean = (v.sum() - low_sum) / (v.size - n)
    score = n * (v.size - n) * (high_mean - low_mean) ** 2
    score[v[1:] == v[:-1]] = -np.inf  # a cut must fall between distinct values
    cut = int(np.argmax(score))
    return float((v[cut] + v[cut + 1]) / 2)


def _objective(shifts: np.ndarray, smoothing: float):
    t, k = shifts.shape

    def value_and_grad(flat):
        weights = flat.reshape(k, k)
        sign, logdet = np.linalg.slogdet(weights)
        if sign == 0:
            return np.inf, np.zeros_like(flat)
        projected = shifts @ weights
        smooth_abs = np.sqrt(projected ** 2 + smoothing)
        value = smooth_abs.sum() / t - logdet
        grad = shifts.T @ (projected / smooth_abs) / t - np.linalg.inv(weights).T
        return value, grad.ravel()

    return value_and_grad


def fit_sparse_basis(shifts, n_restarts: int = 8, seed: int = 0, smoothing: float = 1e-2,
                     threshold: float | None = None, max_iter: int = 5_000) -> SparseBasis:
    """Fit the sparse basis of a shift matrix (module docstring).

    ``shifts``: ``[T, K]`` array or DataFrame (rows = perturbations) of expected
    per-perturbation latent shifts, e.g. ``E[embedding] * q(mask)``; needs rank ``K``.
    ``threshold``: the ``|effect|`` above which an entry is on (default: Otsu's).
    Deterministic given ``seed``.
    """
    frame = shifts if isinstance(shifts, pd.DataFrame) else pd.DataFrame(np.asarray(shifts))
    values = frame.to_numpy(np.float64)
    if values.ndim != 2 or not np.isfinite(values).all():
        raise ValueError(f"shifts must be a finite [T, K] matrix; got shape {values.shape}")
    t, k = values.shape
    singular = np.linalg.svd(values, compute_uv=False)
    rank = int((singular > RANK_TOLERANCE * singular.max()).sum()) if singular.size and singular.max() > 0 else 0
    if rank < k:
        raise ValueError(f"the shift matrix has rank {rank} < K = {k} (T = {t} perturbations): some latent "
                         "directions are moved by no perturbation, so no sparse basis of the whole latent space "
                         "is determined; fit it on more perturbations or a model with fewer latent dimensions")
    if n_restarts < 1:
        raise ValueError(f"n_restarts must be >= 1; got {n_restarts}")
    scaled = values / np.sqrt(np.mean(values ** 2))
    value_and_grad = _objective(scaled, smoothing)
    rng = np.random.default_rng(seed)
    best = None
    for restart in range(n_restarts):
        start = np.eye(k) if restart == 0 else np.linalg.qr(rng.standard_normal((k, k)))[0]
        result = minimize(value_and_grad, start.ravel(), jac=True, method="L-BFGS-B",
                          options={"maxiter": max_iter})
        if best is None or result.fun < best.fun:
            best = result
    weights = best.x.reshape(k, k)
    weights = weights / np.linalg.norm(weights, axis=0)
    _, order = linear_sum_assignment(-np.abs(weights))  # new dimension order[i] best matches old dimension i
    weights = weights[:, order]
    effects = values @ weights
    signs = np.where(effects[np.argmax(np.abs(effects), axis=0), np.arange(k)] < 0, -1.0, 1.0)
    weights, effects = weights * signs, effects * signs
    cut = otsu_threshold(np.abs(effects)) if threshold is None else float(threshold)
    columns = [f"basis_{i}" for i in range(k)]
    effects_frame = pd.DataFrame(effects, index=frame.index, columns=columns)
    return SparseBasis(weights=weights, effects=effects_frame, mask=effects_frame.abs() > cut, threshold=cut,
                       objective=float(best.fun))
