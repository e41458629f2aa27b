"""The data interface every model trains on: :class:`PerturbationData`.

A data set is a cell-by-gene matrix ``x`` (``[n_cells, n_genes]``), a dosage matrix
``dosages`` (``[n_cells, n_perturbations]``; a control cell's row is all zeros, a pair has
two non-zeros), a split label per cell (``train`` / ``val`` / ``test``), per-cell library
sizes, and names for genes and perturbations. Simulations also carry their ground truth.
Loaders (the simulation; AnnData files in :mod:`sams_jax.data.anndata_io`) fill this
class; training, checkpoints and evaluation read only from it and from
:meth:`PerturbationData.metadata`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import jax.numpy as jnp

SPLITS = ("train", "val", "test")
NORMALIZATIONS = ("log_standardize", "standardize", "none")
MIN_SCALE = 1e-6


class DataError(ValueError):
    """Bad input data; the message names the problem and the fix."""


@dataclasses.dataclass
class PerturbationData:
    x: np.ndarray  # [n_cells, n_genes] float32 (raw counts for count likelihoods)
    dosages: np.ndarray  # [n_cells, n_perturbations] float32
    split: np.ndarray  # [n_cells] str, values in SPLITS
    feature_names: list[str]
    perturbation_names: list[str]
    library_size: np.ndarray  # [n_cells] float32
    control: str | None = None  # reference intervention for ATEs ("control" = all zeros)
    truth: dict[str, np.ndarray] | None = None  # simulation ground truth
    name: str = "data"
    registration: dict[str, Any] | None = None  # how an AnnData was read (sams_jax.data.anndata_io)

    @classmethod
    def from_anndata(cls, adata_or_path, **kwargs) -> "PerturbationData":
        """Register an AnnData or ``.h5ad`` path; see
        :func:`sams_jax.data.anndata_io.from_anndata` for the arguments and checks."""
        from sams_jax.data.anndata_io import from_anndata

        return from_anndata(adata_or_path, **kwargs)

    @property
    def n_genes(self) -> int:
        return self.x.shape[1]

    @property
    def n_perturbations(self) -> int:
        return self.dosages.shape[1]

    def validate(self, likelihood: str | None = None) -> None:
        """Raise :class:`DataError` on inconsistent shapes, unknown split labels,
        non-finite values, or (for count likelihoods) negative / non-integer counts."""
        n = self.x.shape[0]
        if self.x.ndim != 2 or self.dosages.ndim != 2:
            raise DataError(f"x and dosages must be 2-D; got x {self.x.shape}, dosages {self.dosages.shape}")
        for key, arr in (("dosages", self.dosages), ("split", self.split), ("library_size", self.library_size)):
            if arr.shape[0] != n:
                raise DataError(f"{key} has {arr.shape[0]} rows but x has {n} cells")
        if len(self.feature_names) != self.n_genes:
            raise DataError(f"{len(self.feature_names)} feature names for {self.n_genes} genes")
        if len(self.perturbation_names) != self.n_perturbations:
            raise DataError(
                f"{len(self.perturbation_names)} perturbation names for {self.n_perturbations} dosage columns")
        unknown = sorted(set(np.unique(self.split).tolist()) - set(SPLITS))
        if unknown:
            raise DataError(f"unknown split labels {unknown}; allowed: {list(SPLITS)}")
        if not np.any(self.split == "train"):
            raise DataError("the data has no training cells (split == 'train')")
        for key, arr in (("x", self.x), ("dosages", self.dosages), ("library_size", self.library_size)):
            bad = ~np.isfinite(arr)
            if bad.any():
                rows = np.unique(np.nonzero(bad)[0])[:5].tolist()
                raise DataError(
                    f"{key} contains {int(bad.sum())} non-finite values (NaN or inf), e.g. in cells {rows}; "
                    "remove or impute those cells before training")
        if likelihood in ("poisson", "library_nb"):
            if (self.x < 0).any():
                raise DataError(f"likelihood {likelihood!r} needs non-negative counts, but x has negative values; "
                                "pass raw counts (e.g. layers['counts']) or use likelihood='normal'")
            if not np.array_equal(self.x, np.round(self.x)):
                raise DataError(f"likelihood {likelihood!r} needs integer counts, but x has non-integer values; "
                                "pass raw counts (e.g. layers['counts']) or use likelihood='normal'")

    def mask(self, split: str) -> np.ndarray:  # [n_cells] bool
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
        return self.split == split

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        """The cells of one split as ``{"x", "dosages", "library_size"}`` arrays."""
        keep = self.mask(split)
        return {"x": self.x[keep], "dosages": self.dosages[keep], "library_size": self.library_size[keep]}

    def cells_per_perturbation(self, split: str) -> np.ndarray:  # [n_perturbations] int
        """``N_t``: number of cells of ``split`` that received perturbation ``t``."""
        return (self.dosages[self.mask(split)] != 0).sum(axis=0).astype(np.int64)

    def normalization_stats(self, method: str) -> dict[str, np.ndarray]:
        """Per-gene encoder-input statistics from the training split (SPEC 2)."""
        return normalization_stats(self.x[self.mask("train")], method)

    def metadata(self, normalization: str) -> dict[str, Any]:
        """Everything evaluation needs besides the parameters, JSON-serialisable."""
        return {
            "name": self.name,
            "feature_names": list(self.feature_names),
            "perturbation_names": list(self.perturbation_names),
            "control": self.control,
            "normalization": normalization,
            "normalization_stats": {k: v.tolist() for k, v in self.normalization_stats(normalization).items()},
            "cells_per_perturbation": {s: self.cells_per_perturbation(s).tolist() for s in SPLITS},
            "n_cells": {s: int(self.mask(s).sum()) for s in SPLITS},
            "registration": self.registration,
        }


def normalization_stats(x_train: np.ndarray, method: str) -> dict[str, np.ndarray]:
    """``{"mean": [G], "scale": [G]}`` for ``log_standardize`` (on ``log(x + 1)``) or
    ``standardize`` (on ``x``); zeros / ones for ``none``. A gene constant on the training
    split gets scale 1 instead of 0."""
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {method!r}; allowed: {NORMALIZATIONS}")
    g = x_train.shape[1]
    if method == "none":
        return {"mean": np.zeros(g, np.float32), "scale": np.ones(g, np.float32)}
    values = np.log1p(x_train.astype(np.float64)) if method == "log_standardize" else x_train.astype(np.float64)
    mean = values.mean(axis=0)
    scale = values.std(axis=0)
    scale = np.where(scale < MIN_SCALE, 1.0, scale)
    return {"mean": mean.astype(np.float32), "scale": scale.astype(np.float32)}


def normalize_input(x, stats, method: str):
    """Encoder input ``[..., G]`` from raw ``x`` and training-split ``stats`` (jittable)."""
    if method == "log_standardize":
        x = jnp.log1p(x)
    return (x - stats["mean"]) / stats["scale"]


def plate_scale(cells_per_perturbation) -> np.ndarray:  # [T] float32
    """``1 / N_t`` where ``N_t > 0`` and ``0`` elsewhere: the plate weight of SPEC 3 is
    ``w[i, t] = 1[D[i, t] != 0] * plate_scale[t]``."""
    n_t = np.asarray(cells_per_perturbation, dtype=np.float64)
    return np.where(n_t > 0, 1.0 / np.maximum(n_t, 1.0), 0.0).astype(np.float32)
