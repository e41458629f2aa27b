"""Model registry: ``model.name`` in the config selects a Flax module.

Every model returns :class:`~sams_jax.models.base.ParticleTerms` for one particle, so the
shared objective (``sams_jax.objective``), training and evaluation need no model-specific
code. Models: ``sams_vae`` (SPEC 1-2), and the baselines of SPEC 4: ``cpa_vae``,
``conditional_vae``, ``svae_plus``, ``sams_vae_beta_bernoulli``. Every model builds on
:class:`~sams_jax.models.components.PerturbationVAE` (shared encoder, decoder, likelihood
head and normalisation, and ``generate``: cells under interventions, local latent from
its prior) and implements ``__call__`` (one particle), ``prior_shift`` (the local prior's
mean under interventions) and ``encode``; ``mask_probs`` and ``embedding_means`` where
the model has them.
"""

from __future__ import annotations

import dataclasses

from sams_jax.models.base import ParticleTerms
from sams_jax.models.components import PerturbationVAE
from sams_jax.models.conditional_vae import ConditionalVAE
from sams_jax.models.sams_vae import CPAVAE, GUIDES, SAMSVAE, SAMSVAEBetaBernoulli
from sams_jax.models.svae_plus import SVAEPlus, check_one_hot

MODELS = {
    "sams_vae": SAMSVAE,
    "cpa_vae": CPAVAE,
    "conditional_vae": ConditionalVAE,
    "svae_plus": SVAEPlus,
    "sams_vae_beta_bernoulli": SAMSVAEBetaBernoulli,
}


def model_fields(name: str) -> tuple[str, ...]:
    """Config fields a model accepts (its module attributes, minus the data sizes and the
    ones it inherits without using, its ``unused_fields``)."""
    cls = MODELS[name]
    skip = ("n_genes", "n_perturbations", "parent", "name", *getattr(cls, "unused_fields", ()))
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in skip)


def create_model(model_config, n_genes: int, n_perturbations: int):
    """Instantiate ``MODELS[model_config.name]`` from the config's matching fields."""
    if model_config.name not in MODELS:
        raise ValueError(f"unknown model.name {model_config.name!r}; allowed: {sorted(MODELS)}")
    kwargs = {f: model_config[f] for f in model_fields(model_config.name) if f in model_config}
    return MODELS[model_config.name](n_genes=n_genes, n_perturbations=n_perturbations, **kwargs)


def check_data(model_name: str, data) -> None:
    """Model-specific checks of the data before training; raises
    :class:`~sams_jax.data.DataError`. A model whose perturbations do not add
    (``composes_perturbations = False``, SVAE+) needs one-hot dosages."""
    if not getattr(MODELS[model_name], "composes_perturbations", True):
        check_one_hot(data.dosages)


__all__ = ["CPAVAE", "ConditionalVAE", "GUIDES", "MODELS", "ParticleTerms", "PerturbationVAE", "SAMSVAE",
           "SAMSVAEBetaBernoulli", "SVAEPlus", "check_data", "create_model", "model_fields"]
