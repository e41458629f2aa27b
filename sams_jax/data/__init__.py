"""Data sets as :class:`PerturbationData` (the one interface models train on)."""

from sams_jax.data.dataset import (
    DataError,
    NORMALIZATIONS,
    PerturbationData,
    SPLITS,
    normalization_stats,
    normalize_input,
    plate_scale,
)
from sams_jax.data.simulation import simulate

DATA_SOURCES = ("simulation",)


def load_data(data_config) -> PerturbationData:
    """Build the data set named by ``data_config.source`` (see ``configs/``)."""
    if data_config.source == "simulation":
        return simulate(
            n_latent=data_config.n_latent,
            n_perturbations=data_config.n_perturbations,
            n_genes=data_config.n_genes,
            mask_prob=data_config.mask_prob,
            exponentiate=data_config.exponentiate,
            noise_fraction=data_config.noise_fraction,
            cells_per_perturbation=tuple(data_config.cells_per_perturbation),
            observation=data_config.observation,
            seed=data_config.seed,
        )
    raise ValueError(f"unknown data.source {data_config.source!r}; allowed: {DATA_SOURCES}")


__all__ = [
    "DATA_SOURCES", "DataError", "NORMALIZATIONS", "PerturbationData", "SPLITS", "load_data",
    "normalization_stats", "normalize_input", "plate_scale", "simulate",
]
