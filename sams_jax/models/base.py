"""What every model hands to the shared objective.

A model is a Flax module whose ``__call__(x, dosages, library_size)`` draws **one
particle** and returns its log-densities as :class:`ParticleTerms`:

* *local* variables (one per cell, e.g. ``z_basal``): ``log p`` and ``log q`` of shape
  ``[n_cells]``, summed over latent dimensions;
* *perturbation-plated* (global) variables (one per perturbation, e.g. ``mask``,
  ``embedding``): ``log p`` and ``log q`` of shape ``[n_perturbations]``, summed over
  latent dimensions, drawn once per particle and shared by every cell;
* ``log_likelihood``: ``log p(x | z)`` of shape ``[n_cells]``, summed over genes;
* ``local_kl`` / ``global_kl``: where the model can compute it in closed form, the exact
  ``KL(q || p)`` of a variable (given the particle's draws of the variables it is
  conditioned on), same shapes as its ``log p``; the objective uses it in place of the
  sampled ``log q - log p`` when asked to (``objective.analytic_kl``).

Random numbers come from two named streams: ``"globals"`` (perturbation-plated draws) and
``"local"`` (per-cell draws), so evaluation can share global draws across chunks of cells.
Encoder-input normalisation statistics live in the non-trainable ``"normalization"``
collection (``mean`` and ``scale``, ``[n_genes]`` each).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp


class ParticleTerms(NamedTuple):
    log_likelihood: jnp.ndarray  # [n_cells]
    local_log_p: dict  # name -> [n_cells]
    local_log_q: dict  # name -> [n_cells]
    global_log_p: dict  # name -> [n_perturbations]
    global_log_q: dict  # name -> [n_perturbations]
    local_kl: dict = {}  # name -> [n_cells], closed-form KL(q || p) where available
    global_kl: dict = {}  # name -> [n_perturbations]
