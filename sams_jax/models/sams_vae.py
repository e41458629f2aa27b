"""SAMS-VAE: sparse additive mechanism shift VAE (SPEC 1-2).

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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpyro.distributions as dist

from sams_jax.data import normalize_input
from sams_jax.likelihoods import LikelihoodHead
from sams_jax.models.base import ParticleTerms
from sams_jax.nn import NormalHead, ResidualMLP, straight_through_bernoulli, VARIANCE_FLOOR

GUIDES = ("mean_field", "correlated")


class SAMSVAE(nn.Module):
    n_genes: int
    n_perturbations: int
    n_latent: int = 15
    likelihood: str = "normal"
    guide: str = "correlated"
    mean_field_encoder: bool = False
    normalization: str = "standardize"
    decoder_n_layers: int = 1
    decoder_n_hidden: int = 50
    basal_encoder_n_layers: int = 1
    basal_encoder_n_hidden: int = 50
    embedding_encoder_n_layers: int = 2
    embedding_encoder_n_hidden: int = 50
    mask_prior_prob: float = 0.01
    embedding_prior_scale: float = 1.0
    mask_init_logits: float = 0.0
    gs_temperature: float = 1.0
    embedding_loc_init_scale: float = 0.0

    def setup(self):
        t, k = self.n_perturbations, self.n_latent
        self.mask_logits = self.param("mask_logits", nn.initializers.constant(self.mask_init_logits), (t, k))
        if self.guide == "mean_field":
            loc_init = (nn.initializers.normal(self.embedding_loc_init_scale)
                        if self.embedding_loc_init_scale > 0 else nn.initializers.zeros)
            self.embedding_loc = self.param("embedding_loc", loc_init, (t, k))
            self.embedding_log_scale = self.param("embedding_log_scale", nn.initializers.zeros, (t, k))
        elif self.guide == "correlated":
            self.embedding_encoder = ResidualMLP(
                self.embedding_encoder_n_hidden, self.embedding_encoder_n_layers, row_one_hot=True)
            self.embedding_head = NormalHead(k)
        else:
            raise ValueError(f"unknown guide {self.guide!r}; allowed: {GUIDES}")
        self.basal_encoder = ResidualMLP(self.basal_encoder_n_hidden, self.basal_encoder_n_layers)
        self.basal_head = NormalHead(k)
        self.decoder = ResidualMLP(self.decoder_n_hidden, self.decoder_n_layers)
        self.likelihood_head = LikelihoodHead(self.likelihood, self.n_genes)
        self.norm_mean = self.variable("normalization", "mean", jnp.zeros, (self.n_genes,))
        self.norm_scale = self.variable("normalization", "scale", jnp.ones, (self.n_genes,))

    # --- guide pieces -------------------------------------------------------------
    def q_embedding(self, mask):  # mask [T, K] -> Normal with batch shape [T, K]
        if self.guide == "mean_field":
            return dist.Normal(self.embedding_loc, jnp.exp(self.embedding_log_scale) + VARIANCE_FLOOR)
        return self.embedding_head(self.embedding_encoder(mask))

    def sample_globals(self):
        """One particle of the perturbation-plated variables.

        Returns ``(shift [T, K], log_p, log_q)`` with ``shift = embedding * mask`` and
        ``log_p`` / ``log_q`` dicts of ``[T]`` arrays (summed over latent dimensions).
        """
        mask = straight_through_bernoulli(self.make_rng("globals"), self.mask_logits, self.gs_temperature)
        q_embedding = self.q_embedding(mask)
        embedding = q_embedding.rsample(self.make_rng("globals"))
        log_q = {
            "mask": dist.BernoulliLogits(self.mask_logits).log_prob(mask).sum(-1),
            "embedding": q_embedding.log_prob(embedding).sum(-1),
        }
        log_p = {
            "mask": dist.BernoulliProbs(self.mask_prior_prob).log_prob(mask).sum(-1),
            "embedding": dist.Normal(0.0, self.embedding_prior_scale).log_prob(embedding).sum(-1),
        }
        return embedding * mask, log_p, log_q

    # --- one particle ---------------------------------------------------------------
    def __call__(self, x, dosages, library_size) -> ParticleTerms:
        """x ``[n, G]``, dosages ``[n, T]``, library_size ``[n]`` -> :class:`ParticleTerms`."""
        shift, global_log_p, global_log_q = self.sample_globals()
        offset = dosages @ shift  # [n, K]
        x_encoder = normalize_input(x, {"mean": self.norm_mean.value, "scale": self.norm_scale.value},
                                    self.normalization)
        q_z_basal = self.basal_head(self.basal_encoder(x_encoder, None if self.mean_field_encoder else offset))
        z_basal = q_z_basal.rsample(self.make_rng("local"))
        p_x = self.likelihood_head(self.decoder(z_basal + offset), library_size)
        return ParticleTerms(
            log_likelihood=p_x.log_prob(x).sum(-1),
            local_log_p={"z_basal": dist.Normal(0.0, 1.0).log_prob(z_basal).sum(-1)},
            local_log_q={"z_basal": q_z_basal.log_prob(z_basal).sum(-1)},
            global_log_p=global_log_p,
            global_log_q=global_log_q,
        )

    # --- interpretation ---------------------------------------------------------------
    def mask_probs(self):  # [T, K]
        return jax.nn.sigmoid(self.mask_logits)
