"""Conditional VAE (SPEC 4): the perturbation enters as an input, not as a latent shift.

    z[i] ~ Normal(0, I_K)                              (one per cell)
    x[i] ~ likelihood(decoder([z[i], dosages[i]]), library_size[i])

Guide ``q(z | normalize(x), dosages)``: the shared encoder on ``[normalize(x), dosages]``.
There are no perturbation-plated variables (the global dicts are empty), so the effect
of an intervention is whatever the decoder does with its dosage input.
"""

from __future__ import annotations

import jax.numpy as jnp

from sams_jax.models.base import ParticleTerms
from sams_jax.models.components import STANDARD_NORMAL, PerturbationVAE


class ConditionalVAE(PerturbationVAE):
    """Conditional VAE (see the module docstring); local latent ``"z"``, no plated variables."""

    def __call__(self, x, dosages, library_size) -> ParticleTerms:
        """x ``[n, G]``, dosages ``[n, T]``, library_size ``[n]`` -> :class:`ParticleTerms`."""
        return self.local_terms(x, library_size, self.q_local(x, dosages), STANDARD_NORMAL, "z",
                                decoder_extra=(dosages,))

    def prior_shift(self, dosages, max_active: int):
        """Generated cells: ``z`` from ``Normal(0, I)``; the dosages enter the decoder.
        ``max_active`` is not used."""
        del max_active
        return jnp.zeros((dosages.shape[0], self.n_latent), dosages.dtype), (dosages,)

    def encode(self, x, dosages):
        """Posterior mean of ``z`` (``[n, K]``)."""
        return self.q_local(x, dosages).loc
