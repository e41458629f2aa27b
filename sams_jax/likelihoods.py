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
    """``numpyro``'s Gamma-Poisson (same log-density) with a faster exact sampler:
    ``Poisson(Gamma(concentration) / rate)`` using :func:`sample_gamma`."""

    def sample(self, key, sample_shape=()):
        gamma_key, poisson_key = jax.random.split(key)
        shape = sample_shape + self.batch_shape
        rate = sample_gamma(gamma_key, self.concentration, shape) / self.rate
        return jax.random.poisson(poisson_key, rate, shape).astype(jnp.result_type(float))
