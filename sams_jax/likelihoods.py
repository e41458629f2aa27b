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

    @nn.compact
    def __call__(self, hidden, library_size):
        if self.likelihood == "normal":
            return NormalHead(self.n_genes, name="normal")(hidden)
        if self.likelihood == "poisson":
            rate = jax.nn.softplus(TorchDense(self.n_genes, name="rate")(hidden))
            return dist.Poisson(rate)
        if self.likelihood == "library_nb":
            log_rho = jax.nn.log_softmax(TorchDense(self.n_genes, name="logits")(hidden), axis=-1)
            mean = library_size[..., None] * jnp.exp(log_rho)
            log_theta = self.param("log_theta", nn.initializers.zeros, (self.n_genes,))
            concentration = jnp.exp(log_theta)
            return dist.GammaPoisson(concentration, concentration / (mean + NB_MEAN_FLOOR))
        raise ValueError(f"unknown likelihood {self.likelihood!r}; allowed: {LIKELIHOODS}")

