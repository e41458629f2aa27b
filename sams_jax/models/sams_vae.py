"""SAMS-VAE: sparse additive mechanism shift VAE (SPEC 1-2), and its relatives that
share the additive latent shift: CPA-VAE (no mask, SPEC 4) and SAMS-VAE with a
Beta-Bernoulli mask prior.

Generative model, for ``T`` perturbations and ``K`` latent dimensions::

    mask[t, k] ~ Bernoulli(mask_prior_prob)          (perturbation plate)
    embedding[t, k] ~ Normal(0, embedding_prior_scale^2)
    z_basal[i] ~ Normal(0, I_K)                       (one per cell)
    z[i] = z_basal[i] + dosages[i] @ (embedding * mask)
    x[i] ~ likelihood(decoder(z[i]), library_size[i])

Guide ``q(mask) q(embedding | mask) q(z_basal | x, dosages, embedding, mask)``:

* ``q(mask)``: Bernoulli with free logits, sampled by Gumbel-softmax straight-through
  and scored with the Bernoulli log-probability of the hard sample;
* ``guide="mean_field"``: ``q(embedding)`` independent Normals with free location and
  log-scale (scale ``exp(log_scale) + 1e-4``);
* ``guide="correlated"``: ``q(embedding[t] | mask[t])`` from an embedding-encoder MLP on
  ``[mask[t], one_hot(t)]``;
* ``q(z_basal | ...)``: an encoder on ``[normalize(x), dosages @ (embedding * mask)]``
  (the offset is left out with ``mean_field_encoder=True``).

:class:`AdditiveShiftVAE` holds everything but the mask; :class:`SAMSVAE` adds the mask,
:class:`CPAVAE` fixes it to ones, :class:`SAMSVAEBetaBernoulli` changes its prior.
"""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn
import numpyro.distributions as dist

from sams_jax.models.base import ParticleTerms
from numpyro.distributions.kl import kl_divergence

from sams_jax.models.components import (STANDARD_NORMAL, LearnedMask, PerturbationVAE, active_perturbations,
                                        bernoulli_kl, beta_bernoulli_mask_terms)
from sams_jax.nn import NormalHead, ResidualMLP, VARIANCE_FLOOR, match_particles
from sams_jax.samplers import normal

GUIDES = ("mean_field", "correlated")


class AdditiveShiftVAE(PerturbationVAE):
    """``z = z_basal + D @ (embedding * mask)`` with a guide ``q(embedding | mask)``
    chosen by ``guide`` (defined by the subclass). Subclasses supply the mask through the
    hooks ``setup_mask``, ``sample_mask``, ``sample_row_masks`` and ``most_probable_mask``."""

    mean_field_encoder: bool = False
    embedding_encoder_n_layers: int = 2
    embedding_encoder_n_hidden: int = 50
    embedding_prior_scale: float = 1.0
    embedding_loc_init_scale: float = 0.0

    def setup(self):
        t, k = self.n_perturbations, self.n_latent
        self.setup_mask()
        if self.guide == "mean_field":
            loc_init = (nn.initializers.normal(self.embedding_loc_init_scale)
                        if self.embedding_loc_init_scale > 0 else nn.initializers.zeros)
            self.embedding_loc = self.param("embedding_loc", loc_init, (t, k))
            self.embedding_log_scale = self.param("embedding_log_scale", nn.initializers.zeros, (t, k))
        elif self.guide == "correlated":
            self.embedding_encoder = ResidualMLP(
                self.embedding_encoder_n_hidden, self.embedding_encoder_n_layers, row_one_hot=True, n_rows=t,
                compute_dtype=self.compute_dtype)
            self.embedding_head = NormalHead(k, compute_dtype=self.compute_dtype)
        else:
            raise ValueError(f"unknown guide {self.guide!r}; allowed: {GUIDES}")
        super().setup()

    # --- guide pieces -------------------------------------------------------------
    def q_embedding(self, mask, rows=None):
        """``q(embedding | mask)`` for all perturbations (mask ``[T, K]``) or for the
        perturbations ``rows`` (``[...]`` ints, mask ``[..., K]``); batch shape of mask."""
        if self.guide == "mean_field":
            loc, log_scale = self.embedding_loc, self.embedding_log_scale
            if rows is not None:
                loc, log_scale = loc[rows], log_scale[rows]
            return dist.Normal(loc, jnp.exp(log_scale) + VARIANCE_FLOOR)
        return self.embedding_head(self.embedding_encoder(mask, row_index=rows))

    def sample_globals(self):
        """One particle of the perturbation-plated variables.

        Returns ``(shift [T, K], log_p, log_q, kl)`` with ``shift = embedding * mask`` and
        ``log_p`` / ``log_q`` / ``kl`` dicts of ``[T]`` arrays (summed over latent
        dimensions; ``kl`` the closed-form KL of each variable given the mask draw).
        """
        mask, log_p, log_q, kl = self.sample_mask()
        q_embedding = self.q_embedding(mask)
        p_embedding = dist.Normal(0.0, self.embedding_prior_scale)
        embedding = q_embedding.rsample(self.make_rng("globals"))
        log_q = {**log_q, "embedding": q_embedding.log_prob(embedding).sum(-1)}
        log_p = {**log_p, "embedding": p_embedding.log_prob(embedding).sum(-1)}
        kl = {**kl, "embedding": kl_divergence(q_embedding, p_embedding).sum(-1)}
        return embedding * mask, log_p, log_q, kl

    def q_z_basal(self, x, offset):  # x [n, G], offset [n, K] -> Normal [n, K]
        return self.q_local(x, None if self.mean_field_encoder else offset)

    # --- one particle ---------------------------------------------------------------
    def __call__(self, x, dosages, library_size) -> ParticleTerms:
        """x ``[n, G]``, dosages ``[n, T]``, library_size ``[n]`` -> :class:`ParticleTerms`."""
        shift, global_log_p, global_log_q, global_kl = self.sample_globals()
        offset = dosages @ shift  # [n, K]
        return self.local_terms(x, library_size, self.q_z_basal(x, offset), STANDARD_NORMAL, "z_basal",
                                shift=offset, global_log_p=global_log_p, global_log_q=global_log_q,
                                global_kl=global_kl)

    # --- prediction -----------------------------------------------------------------
    def sample_offsets(self, dosages, max_active: int):
        """``D[i] @ (embedding * mask)`` with an independent draw of the global variables
        for every row ``i`` (``[n, K]`` from dosages ``[n, T]``).

        Only the perturbations a row received are drawn: ``max_active`` (static) is the
        largest number of non-zero dosages in a row. ``q(mask) q(embedding | mask)``
        factorises over perturbations, so this has the distribution of a full draw.
        """
        weights, rows = active_perturbations(dosages, max_active)  # [n, A]
        mask = self.sample_row_masks(rows)  # [n, A, K]
        q_embedding = self.q_embedding(mask, rows)  # drawn with the latent axis first, as z is
        embedding = q_embedding.loc + normal(self.make_rng("globals"), q_embedding.batch_shape,
                                             last_axis_first=True) * q_embedding.scale
        return jnp.einsum("na,nak->nk", weights, embedding * mask)

    def prior_shift(self, dosages, max_active: int):
        """Generated cells: global variables from the guide (independently per row), so
        ``z_basal + offset`` has prior mean :meth:`sample_offsets`; no decoder extras."""
        return self.sample_offsets(dosages, max_active), ()

    def encode(self, x, dosages):
        """Posterior mean of ``z_basal`` (``[n, K]``) for one draw of the global variables."""
        shift, _, _, _ = self.sample_globals()
        return self.q_z_basal(x, dosages @ shift).loc

    # --- interpretation ---------------------------------------------------------------
    def embedding_means(self):
        """Mean of ``q(embedding | mask)`` at the most probable mask (``[T, K]``)."""
        return self.q_embedding(self.most_probable_mask()).mean


