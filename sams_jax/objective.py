"""The one objective all models share (SPEC 3) and the predictive IWELBO (SPEC 5).

For particle ``s`` and cell ``i``::

    elbo[s, i] = log p(x_i | z[s, i])
               + sum_local_v  c_v * (log p_v[s, i] - log q_v[s, i])
               + sum_global_v c_v * sum_t w_v[i, t] * (log p_v[s, t] - log q_v[s, t])

with plate weight ``w_v[i, t] = 1[D[i, t] != 0] / N_t`` (0 where ``N_t = 0``), so that over
a full pass of the training set each perturbation's global term is counted once and the
mini-batch mean is an unbiased estimate of ``ELBO / n_train``. ``c_v`` are optional
custom weights (default 1). Variables listed in ``per_cell_variables`` instead get
``w_v[i, t] = 1[D[i, t] != 0]`` (their term is counted once per cell that received ``t``,
i.e. an extra weight ``N_t``).

Variables listed in ``analytic_kl`` (an option; the paper's estimator is the default)
contribute ``-KL(q_v || p_v)`` in closed form (given the particle's draws of what ``q_v``
and ``p_v`` condition on) instead of the one-sample ``log p_v - log q_v``. Both have the
same expectation, so the ELBO is unchanged, but the closed form has no sampling noise:
for the mask, the sampled term's gradient with respect to the logits is ``m - sigmoid(l)``
(zero mean, pure noise) plus a straight-through path, while the closed form gives the
exact pull ``sigmoid'(l) (l - logit(prior))`` towards the prior. Only with ``kind="elbo"``:
the importance weights of an IWELBO need sampled densities.

A multiplier may be annealed (an option): with ``initial_variable_weights`` (e.g.
``"mask=500"``) and ``weight_anneal_steps = A``, training step ``n`` uses
``c_v(n) = c0_v^(1 - r) * c_v^r`` with ``r = min(n / A, 1)`` (linear when either is 0);
validation, model selection and evaluation use the final ``c_v``.

``kind="elbo"``: loss = ``-mean_{s,i} elbo[s, i]``.
``kind="iwelbo"``: loss = ``-mean_i (logsumexp_s elbo[s, i] - log S)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sams_jax.models.base import ParticleTerms
from sams_jax.nn import PARTICLE_AXIS

OBJECTIVES = ("elbo", "iwelbo")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    kind: str = "elbo"
    n_particles: int = 5
    variable_weights: tuple[tuple[str, float], ...] = ()  # ((name, multiplier), ...)
    per_cell_variables: tuple[str, ...] = ()
    analytic_kl: tuple[str, ...] = ()
    initial_variable_weights: tuple[tuple[str, float], ...] = ()  # annealed towards variable_weights
    weight_anneal_steps: int = 0

    def __post_init__(self):
        if bool(self.initial_variable_weights) != (self.weight_anneal_steps > 0):
            given, missing = ("initial_variable_weights", "weight_anneal_steps") if self.initial_variable_weights \
                else ("weight_anneal_steps", "initial_variable_weights")
            legacy = "" if self.initial_variable_weights else \
                " (a run saved with weight_anneal_steps alone, which annealed nothing, resumes with weight_anneal_steps=0)"
            raise ValueError(f"objective.{given} is set but objective.{missing} is not, so nothing would be "
                             "annealed; set both (e.g. initial_variable_weights='mask=500', weight_anneal_steps="
                             f"5000), or neither{legacy}")
        if self.analytic_kl and self.kind != "elbo":
            raise ValueError(f"objective.analytic_kl={','.join(self.analytic_kl)!r} needs objective.kind='elbo' "
                             f"(got {self.kind!r}): importance weights need sampled densities")

    @classmethod
    def from_config(cls, objective_config) -> "ObjectiveConfig":
        """From ``config.objective``; ``variable_weights`` is a string ``"mask=0.5,..."``
        and ``per_cell_variables`` / ``analytic_kl`` strings ``"mask,embedding"``."""
        return cls(kind=objective_config.kind, n_particles=int(objective_config.n_particles),
                   variable_weights=_parse_weights(objective_config.variable_weights, "variable_weights"),
                   initial_variable_weights=_parse_weights(objective_config.get("initial_variable_weights", ""),
                                                           "initial_variable_weights"),
                   weight_anneal_steps=int(objective_config.get("weight_anneal_steps", 0)),
                   per_cell_variables=tuple(_split_list(objective_config.per_cell_variables)),
                   analytic_kl=tuple(_split_list(objective_config.get("analytic_kl", ""))))

    def named_variables(self) -> dict[str, tuple[str, ...]]:
        """The variable names each option names (``{"objective.variable_weights": ("mask",), ...}``),
        options that name none left out."""
        named = {"variable_weights": tuple(name for name, _ in self.variable_weights),
                 "initial_variable_weights": tuple(name for name, _ in self.initial_variable_weights),
                 "per_cell_variables": self.per_cell_variables, "analytic_kl": self.analytic_kl}
        return {f"objective.{field}": names for field, names in named.items() if names}

    def check_variables(self, terms: ParticleTerms) -> None:
        """Raise ``ValueError`` if an option names a variable the model does not have
        (``terms``: one particle's terms, e.g. from ``jax.eval_shape``): any variable for
        the multipliers, a global (perturbation-plated) one for ``per_cell_variables``, one
        with a closed-form KL for ``analytic_kl``."""
        known = sorted(set(terms.local_log_p) | set(terms.global_log_p))
        plated = sorted(terms.global_log_p)
        offered = sorted(set(terms.local_kl) | set(terms.global_kl))
        for field, names in self.named_variables().items():
            for name in names:
                if name not in known:
                    raise ValueError(f"{field} names {name!r}, which this model does not have; its variables: "
                                     f"{known}")
                if field == "objective.per_cell_variables" and name not in plated:
                    raise ValueError(f"{field} names {name!r}, which is not a perturbation-plated variable of "
                                     f"this model (it is one per cell already); plated variables: "
                                     f"{plated or 'none'}")
                if field == "objective.analytic_kl" and name not in offered:
                    raise ValueError(f"{field} names {name!r}, but this model has no closed-form KL for it; "
                                     f"variables with one: {offered or 'none'}")

    def weight(self, name: str, step=None):
        """Multiplier of variable ``name``: the final one, or its annealed value at
        training step ``step`` (a traced integer) when an annealing schedule is set."""
        final = dict(self.variable_weights).get(name, 1.0)
        initial = dict(self.initial_variable_weights).get(name, final)
        if step is None or self.weight_anneal_steps <= 0 or initial == final:
            return final
        progress = jnp.minimum(step / self.weight_anneal_steps, 1.0)
        if initial > 0 and final > 0:
            return jnp.exp((1 - progress) * jnp.log(initial) + progress * jnp.log(final))
        return (1 - progress) * initial + progress * final


def _parse_weights(spec: str, field: str) -> tuple[tuple[str, float], ...]:
    weights = []
    for item in _split_list(spec):
        name, _, value = item.partition("=")
        try:
            weights.append((name.strip(), float(value)))
        except ValueError:
            raise ValueError(f"objective.{field}: cannot parse {item!r}; expected 'name=number,...', "
                             "e.g. 'mask=0.5'") from None
    if any(not math.isfinite(value) or value < 0 for _, value in weights):
        raise ValueError(f"objective.{field}={spec!r}: multipliers must be finite and >= 0")
    repeated = sorted({name for name, _ in weights if [n for n, _ in weights].count(name) > 1})
    if repeated:
        raise ValueError(f"objective.{field}={spec!r} names {repeated} more than once; give each variable one "
                         "multiplier")
    return tuple(sorted(weights))


def _split_list(spec: str) -> list[str]:
    return [item.strip() for item in spec.split(",") if item.strip()]


def particle_keys(rng, n_particles: int):
    """``(global_keys, local_keys)``, each ``[n_particles]``, from one key."""
    global_keys, local_keys = jax.random.split(rng, (2, n_particles))
    return global_keys, local_keys


def sample_particles(apply_fn: Callable, variables, batch, global_keys, local_keys) -> ParticleTerms:
    """One particle per key pair; every leaf of the result gains a leading ``[S]`` axis.

    ``apply_fn(variables, x, dosages, library_size, rngs=...)`` is the model's ``apply``;
    ``global_keys`` / ``local_keys`` are ``[S]`` keys for the ``"globals"`` / ``"local"``
    streams. The batch is not batched over particles, so work that depends only on the
    cell (the observation part of the encoder's first layer) runs once, not once per
    particle.
    """

    def one(global_key, local_key):
        return apply_fn(variables, batch["x"], batch["dosages"], batch["library_size"],
                        rngs={"globals": global_key, "local": local_key})

    return jax.vmap(one, axis_name=PARTICLE_AXIS)(global_keys, local_keys)


def _log_ratio(name: str, log_p: dict, log_q: dict, kl: dict, config: ObjectiveConfig):
    """``log p_v - log q_v`` of variable ``name``, or ``-KL(q_v || p_v)`` if it is in
    ``config.analytic_kl``."""
    if name not in config.analytic_kl:
        return log_p[name] - log_q[name]
    if name not in kl:
        offered = sorted(kl) or "none"
        raise ValueError(f"objective.analytic_kl names {name!r}, but this model has no closed-form KL for it; "
                         f"variables with one: {offered}")
    return -kl[name]


def check_objective_variables(apply_fn: Callable, variables, batch, config: ObjectiveConfig) -> None:
    """Raise ``ValueError`` if an option of ``config`` (``variable_weights``,
    ``initial_variable_weights``, ``per_cell_variables``, ``analytic_kl``) names a variable
    the model does not have (:meth:`ObjectiveConfig.check_variables`). Traces one particle
    abstractly: nothing is compiled or run."""
    if not config.named_variables():
        return
    keys = particle_keys(jax.random.key(0), 1)
    config.check_variables(jax.eval_shape(lambda v, b: sample_particles(apply_fn, v, b, *keys), variables, batch))


def elbo_per_cell(terms: ParticleTerms, dosages, plate_scale, config: ObjectiveConfig, step=None):
    """``elbo[s, i]`` (``[S, n]``) from particle terms (leaves ``[S, ...]``); ``step``
    (training only) selects annealed multipliers."""
    elbo = terms.log_likelihood
    for name in terms.local_log_p:
        elbo = elbo + config.weight(name, step) * _log_ratio(name, terms.local_log_p, terms.local_log_q,
                                                       terms.local_kl, config)
    if not terms.global_log_p:
        return elbo
    global_term = 0.0  # [S, T]: sum_v c_v * (log p_v - log q_v) * (1/N_t, or 1 if per-cell)
    for name in terms.global_log_p:
        scale = 1.0 if name in config.per_cell_variables else plate_scale
        global_term = global_term + config.weight(name, step) * scale * _log_ratio(
            name, terms.global_log_p, terms.global_log_q, terms.global_kl, config)
    received = (dosages != 0).astype(global_term.dtype)  # [n, T]
    elbo = elbo + global_term @ received.T
    return elbo


def reduce_objective(elbo, kind: str):
    """Per-cell objective ``[n]`` from ``elbo[s, i]``: the particle mean or the IWELBO."""
    if kind == "elbo":
        return elbo.mean(0)
    if kind == "iwelbo":
        return jax.nn.logsumexp(elbo, axis=0) - jnp.log(elbo.shape[0])
    raise ValueError(f"unknown objective kind {kind!r}; allowed: {OBJECTIVES}")


def loss_fn(apply_fn: Callable, config: ObjectiveConfig, variables, rng, batch, plate_scale, step=None):
    """Scalar training loss (minus the mean per-cell objective) for one mini-batch.

    batch: ``{"x": [n, G], "dosages": [n, T], "library_size": [n]}``; plate_scale ``[T]``
    (``1 / N_t`` of the split, 0 where ``N_t = 0``); ``step``: the training step (for
    annealed multipliers; None = final multipliers).
    """
    terms = sample_particles(apply_fn, variables, batch, *particle_keys(rng, config.n_particles))
    elbo = elbo_per_cell(terms, batch["dosages"], plate_scale, config, step)
    return -reduce_objective(elbo, config.kind).mean()


def predictive_log_weights(terms: ParticleTerms):
    """``[S, n]`` log importance weights of the predictive IWELBO (SPEC 5): likelihood
    plus local ``log p - log q``; global variables are not scored against their priors."""
    log_w = terms.log_likelihood
    for name in terms.local_log_p:
        log_w = log_w + terms.local_log_p[name] - terms.local_log_q[name]
    return log_w


def chunked_per_cell(fn: Callable, arrays: dict, chunk_size: int, first_chunk=0):
    """Apply ``fn(batch, chunk_index) -> [chunk]`` to fixed-size chunks of the cells in
    ``arrays`` (leaves ``[n, ...]``) with ``lax.map``, so memory stays bounded by one
    chunk; returns ``[n]``. Jittable.

    Chunk ``i`` holds cells ``i * chunk + r`` in its rows ``r``. Each chunk is sliced out of
    ``arrays`` in place (no padded copy of them); the last one, where fewer than ``chunk``
    cells are left, is read from the arrays' end and rotated so that every cell keeps its
    row. Its rows past the end then hold earlier cells (whose scores are dropped) instead
    of zeros: a cell's score depends only on its own row, so the scores of the real cells
    are the same as with zero padding.

    ``first_chunk`` (an int or a traced scalar) numbers the chunks from there: a split
    scored block by block (host data, :mod:`sams_jax.streaming`) passes the index of the
    block's first chunk within the split, and gets the same random draws per cell as
    scoring the whole split at once."""
    n = arrays["x"].shape[0]
    chunk = min(chunk_size, n)
    n_chunks = -(-n // chunk)

    def score_chunk(index):
        start = jnp.minimum(index * chunk, n - chunk)
        behind = index * chunk - start  # 0 but for a last, partial chunk
        batch = jax.tree.map(lambda v: jnp.roll(jax.lax.dynamic_slice_in_dim(v, start, chunk), -behind, axis=0),
                             arrays)
        return fn(batch, index + first_chunk)

    out = jax.lax.map(score_chunk, jnp.arange(n_chunks))
    return out.reshape(-1)[:n]


def score_split(apply_fn: Callable, variables, rng, arrays, n_particles: int, score: Callable,
                chunk_size: int = 1024, first_chunk=0):
    """Per-cell scores ``[n]`` over a whole split, in chunks of cells.

    ``n_particles`` global draws are shared by every chunk (and so by every cell); local
    draws differ per chunk. ``score(terms, batch) -> [chunk]`` reduces the particles.
    ``first_chunk``: see :func:`chunked_per_cell`.
    """
    global_keys, _ = particle_keys(rng, n_particles)
    local_key = jax.random.fold_in(rng, 1)

    def per_chunk(batch, index):
        local_keys = jax.random.split(jax.random.fold_in(local_key, index), n_particles)
        return score(sample_particles(apply_fn, variables, batch, global_keys, local_keys), batch)

    return chunked_per_cell(per_chunk, arrays, chunk_size, first_chunk)


def split_objective(apply_fn: Callable, config: ObjectiveConfig, variables, rng, arrays, plate_scale,
                    chunk_size: int = 1024, first_chunk=0):
    """Per-cell training objective ``[n]`` on a whole split (e.g. the validation loss),
    with the split's own ``plate_scale`` (``1 / N_t``)."""
    def score(terms, batch):
        return reduce_objective(elbo_per_cell(terms, batch["dosages"], plate_scale, config), config.kind)

    return score_split(apply_fn, variables, rng, arrays, config.n_particles, score, chunk_size, first_chunk)


IWELBO_CHUNK_ELEMENTS = {"cpu": 8 * 2**20}  # particles x cells x genes per chunk, per backend (CPU: 32 MB per
IWELBO_DEFAULT_CHUNK_ELEMENTS = 2**27        # float32 intermediate, cache-sized); others: 512 MB
IWELBO_MAX_CHUNK_CELLS = {"cpu": 256}  # per backend; others: IWELBO_DEFAULT_MAX_CHUNK_CELLS
IWELBO_DEFAULT_MAX_CHUNK_CELLS = 4096


def iwelbo_chunk_size(n_particles: int, n_genes: int, backend: str | None = None) -> int:
    """Cells per IWELBO chunk: the largest power of two (8 to the backend's entry of
    ``IWELBO_MAX_CHUNK_CELLS``, else ``IWELBO_DEFAULT_MAX_CHUNK_CELLS``) whose
    ``particles x cells x genes`` intermediates stay within the backend's entry of
    ``IWELBO_CHUNK_ELEMENTS`` (else ``IWELBO_DEFAULT_CHUNK_ELEMENTS``); ``backend``:
    default ``jax.default_backend()``.

    The CPU's bound keeps chunks cache-sized. On the 2-core CPU (one process alternating
    the compiled programs, ``benchmarks/RESULTS.md``): Replogle scale (1,187 genes, 100
    particles) runs 1.2x faster with 64 cells per chunk than with 1,024, and 1.06x faster
    than with 32; the default simulation (100 genes) 1.08x faster with 256 than with 512
    (128 is as fast as 256; 1,024 is 1.26x slower). A GPU wants few, large chunks: on an
    H200 (2026-11-27, one process) the Replogle-scale IWELBO took 0.226 s with the CPU's
    64-cell chunks, 0.098 s with 256, 0.065 s with 1,024 (this bound's choice) and 0.056 s
    with 4,096 (four times the memory, about 2 GB per float32 intermediate).

    The local draws depend on the chunking, so one seed gives different (equally valid)
    IWELBO estimates on backends whose chunk sizes differ."""
    backend = backend or jax.default_backend()
    largest = IWELBO_MAX_CHUNK_CELLS.get(backend, IWELBO_DEFAULT_MAX_CHUNK_CELLS)
    cells = IWELBO_CHUNK_ELEMENTS.get(backend, IWELBO_DEFAULT_CHUNK_ELEMENTS) // max(1, n_particles * n_genes)
    return int(min(largest, max(8, 2 ** int(np.floor(np.log2(max(cells, 1)))))))


CPU_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}


def compiler_options() -> dict | None:
    """XLA compiler options for ``jax.jit`` of the objective's computations (training
    chunks, validation loss, predictive IWELBO) on the default backend: on the CPU, loops
    over 512-bit vectors (XLA's default prefers 256 bits), which speeds up the elementwise
    work over particles x cells x genes. On the 2-core AVX-512 CPU where it was measured
    (one process alternating the compiled programs, ``benchmarks/RESULTS.md``), the
    numbers were the same bit for bit, and: simulation IWELBO 0.358 -> 0.298 s,
    Replogle-scale IWELBO 2% faster, training steps 2% (simulation) and 3% (Replogle
    scale) faster. With XLA's instruction set capped at AVX2 (as on a CPU without
    AVX-512) the option still helped: IWELBO 267 against 319 ms. The ATEs keep the
    default: at Replogle scale they were 8% slower with it. ``None`` on other backends."""
    return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


def predictive_iwelbo(apply_fn: Callable, variables, rng, arrays, n_particles: int, chunk_size: int = 1024,
                      first_chunk=0):
    """Per-cell predictive IWELBO ``[n]`` (SPEC 5): ``n_particles`` global draws from the
    guide shared by all cells; ``logsumexp_s log_w[s, i] - log S``."""
    def score(terms, batch):
        return reduce_objective(predictive_log_weights(terms), "iwelbo")

    return score_split(apply_fn, variables, rng, arrays, n_particles, score, chunk_size, first_chunk)
