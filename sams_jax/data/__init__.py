"""Data sets as :class:`PerturbationData` (the one interface models train on)."""

from sams_jax.data.dataset import (
    DataError,
    NORMALIZATIONS,
    PerturbationData,
    SPLITS,
    metadata_differences,
    normalization_stats,
    normalize_input,
    plate_scale,
)
from sams_jax.data.simulation import simulate

DATA_SOURCES = ("simulation", "anndata")


def load_data(data_config, likelihood: str | None = None) -> PerturbationData:
    """Build the data set named by ``data_config.source`` (see ``configs/``). ``likelihood``
    (``config.model.likelihood``) selects the count checks of AnnData input."""
    if data_config.source == "anndata":
        from sams_jax.data.anndata_io import from_config

        return from_config(data_config, likelihood)
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
    "metadata_differences", "normalization_stats", "normalize_input", "plate_scale", "simulate",
]
