"""Average treatment effects (SPEC 5), from a model and from data: one implementation.

``ATE(d) = E[f(x) | do(d)] - E[f(x) | do(d_0)]`` with ``f`` the identity (``scale="mean"``)
or, for ``scale="perturbseq"``, ``f(x) = log2(10,000 * x / sum(x) + 1)`` (each cell scaled
to 10,000 total counts, then log2(x + 1)).

Model expectations: for each intervention, ``n_particles`` draws of the global variables
from the guide and of the local latent from its prior, then ``x`` from the likelihood
(library size fixed at 10,000). Two estimators:

* ``method="paper"`` (default, the paper's): independent draws for every intervention and
  for the control. With ``scale="mean"`` and a likelihood whose independent draws have a
  closed-form sum (normal, Poisson; :func:`sams_jax.likelihoods.summed_observation`), the
  particle sum of ``x`` is drawn in one go given the particles' latents: for the normal
  likelihood, ``sum_s x_s = sum_s mu_s + N(0, sum_s sigma_s^2)`` instead of one normal per
  particle and gene. The estimate has exactly the paper's distribution (only the random
  numbers differ); ``summed_observations=False`` draws every cell's ``x`` instead. At
  simulation scale it takes about a fifth off the time (``benchmarks/RESULTS.md``);
* ``method="crn"`` (common random numbers): every intervention and the control use the
  *same* random numbers (drawn once and shared), so noise common to both (``z_basal``,
  the observation noise) cancels in the difference. Unbiased like the paper's estimator, with a far smaller
  variance for the same number of particles (see ``benchmarks/ate_throughput.py`` and the
  tests).

Computation: ``lax.map`` over chunks of interventions, ``vmap`` inside a chunk, and a
``lax.scan`` over chunks of particles accumulating sums, so memory is bounded by
``intervention_chunk x particle_chunk`` generated cells (each ``G`` genes plus the
decoder's hidden layer), independent of the total number of interventions and particles:
about ``4 * I_c * S_c * (G + H) * 4`` bytes for the count likelihoods' perturbseq scale
(XLA's memory analysis of the compiled Replogle-scale program, G = 1,187, H = 400:
60 MB of temporaries with 8 x 256 chunks, 4.2 GB with 64 x 2,500). The default chunks
depend on the backend (:func:`ate_chunk_sizes`): cache-sized ones on the CPU
(``I_c = 8``, ``S_c = 256`` at G = 1,187), few large ones elsewhere (``I_c = 64`` and all
2,500 particles at G = 1,187).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

SCALES = ("mean", "perturbseq")
METHODS = ("paper", "crn")
PERTURBSEQ_TOTAL = 10_000.0
LIBRARY_SIZE = 10_000.0


def transform(x, scale: str):
    """``f(x)`` per cell (``[..., G]``), jnp or np arrays."""
    if scale == "mean":
        return x
    if scale == "perturbseq":
        xp = jnp if isinstance(x, jax.Array) else np
        total = x.sum(-1, keepdims=True)
        return xp.log2(PERTURBSEQ_TOTAL * x / xp.where(total > 0, total, 1.0) + 1.0)
    raise ValueError(f"unknown ATE scale {scale!r}; allowed: {SCALES}")


def model_expectations(apply_fn: Callable, variables, dosages, rng, n_particles: int, scale: str,
                       method: str = "paper", max_active: int = 2, library_size: float = LIBRARY_SIZE,
                       intervention_chunk: int | None = None, particle_chunk: int | None = None,
                       summed_observations: bool = True):
    """``E[f(x) | do(d)]`` for each row ``d`` of ``dosages`` (``[I, T]``) -> ``[I, G]``.

    ``apply_fn`` is the model's ``apply``; its methods ``generate`` and
    ``generated_observation`` (``(variables, dosages [n, T], library_size [n], max_active,
    rngs=...)``) make the cells.

    ``method="paper"``: a chunk draws ``I_c x S_c`` cells, each with its own random
    numbers (or, with ``summed_observations`` where it applies, see the module docstring,
    the chunk's latents and one summed draw of ``x`` per intervention). The random numbers
    depend on the chunking and on the other rows (their number, ``max_active``): an
    intervention's estimate changes, within its Monte-Carlo error, when others are added.
    ``method="crn"``: the chunk's interventions share one set of random numbers (``vmap``
    over interventions with an unbatched key, so the draws are made once and broadcast),
    and so does the control. Jittable (everything but the arrays is static).
    ``intervention_chunk`` and ``particle_chunk`` default to :func:`ate_chunk_sizes` for
    the default backend; the random numbers depend on the chunking, so compare estimates
    made with the same chunk sizes (on the same kind of backend).
    """
    if method not in METHODS:
        raise ValueError(f"unknown ATE method {method!r}; allowed: {METHODS}")
    n_interventions, n_perturbations = dosages.shape
    if intervention_chunk is None or particle_chunk is None:
        n_genes = jax.eval_shape(lambda d: apply_fn(variables, d, jnp.ones((1,), d.dtype), max_active,
                                                    rngs={"globals": rng, "local": rng}, method="generate")[0],
                                 dosages[:1]).shape[-1]
        default_rows, default_particles = ate_chunk_sizes(n_genes, n_particles, intervention_chunk)
        intervention_chunk = intervention_chunk or default_rows
        particle_chunk = particle_chunk or default_particles
    chunk = min(particle_chunk, n_particles)
    n_particle_chunks = -(-n_particles // chunk)
    per_row = min(intervention_chunk, n_interventions)
    n_row_chunks = -(-n_interventions // per_row)
    padded = jnp.pad(dosages, ((0, n_row_chunks * per_row - n_interventions), (0, 0)))
    library = jnp.full((chunk,), library_size, dosages.dtype)

    def cells_apply(method_name, cells, key, **kwargs):  # cells [n, T]
        global_key, local_key = jax.random.split(key)
        return apply_fn(variables, cells, jnp.broadcast_to(library[:1], cells.shape[:1]), max_active, **kwargs,
                        rngs={"globals": global_key, "local": local_key}, method=method_name)

    def draw(cells, key):  # cells [n, T] -> f(x) [n, G]
        x, _ = cells_apply("generate", cells, key)
        return transform(x, scale)

    def summed(cells, key, valid):  # cells [I_c * S_c, T] -> sum_s valid_s x [I_c, G], or None
        observation_key, sum_key = jax.random.split(key)
        total = cells_apply("generated_observation", cells, observation_key, sum_weights=valid.astype(dosages.dtype))
        return None if total is None else total.sample(sum_key)

    use_sums = summed_observations and method == "paper" and scale == "mean"

    def chunk_sums(rows, row_chunk, particle_chunk_index, valid):  # rows [I_c, T] -> [I_c, G]
        if method == "crn":
            key = jax.random.fold_in(rng, particle_chunk_index)
            values = jax.vmap(lambda d: draw(jnp.broadcast_to(d, (chunk, n_perturbations)), key))(rows)
            return jnp.where(valid[None, :, None], values, 0.0).sum(1)
        key = jax.random.fold_in(jax.random.fold_in(rng, row_chunk), particle_chunk_index)
        cells = jnp.repeat(rows, chunk, axis=0)
        total = summed(cells, key, valid) if use_sums else None  # None: the likelihood has no closed-form sum
        if total is not None:
            return total
        values = draw(cells, key).reshape(per_row, chunk, -1)
        return jnp.where(valid[None, :, None], values, 0.0).sum(1)

    def row_chunk_sums(args):  # -> [I_c, G] sums over all particles
        rows, row_chunk = args

        def accumulate(total, index):
            valid = (index * chunk + jnp.arange(chunk)) < n_particles  # the last chunk may overrun
            return total + chunk_sums(rows, row_chunk, index, valid), None

        n_genes = jax.eval_shape(chunk_sums, rows, row_chunk, 0, jnp.ones((chunk,), bool)).shape[-1]
        total, _ = jax.lax.scan(accumulate, jnp.zeros((per_row, n_genes), dosages.dtype),
                                jnp.arange(n_particle_chunks))
        return total

    sums = jax.lax.map(row_chunk_sums, (padded.reshape(n_row_chunks, per_row, -1), jnp.arange(n_row_chunks)))
    return sums.reshape(n_row_chunks * per_row, -1)[:n_interventions] / n_particles


# generated cells x genes per chunk, per backend: the CPU's cache-sized (16 MB per float32 intermediate);
# other backends' (GPU, TPU) ATE_DEFAULT_CHUNK_ELEMENTS (1 GB)
ATE_CHUNK_ELEMENTS = {"cpu": 4 * 2**20}
ATE_DEFAULT_CHUNK_ELEMENTS = 2**28
# interventions per chunk, per backend; other backends' ATE_DEFAULT_INTERVENTION_CHUNK
ATE_INTERVENTION_CHUNK = {"cpu": 8}
ATE_DEFAULT_INTERVENTION_CHUNK = 64


def particle_chunk_size(n_genes: int, intervention_chunk: int = 8) -> int:
    """The CPU's particles per chunk of :func:`model_expectations`: chunks of
    ``intervention_chunk x particle_chunk`` generated cells, the largest power of two up to
    4,096 cells whose ``cells x genes`` stay within the CPU's ``ATE_CHUNK_ELEMENTS``. On
    the 2-core CPU that gives the fastest of the sizes measured at both benchmark scales:
    4,096 cells for the default simulation (100 genes; 17% faster than 2,048) and 2,048
    for the Replogle-scale screen (1,187 genes; 4,096 was no faster) (``benchmarks/RESULTS.md``)."""
    cells = min(4096, ATE_CHUNK_ELEMENTS["cpu"] // max(1, n_genes))
    cells = 2 ** int(np.floor(np.log2(max(cells, 1))))
    return max(1, cells // max(1, intervention_chunk))


def ate_chunk_sizes(n_genes: int, n_particles: int, intervention_chunk: int | None = None,
                    backend: str | None = None) -> tuple[int, int]:
    """Default ``(intervention_chunk, particle_chunk)`` of :func:`model_expectations` on
    ``backend`` (default ``jax.default_backend()``); ``intervention_chunk`` fixes the first.

    CPU: 8 interventions x :func:`particle_chunk_size` (cache-sized chunks). Other backends
    (GPU, TPU) want few, large chunks: ``ATE_DEFAULT_INTERVENTION_CHUNK`` interventions and
    as many particles as keep ``cells x genes`` within ``ATE_DEFAULT_CHUNK_ELEMENTS`` (all
    of them where they fit, else the fewest equal chunks). On an H200 (2026-11-27) the
    Replogle-scale ATEs (681 interventions x 2,500 particles x 1,187 genes) took 2.1-2.6 s
    with the CPU's 8 x 256 chunks, 0.83 s with 8 x 1,024, 0.48 s with 32 x 512 and 0.18 s
    with 64 x 2,500, this rule's choice (about 4 GB of temporaries)."""
    backend = backend or jax.default_backend()
    if backend == "cpu":
        rows = intervention_chunk or ATE_INTERVENTION_CHUNK["cpu"]
        return rows, min(max(1, n_particles), particle_chunk_size(n_genes, rows))
    elements = ATE_CHUNK_ELEMENTS.get(backend, ATE_DEFAULT_CHUNK_ELEMENTS)
    rows = intervention_chunk or min(ATE_INTERVENTION_CHUNK.get(backend, ATE_DEFAULT_INTERVENTION_CHUNK),
                                     max(1, elements // max(1, n_genes)))  # one particle each fits
    most = max(1, elements // max(1, n_genes * rows))  # particles per chunk within the bound
    n_chunks = -(-max(1, n_particles) // most)
    return rows, -(-max(1, n_particles) // n_chunks)


def _matching_rows(dosages: np.ndarray, interventions: np.ndarray) -> np.ndarray:
    """``[n]``: the index of the row of ``interventions`` ``[I, T]`` equal to each row of
    ``dosages`` ``[n, T]`` (as float32, ``-0.0 == 0.0``), or -1; one sort of the rows, no
    loop over cells."""
    rows = [np.asarray(a, np.float32).reshape(-1, interventions.shape[1]) + np.float32(0.0)
            for a in (interventions, dosages)]  # + 0.0 turns -0.0 into 0.0
    _, ids = np.unique(np.concatenate(rows), axis=0, return_inverse=True)
    ids = ids.reshape(-1)
    lookup = np.full(ids.max(initial=-1) + 1, -1)
    lookup[ids[:len(rows[0])]] = np.arange(len(rows[0]))
    return lookup[ids[len(rows[0]):]]


def data_expectations(x, dosages: np.ndarray, interventions: np.ndarray, scale: str,
                      cell_chunk: int = 16_384) -> np.ndarray:
    """Mean of ``f(x)`` over the cells whose dosage row equals each intervention row.

    x ``[n, G]`` (dense, scipy sparse, or a :class:`~sams_jax.data.matrix.BackedMatrix`
    read from disk), dosages ``[n, T]``, interventions ``[I, T]`` -> ``[I, G]`` (NaN for an
    intervention no cell received). Cells are processed in chunks of ``cell_chunk`` rows
    (read in increasing order), so ``f(x)`` is never densified for the whole matrix.
    """
    import scipy.sparse as sp

    group = _matching_rows(dosages, interventions)
    keep = np.nonzero(group >= 0)[0]
    n_groups = interventions.shape[0]
    sums = np.zeros((n_groups, x.shape[1]), np.float64)
    for start in range(0, keep.size, cell_chunk):
        cells = keep[start:start + cell_chunk]
        block = x[cells]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        indicator = sp.csr_matrix((np.ones(cells.size), (group[cells], np.arange(cells.size))),
                                  shape=(n_groups, cells.size))
        sums += indicator @ transform(block.astype(np.float64), scale)
    counts = np.bincount(group[keep], minlength=n_groups).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts[:, None] > 0, sums / counts[:, None], np.nan)
