"""Model registry: ``model.name`` in the config selects a Flax module.

Every model returns :class:`~sams_jax.models.base.ParticleTerms` for one particle, so the
shared objective (``sams_jax.objective``), training and evaluation need no model-specific
code.
"""

from __future__ import annotations

import dataclasses

from sams_jax.models.base import ParticleTerms
from sams_jax.models.sams_vae import GUIDES, SAMSVAE

MODELS = {"sams_vae": SAMSVAE}


def model_fields(name: str) -> tuple[str, ...]:
    """Config fields a model accepts (its module attributes, minus the data sizes)."""
    cls = MODELS[name]
    return tuple(f.name for f in dataclasses.fields(cls)
                 if f.name not in ("n_genes", "n_perturbations", "parent", "name"))


def create_model(model_config, n_genes: int, n_perturbations: int):
    """Instantiate ``MODELS[model_config.name]`` from the config's matching fields."""
    if model_config.name not in MODELS:
        raise ValueError(f"unknown model.name {model_config.name!r}; allowed: {sorted(MODELS)}")
    kwargs = {f: model_config[f] for f in model_fields(model_config.name) if f in model_config}
    return MODELS[model_config.name](n_genes=n_genes, n_perturbations=n_perturbations, **kwargs)


__all__ = ["GUIDES", "MODELS", "ParticleTerms", "SAMSVAE", "create_model", "model_fields"]
