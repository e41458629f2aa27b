"""Likelihood heads p(x | decoder hidden state, library size) (SPEC 1).

The one place where observation models live; every model's decoder ends in one of them.

* ``normal``: linear mean and log-variance heads, variance ``exp(logvar) + 1e-4``.
* ``poisson``: rate ``softplus(linear)``.
* ``library_nb``: ``rho = softmax(linear)`` over genes, mean ``mu = l * rho``, negative
  binomial (Gamma-Poisson) with a learned per-gene log-concentration ``theta`` shared by
  all cells: concentration ``exp(theta)``, rate ``exp(theta) / (mu + 1e-4)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpyro.distributions as dist
from jax.scipy.special import betaln

from sams_jax.nn import NormalHead, TorchDense

LIKELIHOODS = ("normal", "poisson", "library_nb")
COUNT_LIKELIHOODS = ("poisson", "library_nb")
NB_MEAN_FLOOR = 1e-4


class LikelihoodHead(nn.Module):
    """Maps a decoder hidden state ``[..., H]`` and library size ``[...]`` to a
    ``numpyro`` distribution over ``[..., n_genes]`` (batch shape; not yet summed)."""

    likelihood: str
    n_genes: int
    compute_dtype: str = "float32"  # matrix-multiply inputs of the linear layer (sams_jax.nn.matmul)

    @nn.compact
    def __call__(self, hidden, library_size):
        dtype = self.compute_dtype
        if self.likelihood == "normal":
            return NormalHead(self.n_genes, compute_dtype=dtype, name="normal")(hidden)
        if self.likelihood == "poisson":
            rate = jax.nn.softplus(TorchDense(self.n_genes, compute_dtype=dtype, name="rate")(hidden))
            return dist.Poisson(rate)
        if self.likelihood == "library_nb":
            log_rho = jax.nn.log_softmax(TorchDense(self.n_genes, compute_dtype=dtype, name="logits")(hidden),
                                         axis=-1)
            mean = library_size[..., None] * jnp.exp(log_rho)
            log_theta = self.param("log_theta", nn.initializers.zeros, (self.n_genes,))
            concentration = jnp.exp(log_theta)
            return GammaPoisson(concentration, concentration / (mean + NB_MEAN_FLOOR))
        raise ValueError(f"unknown likelihood {self.likelihood!r}; allowed: {LIKELIHOODS}")



def sample_gamma(key, shape_param, shape):
    """Exact ``Gamma(shape_param, 1)`` samples of ``shape`` (Marsaglia & Tsang 2000).

    Vectorised over the whole array: each round draws one normal and one uniform per
    element and keeps the accepted proposals, until every element is accepted (the
    acceptance probability is above 0.95 for shape >= 1). Shapes below 1 use
    ``Gamma(a) = Gamma(a + 1) * U^(1/a)``. About 10x faster on a CPU than
    ``jax.random.gamma``, which splits a key per element.
    """
    alpha = jnp.broadcast_to(shape_param, shape)
    boost = alpha < 1.0
    a = jnp.where(boost, alpha + 1.0, alpha)
    d = a - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * d)
    round_key, boost_key = jax.random.split(key)

    def proposal(state):
        step, value, done = state
        normal_key, uniform_key = jax.random.split(jax.random.fold_in(round_key, step))
        z = jax.random.normal(normal_key, shape, alpha.dtype)
        u = jax.random.uniform(uniform_key, shape, alpha.dtype)
        v = (1.0 + c * z) ** 3
        safe_v = jnp.where(v > 0, v, 1.0)
        accept = (v > 0) & (jnp.log(u) < 0.5 * z * z + d - d * safe_v + d * jnp.log(safe_v))
        return step + 1, jnp.where(~done & accept, d * v, value), done | accept

    _, value, _ = jax.lax.while_loop(lambda state: ~jnp.all(state[2]), proposal,
                                     (0, jnp.zeros(shape, alpha.dtype), jnp.zeros(shape, bool)))
    u = jax.random.uniform(boost_key, shape, alpha.dtype, minval=jnp.finfo(alpha.dtype).tiny)
    return jnp.where(boost, value * u ** (1.0 / alpha), value)


class GammaPoisson(dist.GammaPoisson):
    """``numpyro``'s Gamma-Poisson with a faster exact sampler (``Poisson(Gamma(concentration)
    / rate)`` using :func:`sample_gamma`) and a cheaper, more stable form of the same
    log-density.

    With concentration ``r``, mean ``m = r / rate`` and ``a = log1p(m / r)``::

        log p(x) = -betaln(r, x + 1) - log(r + x) + x * (log m - log r - a) - r * a

    which equals numpyro's ``-betaln(r, x + 1) - log(r + x) + r log(rate) - (r + x)
    log1p(rate)`` (tested against it and against scipy) without its cancellation of
    ``r log(rate)`` against ``(r + x) log1p(rate)`` when ``r >> m``. The first two terms do
    not depend on ``m``, so under ``vmap`` over particles they are computed once per cell.
    Measured on the 2-core CPU at Replogle scale, the held-out IWELBO (100 particles)
    takes 27% less time than with numpyro's form (``benchmarks/RESULTS.md``).
    """

    def log_prob(self, value):
        r = self.concentration
        mean = r / self.rate
        a = jnp.log1p(mean / r)
        return -betaln(r, value + 1) - jnp.log(r + value) + value * (jnp.log(mean) - jnp.log(r) - a) - r * a

    def sample(self, key, sample_shape=()):
        gamma_key, poisson_key = jax.random.split(key)
        shape = sample_shape + self.batch_shape
        rate = sample_gamma(gamma_key, self.concentration, shape) / self.rate
        return jax.random.poisson(poisson_key, rate, shape).astype(jnp.result_type(float))
