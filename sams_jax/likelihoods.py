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
import numpy as np
import numpyro.distributions as dist
from jax.custom_derivatives import SymbolicZero
from numpyro.distributions.util import validate_sample

from sams_jax.nn import NormalHead, TorchDense, grouped_sum
from sams_jax.samplers import normal, sample_negative_binomial
from sams_jax.special import digamma_positive, log_beta

LIKELIHOODS = ("normal", "poisson", "library_nb")
COUNT_LIKELIHOODS = ("poisson", "library_nb")
LIBRARY_LIKELIHOODS = ("library_nb",)  # the mean scales with each cell's library size
NB_MEAN_FLOOR = 1e-4
_HALF_LOG_TWO_PI = float(0.5 * np.log(2 * np.pi))


class LikelihoodHead(nn.Module):
    """Maps a decoder hidden state ``[..., H]`` and library size ``[...]`` to a
    ``numpyro`` distribution over ``[..., n_genes]`` (batch shape; not yet summed)."""

    likelihood: str
    n_genes: int
    compute_dtype: str = "float32"  # matrix-multiply inputs of the linear layer (sams_jax.nn.matmul)

    @nn.compact
    def __call__(self, hidden, library_size, sum_weights=None):
        """``sum_weights`` (``[S]`` of 0 / 1, optional; hidden ``[I * S, H]``): instead, the
        distribution of the weighted sum over each group of ``S`` consecutive rows of
        independent draws, ``[I, n_genes]``, where it has a closed form (see
        :func:`summed_observation`); ``None`` for the others."""
        dtype = self.compute_dtype
        if self.likelihood == "normal":
            head = NormalHead(self.n_genes, compute_dtype=dtype, name="normal")
            if sum_weights is None:
                # two products even where the head is narrow: joined (NormalHead.loc_and_variance)
                # the gene-wide output was slower (benchmarks/RESULTS.md)
                return Normal.from_variance(head.loc(hidden), head.variance(hidden))
            p_x = head.summed(hidden, sum_weights)
            return Normal(p_x.loc, p_x.scale)
        if self.likelihood == "poisson":
            rate = jax.nn.softplus(TorchDense(self.n_genes, compute_dtype=dtype, name="rate")(hidden))
            return dist.Poisson(rate) if sum_weights is None else summed_observation(dist.Poisson(rate), sum_weights)
        if self.likelihood == "library_nb":
            if sum_weights is not None:  # the negative binomial's sum has no closed form
                return None
            logits = TorchDense(self.n_genes, compute_dtype=dtype, name="logits")(hidden)
            log_theta = self.param("log_theta", nn.initializers.zeros, (self.n_genes,))
            return LibraryNB(logits, library_size, log_theta)
        raise ValueError(f"unknown likelihood {self.likelihood!r}; allowed: {LIKELIHOODS}")


def summed_observation(p_x, weights):
    """The distribution of ``sum_s weights[s] * x[i * S + s]`` (``[I, G]``) for independent
    draws ``x ~ p_x`` (batch shape ``[I * S, G]``: ``I`` groups of ``S`` consecutive rows;
    ``weights`` ``[S]`` of 0 / 1), where it has a closed form: the normal
    (``Normal(sum mu, sqrt(sum sigma^2))``) and Poisson (``Poisson(sum rate)``)
    likelihoods. ``None`` for the others (the negative binomial's sum is not one).
    :class:`LikelihoodHead` with ``sum_weights`` gives the same distribution from the hidden
    state, with the normal's linear mean summed before its head (cheaper).
    """
    def total(values):  # [I * S, G] (or broadcastable) -> [I, G]
        return grouped_sum(jnp.broadcast_to(values, p_x.batch_shape), weights)

    if isinstance(p_x, dist.Normal):
        return Normal(total(p_x.loc), jnp.sqrt(total(jnp.square(p_x.scale))))
    if isinstance(p_x, dist.Poisson):
        return dist.Poisson(total(p_x.rate))
    return None