class SAMSVAE(LearnedMask, AdditiveShiftVAE):
    """SAMS-VAE (SPEC 1-2): a sparse mask with a Bernoulli(``mask_prior_prob``) prior; the
    mask's guide, sampling and :meth:`mask_probs` come from :class:`LearnedMask`."""

    guide: str = "correlated"
    mask_prior_prob: float = 0.01

    def sample_mask(self):
        """Straight-through mask sample ``[T, K]`` and its ``(log_p, log_q, kl)`` dicts."""
        mask = self.straight_through_mask()
        return (mask, *self.mask_terms(mask))

    def mask_terms(self, mask):
        log_q = {"mask": dist.BernoulliLogits(match_particles(self.mask_logits, mask)).log_prob(mask).sum(-1)}
        log_p = {"mask": dist.BernoulliProbs(self.mask_prior_prob).log_prob(mask).sum(-1)}
        return log_p, log_q, {"mask": bernoulli_kl(self.mask_logits, self.mask_prior_prob).sum(-1)}


class SAMSVAEBetaBernoulli(SAMSVAE):
    """SAMS-VAE whose mask probabilities have a Beta prior (SPEC 4)::

        mask_prob[t, k] ~ Beta(mask_beta_a, mask_beta_b)
        mask[t, k] ~ Bernoulli(mask_prob[t, k])

    the rest as in :class:`SAMSVAE` (``mask_prior_prob`` is not used). Guide, as for
    SVAE+: ``q(mask_prob)`` is a point mass at ``sigmoid(mask_logits)`` (a MAP estimate:
    ``log q = 0``, ``log p`` = the Beta log-density there, plated variable
    ``mask_prob``) and ``q(mask | mask_prob) = Bernoulli(mask_prob)``, sampled by
    Gumbel-softmax straight-through. Prior and guide of the mask given ``mask_prob`` are
    then the same Bernoulli, so the mask's ``log p - log q`` is zero and the Beta density
    is what pulls the logits (towards 0 for the default Beta(1, 2)). ``q(mask)``,
    predictions and :meth:`mask_probs` are those of :class:`SAMSVAE`.
    """

    mask_beta_a: float = 1.0
    mask_beta_b: float = 2.0
    unused_fields = ("mask_prior_prob",)  # inherited and not used: not read from the config

    def mask_terms(self, mask):
        return beta_bernoulli_mask_terms(self.mask_logits, mask, self.mask_beta_a, self.mask_beta_b)


class CPAVAE(AdditiveShiftVAE):
    """CPA-VAE (SPEC 4): SAMS-VAE without the mask, ``z = z_basal + D @ embedding``,
    with a mean-field ``q(embedding)``. Equals :class:`SAMSVAE` (``guide="mean_field"``)
    with the mask fixed to ones: the key the mask would have used is still taken from the
    ``"globals"`` stream, so both draw the same embeddings from the same keys."""

    guide = "mean_field"  # a constant, not a config field

    def setup_mask(self):
        pass

    def sample_mask(self):
        self.make_rng("globals")  # the mask's key, unused (see the class docstring)
        return jnp.ones((self.n_perturbations, self.n_latent)), {}, {}, {}

    def sample_row_masks(self, rows):
        self.make_rng("globals")
        return jnp.ones((*rows.shape, self.n_latent))

    def most_probable_mask(self):
        return jnp.ones((self.n_perturbations, self.n_latent))
