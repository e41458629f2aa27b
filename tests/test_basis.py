"""The sparse latent basis (sams_jax.basis): recovery of sparse shifts hidden behind an
invertible linear map, a sparse matrix keeping its frame, Otsu's threshold by brute
force, clear errors, determinism."""

import numpy as np
import pandas as pd
import pytest

from sams_jax.basis import fit_sparse_basis, otsu_threshold
from sams_jax.metrics import mask_scores


def _sparse_shifts(t=100, k=8, density=0.15, seed=0):
    """``[T, K]`` shifts like the paper's simulation: Bernoulli support, size ~5, random sign,
    at least one entry per perturbation."""
    rng = np.random.default_rng(seed)
    support = rng.random((t, k)) < density
    support[np.arange(t), rng.integers(0, k, t)] = True
    values = rng.normal(5.0, 0.5, (t, k)) * rng.choice([-1.0, 1.0], (t, k))
    return np.where(support, values, 0.0), support


def test_recovers_sparse_shifts_behind_an_invertible_map():
    shifts, support = _sparse_shifts()
    rng = np.random.default_rng(1)
    k = shifts.shape[1]
    mixing = np.linalg.qr(rng.standard_normal((k, k)))[0] @ np.diag(rng.uniform(0.5, 2.0, k))  # not orthogonal
    mixed = shifts @ mixing + rng.normal(0, 0.05, shifts.shape)
    assert mask_scores(support, np.abs(mixed) > 1.0)["mask_f1"] < 0.6  # dense in the mixed frame
    basis = fit_sparse_basis(pd.DataFrame(mixed, index=[f"p{i}" for i in range(len(mixed))]))
    assert mask_scores(support, basis.mask.to_numpy())["mask_f1"] > 0.98
    # each recovered dimension is one true dimension up to scale (correlation ~ 1)
    corr = np.corrcoef(basis.effects.to_numpy().T, shifts.T)[:k, k:]
    assert np.all(np.abs(corr).max(1) > 0.99)
    assert list(basis.effects.index[:2]) == ["p0", "p1"] and basis.mask.dtypes.eq(bool).all()
    np.testing.assert_allclose(np.linalg.norm(basis.weights, axis=0), 1.0, rtol=1e-10)
    np.testing.assert_allclose(basis.effects.to_numpy(), mixed @ basis.weights, rtol=1e-10)
    # shifts and latent states stay in one frame: (z + s) W = z W + s W
    z = rng.standard_normal((5, k))
    np.testing.assert_allclose(basis.transform(z + mixed[3]), basis.transform(z) + basis.effects.to_numpy()[3])


def test_sparse_shifts_keep_their_frame_order_and_sign():
    shifts, support = _sparse_shifts(seed=2)
    scaled = shifts * np.array([1.0, 2.0, 1.2, 1.0, 1.5, 1.0, 0.8, 1.0])
    basis = fit_sparse_basis(scaled)
    weights = basis.weights
    assert np.all(np.argmax(np.abs(weights), axis=0) == np.arange(8))  # dimension i stays dimension i
    assert np.all(np.abs(np.diag(weights)) > 0.99)
    largest = basis.effects.to_numpy()[np.argmax(basis.effects.abs().to_numpy(), axis=0), np.arange(8)]
    assert np.all(largest > 0)  # signed so that the largest effect is positive
    np.testing.assert_array_equal(basis.mask.to_numpy(), support)


def test_otsu_threshold_matches_brute_force():
    rng = np.random.default_rng(0)
    values = np.concatenate([np.abs(rng.normal(0, 0.5, 300)), rng.normal(5, 0.5, 60)])
    v = np.sort(values)
    scores = [i * (len(v) - i) * (v[i:].mean() - v[:i].mean()) ** 2 for i in range(1, len(v))]
    best = int(np.argmax(scores)) + 1
    assert otsu_threshold(values) == pytest.approx((v[best - 1] + v[best]) / 2)
    assert otsu_threshold([0.0, 0.1, 0.2, 5.0, 5.1]) == pytest.approx(2.6)
    with pytest.raises(ValueError, match="two distinct values"):
        otsu_threshold([1.0, 1.0])


def test_same_seed_same_basis_and_explicit_threshold():
    shifts, _ = _sparse_shifts(t=40, k=5, seed=3)
    mixed = shifts @ np.linalg.qr(np.random.default_rng(4).standard_normal((5, 5)))[0]
    first, second = fit_sparse_basis(mixed, seed=7), fit_sparse_basis(mixed, seed=7)
    np.testing.assert_array_equal(first.weights, second.weights)
    strict = fit_sparse_basis(mixed, seed=7, threshold=10.0)
    assert strict.threshold == 10.0 and strict.mask.to_numpy().sum() < first.mask.to_numpy().sum()


def test_rank_deficient_shifts_are_a_clear_error():
    shifts, _ = _sparse_shifts(t=4, k=6)
    with pytest.raises(ValueError, match=r"rank 4 < K = 6 \(T = 4 perturbations\)"):
        fit_sparse_basis(shifts)
    with pytest.raises(ValueError, match="n_restarts"):
        fit_sparse_basis(_sparse_shifts()[0], n_restarts=0)