class Normal(dist.Normal):
    """``numpyro``'s Normal with two CPU speed-ups that keep its numbers:

    * ``sample`` draws the same numbers faster (:func:`sams_jax.samplers.normal` equals
      ``jax.random.normal``); generating cells for ATEs is bound by these draws;
    * made with :meth:`from_variance`, ``log_prob`` uses the variance it was given,
      ``-((x - loc)^2 / variance + log(variance) + log(2 pi)) / 2``, instead of
      ``numpyro``'s form in ``scale = sqrt(variance)`` (no square root, one logarithm of
      the variance: the same density up to float rounding, tested). The simulation's
      held-out IWELBO: 0.382 against 0.396 s in one process (``benchmarks/RESULTS.md``).

    Used for observations only.
    """

    _given_variance = None  # set by from_variance; dropped if the distribution is flattened as a pytree

    @classmethod
    def from_variance(cls, loc, variance):
        """``Normal(loc, sqrt(variance))`` whose ``log_prob`` works from ``variance``."""
        normal_distribution = cls(loc, jnp.sqrt(variance))
        normal_distribution._given_variance = variance
        return normal_distribution

    @validate_sample  # numpyro's support check (on by default), kept as for every other density
    def log_prob(self, value):
        if self._given_variance is None:
            return dist.Normal.log_prob.__wrapped__(self, value)
        variance = self._given_variance
        return -0.5 * (jnp.square(value - self.loc) / variance + jnp.log(variance)) - _HALF_LOG_TWO_PI

    def sample(self, key, sample_shape=()):
        return self.loc + normal(key, sample_shape + self.batch_shape) * self.scale



