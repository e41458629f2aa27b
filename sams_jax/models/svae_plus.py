"""SVAE+ (Lopez et al. 2022, "Learning causal representations of single cells via sparse
mechanism shift modeling"; SPEC 4), for one-hot perturbations only.

    mask_prob[t, k] ~ Beta(mask_beta_a, mask_beta_b)   (perturbation plate; paper: Beta(1, 2))
    mask[t, k] ~ Bernoulli(mask_prob[t, k])
    z[i] ~ Normal(mask[t_i] * prior_mean[t_i], I_K)     (mean 0 for control cells)
    x[i] ~ likelihood(decoder(z[i]), library_size[i])

``prior_mean`` (``[T, K]``) is a learned parameter, not a random variable, initialised at
``0.1 * N(0, 1)``; ``t_i`` is the perturbation cell ``i`` received.

Guide: ``q(mask_prob)`` a point mass at ``sigmoid(mask_logits)`` (``log q = 0``, ``log
p`` = the Beta log-density there), ``q(mask | mask_prob) = Bernoulli(mask_prob)`` sampled
by Gumbel-softmax straight-through (so the mask's ``log p - log q`` is zero), and
``q(z | normalize(x))`` from the shared encoder, which sees ``x`` only.

A cell with two or more perturbations has no place in this model: :meth:`SVAEPlus.check_data`
rejects such data before training (encode combinations as unique perturbations instead).
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import numpyro.distributions as dist

from sams_jax.data import DataError
from sams_jax.models.base import ParticleTerms
from sams_jax.models.components import LearnedMask, active_perturbations, beta_bernoulli_mask_terms


def check_one_hot(dosages) -> None:
    """Raise :class:`~sams_jax.data.DataError` (a ``ValueError``) if a row of ``dosages``
    (``[n, T]``) has more than one non-zero entry."""
    n_active = (np.asarray(dosages) != 0).sum(axis=1)
    bad = np.nonzero(n_active > 1)[0]
    if bad.size:
        raise DataError(
            f"SVAE+ (model.name='svae_plus') accepts one-hot perturbations only, but {bad.size} cells received "
            f"several perturbations (e.g. cells {bad[:5].tolist()}); encode each combination as a unique "
            "perturbation with encode_combinations=\"unique\" (config: data.encode_combinations='unique'), "
            "or use a model with additive effects (sams_vae, cpa_vae)")


class SVAEPlus(LearnedMask):
    """SVAE+ (see the module docstring); local latent ``"z"``, plated ``"mask_prob"`` and
    ``"mask"``; the mask's guide logits are ``mask_logits`` (:class:`LearnedMask`)."""

    mask_beta_a: float = 1.0
    mask_beta_b: float = 2.0
    composes_perturbations: ClassVar[bool] = False  # a cell's perturbations do not add (one-hot dosages only)

    def setup(self):
        self.setup_mask()
        self.prior_mean = self.param("prior_mean", nn.initializers.normal(0.1),
                                     (self.n_perturbations, self.n_latent))
        super().setup()

    def __call__(self, x, dosages, library_size) -> ParticleTerms:
        """x ``[n, G]``, dosages ``[n, T]`` (one-hot or zero rows), library_size ``[n]`` ->
        :class:`ParticleTerms`."""
        mask = self.straight_through_mask()
        global_log_p, global_log_q, global_kl = beta_bernoulli_mask_terms(self.mask_logits, mask,
                                                                          self.mask_beta_a, self.mask_beta_b)
        received = (dosages != 0).astype(mask.dtype)  # [n, T], one non-zero per perturbed cell
        p_z = dist.Normal(received @ (mask * self.prior_mean), 1.0)
        return self.local_terms(x, library_size, self.q_local(x), p_z, "z",
                                global_log_p=global_log_p, global_log_q=global_log_q, global_kl=global_kl)

    def prior_shift(self, dosages, max_active: int):
        """Generated cells under ``dosages`` (``[n, T]``, one-hot or zero rows):
        ``mask_prob`` at its point mass, ``mask`` drawn independently per row, so ``z`` has
        prior mean ``mask[t] * prior_mean[t]``; no decoder extras. (A row with several
        perturbations would get the sum of their prior means; the model is not trained for
        that, see :meth:`check_data`.)"""
        active, rows = active_perturbations(dosages, max_active)  # [n, A]
        mask = self.sample_row_masks(rows)  # [n, A, K]
        return jnp.einsum("na,nak->nk", (active != 0).astype(mask.dtype), mask * self.prior_mean[rows]), ()

    def encode(self, x, dosages):
        """Posterior mean of ``z`` (``[n, K]``); ``q(z | x)`` does not use the dosages."""
        del dosages
        return self.q_local(x).loc

    def embedding_means(self):  # [T, K]: the learned prior means (the latent shift of an active mask)
        return self.prior_mean
