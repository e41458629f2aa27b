"""Exact samplers (sams_jax/samplers.py): same bits as jax.random, and the right distributions
in every branch (inversion, its continuation, PTRS, Gamma-Poisson)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sams_jax import samplers


def test_uniform_and_normal_equal_jax_random():
    key = jax.random.key(11)
    for shape in [(5,), (3, 7, 11)]:
        np.testing.assert_array_equal(samplers.random_bits(key, shape), jax.random.bits(key, shape, jnp.uint32))
        np.testing.assert_array_equal(samplers.uniform(key, shape), jax.random.uniform(key, shape))
        np.testing.assert_array_equal(samplers.normal(key, shape), jax.random.normal(key, shape))


def test_normal_sample_equals_numpyros_rsample():
    """The flat draw reshaped is the shaped draw bit for bit (the Threefry counters are flat
    positions), so the sample is rsample's (up to XLA's rounding of ``loc + eps * scale``
    within a fused program), also batched over particle keys as the objective draws them."""
    import numpyro.distributions as dist

    loc = jax.random.normal(jax.random.key(1), (6, 15))
    scale = jnp.exp(jax.random.normal(jax.random.key(2), (6, 15)))
    keys = jax.random.split(jax.random.key(3), 4)
    ours = jax.jit(jax.vmap(lambda key: samplers.normal_sample(key, loc, scale)))(keys)
    theirs = jax.jit(jax.vmap(lambda key: dist.Normal(loc, scale).rsample(key)))(keys)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(jax.random.normal(keys[0], (90,)).reshape(6, 15), jax.random.normal(keys[0], (6, 15)))
    zero = jnp.zeros((6, 15))
    np.testing.assert_array_equal(samplers.normal_sample(keys[0], zero, 1.0), jax.random.normal(keys[0], (6, 15)))
    np.testing.assert_allclose(samplers.normal_sample(keys[0], loc[0], 2.0), dist.Normal(loc[0], 2.0).rsample(keys[0]),
                               rtol=1e-6, atol=1e-6)  # broadcast scale


def _chi_square_pvalue(draws, pmf, sf, kmax):
    counts = np.bincount(draws.astype(np.int64))
    observed = np.r_[np.pad(counts, (0, max(0, kmax + 1 - counts.size)))[:kmax + 1], (draws > kmax).sum()]
    expected = np.r_[pmf(np.arange(kmax + 1)), sf(kmax)] * draws.size
    keep = expected > 5
    chi = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    return stats.chi2.sf(chi, max(keep.sum() - 1, 1))


# Parameters are passed as jit arguments (constants would be folded at compile time).
_poisson = jax.jit(lambda key, rate: samplers.sample_poisson(key, rate, (200_000,)))
_negative_binomial = jax.jit(lambda key, r, m: samplers.sample_negative_binomial(key, r, m, (200_000,)))


@pytest.mark.parametrize("rate", [0.0, 0.3, 4.0, 9.99, 10.0, 60.0, 2000.0])
def test_poisson_distribution(rate):
    """Inversion below rate 10, PTRS at and above."""
    draws = np.asarray(_poisson(jax.random.key(1), jnp.float32(rate)))
    assert np.array_equal(draws, np.round(draws))
    if rate == 0:
        assert (draws == 0).all()
        return
    dist = stats.poisson(rate)
    assert _chi_square_pvalue(draws, dist.pmf, dist.sf, int(dist.ppf(0.9999))) > 1e-3
    np.testing.assert_allclose(draws.mean(), rate, rtol=0.01)


@pytest.mark.parametrize("r,m", [(0.5, 2.0), (1.0, 8.4), (0.1, 1.4), (1e4, 5.0), (0.3, 0.01), (1.0, 60.0), (0.3, 18.0),
                                 (1e3, 63.0), (0.05, 15.0), (20.0, 300.0)])
def test_negative_binomial_distribution(r, m):
    """Inversion (with its gathered continuation for counts >= 48: r = 1, m = 8.4 needs it
    for 0.5% of draws, r = 1, m = 60 for 45%) for means below 64 and tails no heavier than
    (63/64)^x; Gamma-Poisson for heavier tails (r = 0.05, m = 15) and large means (m = 300)."""
    draws = np.asarray(_negative_binomial(jax.random.key(3), jnp.float32(r), jnp.float32(m)))
    assert np.array_equal(draws, np.round(draws)) and draws.min() >= 0
    dist = stats.nbinom(r, r / (r + m))
    assert _chi_square_pvalue(draws, dist.pmf, dist.sf, int(dist.ppf(0.9999))) > 1e-3
    assert (draws >= samplers.NB_INVERSION_STEPS).any() == (dist.sf(samplers.NB_INVERSION_STEPS - 1) > 1e-4)
    # the far tail is not distorted (float32 inversion stops where the cdf stops growing)
    assert draws.max() < dist.ppf(1 - 1e-9)


def test_negative_binomial_per_element_parameters_and_determinism():
    """Mixed parameters in one array: every element drawn from its own distribution."""
    r = jnp.asarray([0.5, 20.0, 1.0, 0.05], jnp.float32)
    m = jnp.asarray([0.2, 300.0, 8.4, 15.0], jnp.float32)
    draw = jax.jit(lambda key: samplers.sample_negative_binomial(key, r, m, (50_000, 4)))
    draws, again = draw(jax.random.key(5)), draw(jax.random.key(5))
    np.testing.assert_array_equal(draws, again)
    draws = np.asarray(draws)
    for j in range(4):
        dist = stats.nbinom(float(r[j]), float(r[j] / (r[j] + m[j])))
        assert _chi_square_pvalue(draws[:, j], dist.pmf, dist.sf, int(dist.ppf(0.999))) > 1e-3, j


@pytest.mark.parametrize("alpha", [0.3, 1.0, 4.0])
def test_gamma_distribution(alpha):
    draws = np.asarray(jax.jit(lambda key, a: samplers.sample_gamma(key, a, (200_000,)))(jax.random.key(0),
                                                                                      jnp.float32(alpha)))
    assert draws.min() > 0
    np.testing.assert_allclose(draws.mean(), alpha, rtol=0.02)
    assert stats.kstest(draws[:50_000], stats.gamma(alpha).cdf).pvalue > 1e-3


def test_large_gamma_shapes_never_give_nan():
    """Shapes of 1e3-1e5 (a near-Poisson gene's NB concentration exp(log_theta)): every draw
    is a number with the right distribution. With the acceptance test written as
    ``d - d v + d log v`` (float32 error ~ eps d) and a separate done flag, about 1 in
    10,000 draws at shape 1e4 came back NaN."""
    for alpha in (1e3, 1e4, 1e5):
        draws = np.asarray(jax.jit(lambda key, a: samplers.sample_gamma(key, a, (200_000,)))(jax.random.key(1),
                                                                                          jnp.float32(alpha)))
        assert np.isfinite(draws).all(), alpha
        np.testing.assert_allclose(draws.mean(), alpha, rtol=4 / np.sqrt(alpha * draws.size))  # 4 standard errors
        np.testing.assert_allclose(draws.std(), np.sqrt(alpha), rtol=0.02)
        assert stats.kstest(draws[:50_000], stats.gamma(alpha).cdf).pvalue > 1e-3
    counts = np.asarray(jax.jit(lambda key: samplers.sample_negative_binomial(key, 1097.0, 500.0, (200_000,)))(
        jax.random.key(0)))
    assert np.isfinite(counts).all()


def test_invalid_parameters_give_nan_not_a_hang():
    r = jnp.asarray([1.0, jnp.nan, 2.0, -1.0, 1.0], jnp.float32)
    m = jnp.asarray([3.0, 3.0, jnp.inf, 3.0, jnp.nan], jnp.float32)
    draws = np.asarray(jax.jit(lambda key, r, m: samplers.sample_negative_binomial(key, r, m, (4, 5)))(
        jax.random.key(0), r, m))
    assert np.isfinite(draws[:, 0]).all()
    assert np.isnan(draws[:, 1:]).all()


@pytest.mark.parametrize("n,fraction", [(1, 1.0), (33, 1.0), (1000, 0.01), (1000, 0.5), (5000, 0.0)])
def test_pending_indices_equal_nonzero(n, fraction):
    """The packed-flag compaction finds exactly the pending elements, in order, batch by batch
    (batches that start inside a word, span several words, or run past the last one)."""
    flags = np.random.default_rng(n).random(n) < fraction
    packed = samplers._pack_flags(jnp.asarray(flags))
    size = 7
    batches = [samplers._pending_indices(*packed, jnp.int32(start), size, n)
               for start in range(0, flags.sum() + size, size)]
    expected = np.full(len(batches) * size, n)
    expected[:flags.sum()] = np.nonzero(flags)[0]
    np.testing.assert_array_equal(np.concatenate(batches), expected)


def test_fill_pending_draws_every_pending_element():
    """More pending elements than one batch holds (small and large batches): every one is
    drawn, the others keep their values."""
    n = 3000
    pending = jnp.asarray(np.random.default_rng(0).random(n) < 0.4)
    values = jnp.arange(n, dtype=jnp.float32)
    filled = jax.jit(lambda p, v: samplers._fill_pending(jax.random.key(0), p, v, lambda _, index: -v.at[index].get(mode="clip") - 1,
                                                         capacity=256))(pending, values)
    expected = np.where(pending, -np.arange(n) - 1.0, np.arange(n))
    np.testing.assert_array_equal(filled, expected)


def test_log_factorial_equals_gammaln():
    """PTRS's ``log k!`` (table below 16, Stirling above) to float32 precision."""
    from scipy.special import gammaln

    k = np.concatenate([np.arange(0, 64), np.geomspace(64, 1e7, 200).round()]).astype(np.float32)
    np.testing.assert_allclose(samplers._log_factorial(jnp.asarray(k)), gammaln(k.astype(np.float64) + 1.0),
                               rtol=3e-7, atol=1e-6)