class GammaPoisson(dist.GammaPoisson):
    """``numpyro``'s Gamma-Poisson with a faster exact sampler
    (:func:`sams_jax.samplers.sample_negative_binomial`) and a cheaper, more stable form of
    the same log-density.

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
        return log_nb_coefficient(r, value) + value * (jnp.log(mean) - jnp.log(r) - a) - r * a

    def sample(self, key, sample_shape=()):
        shape = sample_shape + self.batch_shape
        return sample_negative_binomial(key, self.concentration, self.concentration / self.rate, shape)


class LibraryNB(GammaPoisson):
    """The ``library_nb`` observation: :class:`GammaPoisson` with mean ``m = l *
    softmax(logits) + 1e-4`` (library size ``l``) and concentration ``r = exp(log_theta)``,
    i.e. rate ``r / m``, built from the head's ``logits`` ``[..., G]``, ``library_size``
    ``[...]`` and per-gene ``log_theta`` ``[G]``.

    Its ``log_prob`` is :class:`GammaPoisson`'s, computed from the logits by
    :func:`nb_mean_terms`, whose derivatives are written out: the same values and
    gradients (tested against automatic differentiation of the composed form) with fewer
    passes over the ``particles x cells x genes`` arrays in the training step. On the
    2-core CPU the Replogle-scale training step took 91.3 instead of 98.9 ms (one process
    alternating the two compiled steps, 10 of 10 rounds faster; ``benchmarks/RESULTS.md``);
    the held-out IWELBO, which needs no derivatives, is unchanged.

    Shapes: ``logits`` ``[..., G]`` and ``library_size`` ``[...]`` with the same leading
    shape (broadcast them first), ``log_theta`` ``[G]``; the derivatives with respect to
    the library size (data, never trained) are not finite where it is 0.
    """

    pytree_data_fields = ("logits", "library_size", "log_theta")  # rebuilt through jit / vmap / scan

    def __init__(self, logits, library_size, log_theta, validate_args=None):
        self.logits, self.library_size, self.log_theta = logits, library_size, log_theta
        concentration = jnp.exp(log_theta)
        mean = library_size[..., None] * jax.nn.softmax(logits, axis=-1)
        super().__init__(concentration, concentration / (mean + NB_MEAN_FLOOR), validate_args=validate_args)

    def log_prob(self, value):
        return log_nb_coefficient(self.concentration, value) + nb_mean_terms(
            self.logits, jnp.log(self.library_size), self.log_theta, value)


@jax.custom_vjp
def nb_mean_terms(logits, log_library_size, log_theta, value):
    """The part of the NB log-density that depends on the mean: ``x (log m - log r - a) -
    r a`` with ``m = exp(log_library_size) * softmax(logits) + 1e-4``, ``r =
    exp(log_theta)`` and ``a = log1p(m / r)`` (see :class:`GammaPoisson`); ``[..., G]``
    from logits ``[..., G]``, ``log_library_size`` ``[...]``, ``log_theta`` ``[G]`` and
    counts ``[..., G]``.

    Derivatives, with ``p = softmax(logits)``, ``mu = l p`` and ``s = ct * mu * (x / m -
    (x + r) / (r + m))`` for the output's cotangent ``ct``: ``d/dlogits = s - p * sum(s)``,
    ``d/dlog l = sum(s)``, ``d/dlog_theta = sum over cells of ct * r * ((m - x) / (r + m) -
    a)``, ``d/dx = ct * (log m - log r - a)``.
    """
    return _nb_mean_terms_forward(logits, log_library_size, log_theta, value)[0]


def _nb_mean_terms_forward(logits, log_library_size, log_theta, value):
    p = jax.nn.softmax(logits, axis=-1)
    m = jnp.exp(log_library_size)[..., None] * p + NB_MEAN_FLOOR
    r = jnp.exp(log_theta)
    a = jnp.log1p(m / r)
    return value * (jnp.log(m) - log_theta - a) - r * a, (p, a)


def _nb_mean_terms_fwd(logits, log_library_size, log_theta, value):
    out, (p, a) = _nb_mean_terms_forward(logits, log_library_size, log_theta, value)
    return out, (p, a, log_library_size, log_theta, value)


def _nb_mean_terms_bwd(residuals, cotangent):
    p, a, log_library_size, log_theta, value = residuals
    mu = jnp.exp(log_library_size)[..., None] * p
    m = mu + NB_MEAN_FLOOR
    r = jnp.exp(log_theta)
    s = cotangent * mu * (value / m - (value + r) / (r + m))
    s_total = s.sum(-1)
    theta_terms = cotangent * r * ((m - value) / (r + m) - a)
    return (s - p * s_total[..., None], s_total,
            theta_terms.reshape(-1, theta_terms.shape[-1]).sum(0).reshape(jnp.shape(log_theta)),
            cotangent * (jnp.log(m) - log_theta - a))


nb_mean_terms.defvjp(_nb_mean_terms_fwd, _nb_mean_terms_bwd)


@jax.custom_jvp
def log_nb_coefficient(concentration, value):
    """``log Gamma(r + x) - log Gamma(r) - log Gamma(x + 1)`` for concentration ``r > 0``
    and counts ``x >= 0`` (broadcast together), computed as ``-log_beta(r, x + 1) -
    log(r + x)``, which has no cancellation when ``r >> x`` or ``x >> r``.

    :func:`sams_jax.special.log_beta` is ``jax.scipy.special.betaln`` to float32
    precision (tested against scipy in float64; JAX's is no closer) at less than half
    its cost: the forward pass on ``[512, 1187]`` takes about 3.5 instead of 8 ms on the
    2-core CPU.

    Its derivative is given directly: ``d/dr = digamma(r + x) - digamma(r)`` (and
    ``d/dx = digamma(r + x) - digamma(x + 1)``), with ``digamma(r)`` computed at the
    concentration's own shape (one per gene). Differentiating ``betaln`` itself instead
    goes through both branches of its ``min``/``max`` and evaluates three digammas per
    element: at Replogle scale that was about 16 ms of a 175 ms training step on the
    2-core CPU. The digammas are :func:`sams_jax.special.digamma_positive` (about 4x
    cheaper than JAX's); the derivatives are tested against scipy's digamma (float64).
    """
    return -log_beta(concentration, value + 1) - jnp.log(concentration + value)


def _log_nb_coefficient_jvp(primals, tangents):
    concentration, value = primals
    concentration_dot, value_dot = tangents
    out = log_nb_coefficient(concentration, value)
    tangent_out = jnp.zeros_like(out)
    digamma_sum = digamma_positive(concentration + value)
    if not isinstance(concentration_dot, SymbolicZero):
        tangent_out = tangent_out + (digamma_sum - digamma_positive(concentration)) * concentration_dot
    if not isinstance(value_dot, SymbolicZero):
        tangent_out = tangent_out + (digamma_sum - digamma_positive(value + 1)) * value_dot
    return out, tangent_out


log_nb_coefficient.defjvp(_log_nb_coefficient_jvp, symbolic_zeros=True)
