"""Exact, vectorised samplers for the model's count likelihoods, fast on the CPU.

Used by :class:`sams_jax.likelihoods.GammaPoisson` when the model *generates* cells (ATE
estimation, ``predictor.sample``); training never samples counts.

Why not ``jax.random.gamma`` / ``poisson``: on the CPU they were the bottleneck of
count-valued ATEs (about 1,000 s for the Replogle-scale estimate). Three causes, three
remedies, all exact:

1. Random bits. JAX lowers its Threefry hash on the CPU as an unfused loop (60-80 M
   uniforms/s on 2 cores). :func:`uniform` and :func:`normal` compute the *same bits*
   with a straight-line hash (:func:`sams_jax.prng.threefry2x32`) that XLA fuses (about
   400 M uniforms/s); tests check equality with ``jax.random``.
2. A gamma draw per count. Most single-cell counts have small means and light tails;
   :func:`sample_negative_binomial` inverts their CDF directly, with one uniform per
   element, in one fused kernel of unrolled steps of the pmf recursion.
3. Rejection loops over whole arrays (a vectorised rejection sampler redraws the whole
   array until its *last* element is accepted; JAX's Poisson draws a whole array per
   unit of the rate). The rare elements that need more (large counts, large means,
   heavy tails) are gathered into small arrays (:func:`_fill_pending`, which finds them
   from flags packed 32 to a word) and finished there: the inversion goes on, or Gamma
   (Marsaglia-Tsang) then Poisson (inversion below rate 10, Hörmann's PTRS above). The
   gathered draws recompute their uniforms from the element numbers, so nothing of the
   full size but the counts is stored.

"Exact" here means exact up to float32 resolution, as for any float32 sampler: the
inversion stops where the float32 CDF stops growing (about ``1 - 3e-8``), which moves
the probability beyond that point, a few millionths at most for the tails inverted here,
onto the last count (uniforms have a resolution of ``2^-23`` anyway).

Every function takes an explicit key and is deterministic given it; shapes are static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sams_jax.prng import threefry2x32
from sams_jax.special import stirling_lgamma

NB_INVERSION_MAX_MEAN = 64.0  # NB inversion for means below this and ...
NB_INVERSION_MAX_ODDS = 63.0  # ... mean / concentration at most this (tail ratio m / (r + m) <= 63 / 64)
NB_INVERSION_STEPS = 48  # unrolled steps of the first pass (P(X >= 48): 0.5% at mean 8.4 and concentration 1)
CONTINUATION_STEPS = 8  # unrolled steps per round inside loops (XLA's CPU code for long chains in loop bodies is slow)
POISSON_INVERSION_MAX_RATE = 10.0  # Poisson rates below: inversion; at or above: PTRS


# --------------------------------------------------------------------------- bits

def _key_words(key):
    return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def random_bits(key, shape) -> jax.Array:
    """32 random bits per element, equal to ``jax.random.bits(key, shape, jnp.uint32)`` for
    JAX's default keys (Threefry, ``jax_threefry_partitionable`` on, the default since JAX
    0.5); other settings give different but equally random bits. ``key``: a typed key or
    raw key data; ``shape``: static, fewer than 2**32 elements."""
    size = int(np.prod(shape))
    if size >= 2**32:
        raise ValueError(f"random_bits: {size} elements; at most 2**32 - 1 per call")
    return _bits_at(key, jax.lax.iota(jnp.uint32, size).reshape(shape))


def _bits_at(key, counters) -> jax.Array:
    """The bits that ``random_bits(key, shape)`` gives at the flat element numbers
    ``counters`` (any shape): one element's bits without drawing the others."""
    words = _key_words(key)
    counters = counters.astype(jnp.uint32)
    high, low = threefry2x32(words[0], words[1], jnp.zeros_like(counters), counters)
    return high ^ low


def _uniform_from_bits(bits, minval=0.0, maxval=1.0) -> jax.Array:
    mantissa = (bits >> np.uint32(9)) | np.uint32(0x3F800000)
    floats = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0
    return jnp.maximum(jnp.float32(minval), floats * (jnp.float32(maxval) - minval) + minval)


def uniform(key, shape, minval=0.0, maxval=1.0) -> jax.Array:
    """float32 uniforms on ``[minval, maxval)``, equal to ``jax.random.uniform``."""
    return _uniform_from_bits(random_bits(key, shape), minval, maxval)


def normal(key, shape, last_axis_first: bool = False) -> jax.Array:
    """float32 standard normals, equal to ``jax.random.normal(key, shape)``; with
    ``last_axis_first``, to ``jax.random.normal(key, (shape[-1], *shape[:-1]))`` with that
    axis moved last (the same distribution, other numbers).

    XLA's CPU loop over an array runs along its last axis. When that axis is short and not
    a multiple of the vector width (K = 15 latent dimensions), most of the hashing runs on
    scalars; drawing with it first, and doing the elementwise work that follows in that
    layout (see ``PerturbationVAE.generated_observation``), keeps it vectorised. Measured
    on the 2-core CPU: simulation ATEs 0.22-0.25 s against 0.38-0.47 s."""
    if last_axis_first and len(shape) >= 2:
        return jnp.moveaxis(normal(key, (shape[-1], *shape[:-1])), 0, -1)
    low = np.nextafter(np.float32(-1.0), np.float32(0.0))
    return np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(uniform(key, shape, low, 1.0))


def normal_sample(key, loc, scale) -> jax.Array:
    """``loc + eps * scale`` with ``eps`` standard normal of their broadcast shape, as
    ``numpyro.distributions.Normal(loc, scale).rsample(key)`` computes it, with ``eps``
    drawn as a flat array and reshaped. The Threefry counters are the elements' flat
    positions whatever the shape, so ``eps`` is the same bit for bit (the sample too, up to
    XLA's rounding choices for the product and sum); XLA's CPU loop over a flat array
    vectorises where one over ``[..., 15]`` (K = 15 latent dimensions) mostly runs on
    scalars: the simulation's held-out IWELBO took 251 instead of 263 ms on the 2-core CPU,
    with the same scores (``benchmarks/RESULTS.md``)."""
    shape = jnp.broadcast_shapes(jnp.shape(loc), jnp.shape(scale))
    eps = jax.random.normal(key, (int(np.prod(shape)),)).reshape(shape)
    return loc + eps * scale


# ---------------------------------------------------------------- gathered elements

_WORD = 32  # pending flags are packed 32 to a uint32 word


def _pack_flags(pending):
    """Pack ``[n]`` bool flags into ``[ceil(n / 32)]`` uint32 words (bit ``i`` of word ``w``:
    element ``32 w + i``), with the rank of each word's first set flag and the running
    count of set flags up to and including each word."""
    n = pending.shape[0]
    padded = jnp.pad(pending, (0, -n % _WORD)).reshape(-1, _WORD).astype(jnp.uint32)
    words = jnp.sum(padded << jnp.arange(_WORD, dtype=jnp.uint32), axis=1, dtype=jnp.uint32)  # distinct bits: sum = or
    counts = jax.lax.population_count(words).astype(jnp.int32)
    ends = jnp.cumsum(counts)
    return words, ends - counts, ends


def _pending_indices(words, firsts, ends, start, size: int, fill: int):
    """Indices of the pending elements of rank ``start .. start + size - 1`` (in index
    order), ``fill`` past the last one: ``[size]`` int32. ``words``, ``firsts``, ``ends``:
    from :func:`_pack_flags`. Costs ``O(n / 32 + size)``: no pass over the ``n`` flags."""
    n_words = words.shape[0]
    # The word holding each rank: words whose first rank falls in the batch mark their slot,
    # a running maximum fills the slots between (word numbers grow with rank).
    first_word = jnp.searchsorted(ends, start, side="right").astype(jnp.int32)
    slot = jnp.where((ends > firsts) & (firsts >= start) & (firsts < start + size), firsts - start, size)
    word_of_slot = jnp.full((size,), first_word, jnp.int32).at[slot].max(
        jnp.arange(n_words, dtype=jnp.int32), mode="drop")
    word_of_slot = jnp.minimum(jax.lax.cummax(word_of_slot), n_words - 1)
    rank_in_word = start + jnp.arange(size, dtype=jnp.int32) - firsts[word_of_slot]
    # Position of the set bit numbered ``rank_in_word`` (from bit 0), by halving the word.
    bits, rank, position = words[word_of_slot], rank_in_word, jnp.zeros((size,), jnp.int32)
    for width in (16, 8, 4, 2, 1):
        low = jax.lax.population_count(bits & np.uint32((1 << width) - 1)).astype(jnp.int32)
        upper = rank >= low
        rank = jnp.where(upper, rank - low, rank)
        bits = jnp.where(upper, bits >> np.uint32(width), bits)
        position = position + jnp.where(upper, width, 0)
    valid = start + jnp.arange(size, dtype=jnp.int32) < ends[-1]
    return jnp.where(valid, word_of_slot * _WORD + position, fill)


def _fill_pending(key, pending, values, draw, capacity: int):
    """Draw the elements still pending, gathered into small arrays.

    pending ``[n]`` bool, values ``[n]``; ``draw(key, index) -> values`` draws the elements
    numbered ``index`` (int32, ``n`` for the padding of a batch: clip it when gathering;
    its draws are dropped). The pending elements are gathered exactly, in batches of at most
    ``capacity`` (or ``capacity / 16`` while few remain: up to 4 such batches), drawn, and
    scattered back. Exact for any number of pending elements; one pass over the flags.
    """
    n = pending.shape[0]
    words, firsts, ends = _pack_flags(pending)
    total = ends[-1]
    small = max(1, capacity // 16)

    def batch_of(size):  # one batch of ``size`` slots -> (index, drawn), padded to ``capacity``
        def batch(batch_index, start):
            index = _pending_indices(words, firsts, ends, start, size, n)  # n: past the end, dropped
            drawn = draw(jax.random.fold_in(key, batch_index), index)
            return (jnp.pad(index, (0, capacity - size), constant_values=n),
                    jnp.pad(drawn, (0, capacity - size)).astype(values.dtype))

        return batch

    batches = [batch_of(small), batch_of(capacity)]

    def batch(state):
        batch_index, start, values = state
        large = total - start > 4 * small
        index, drawn = jax.lax.switch(large.astype(jnp.int32), batches, batch_index, start)
        # The scatter stays outside the branches, so the loop updates ``values`` in place.
        return batch_index + 1, start + jnp.where(large, capacity, small), values.at[index].set(drawn, mode="drop")

    return jax.lax.while_loop(lambda state: state[1] < total, batch, (0, jnp.int32(0), values))[2]


def _capacity(n: int, fraction: float) -> int:
    return int(min(n, max(1024, np.ceil(n * fraction))))


# --------------------------------------------------------------------- inversion

def _inversion_steps(u, count, pmf, cdf, ratio, steps: int):
    """``steps`` unrolled steps of sequential inversion: starting at ``count`` (int32)
    with ``pmf = p(count)`` and ``cdf = P(X < count)``, add one for every ``x`` in
    ``count .. count + steps - 1`` with ``P(X <= x) < u``. ``ratio(x)`` is
    ``p(x + 1) / p(x)``. Returns the new ``(count, pmf, cdf)`` and ``done``: ``u`` fell
    inside the range, or the float32 cdf stopped growing (far in the tail, where the
    remaining probability is below float32 resolution; counting stops there instead of
    running on until the pmf underflows).
    """
    x, result = count.astype(jnp.float32), count
    stalled = jnp.zeros(u.shape, bool)
    for _ in range(steps):  # counts stay int32 so that large ones are exact
        new_cdf = cdf + pmf
        stalled = new_cdf <= cdf
        result = result + ((u > new_cdf) & ~stalled)
        cdf = new_cdf
        pmf = pmf * ratio(x)
        x = x + 1.0
    return result, pmf, cdf, (u <= cdf) | stalled


def _first_pass(u, first_pmf, success, success_r, steps: int):
    """The NB inversion's first pass: ``steps`` unrolled steps from 0, for one fused kernel
    over the whole array. Returns the count (float32): the number of ``x < steps`` with
    ``P(X <= x) < u``; ``steps`` means not done (the count may be larger, or the float32
    CDF stalled below ``u``: :func:`_search` decides). The pmf ratio ``(success x +
    success_r) / (x + 1)`` has constant ``x / (x + 1)`` and ``1 / (x + 1)`` here, and the
    uniform is used up by subtraction: no division and one comparison per step."""
    remaining = u - first_pmf
    count = jnp.zeros(u.shape, jnp.float32)
    pmf = first_pmf
    for x in range(steps):
        count = jnp.where(remaining > 0, np.float32(x + 1), count)
        pmf = pmf * (success * np.float32(x / (x + 1)) + success_r * np.float32(1 / (x + 1)))
        remaining = remaining - pmf
    return count


def _search(u, first_pmf, ratio):
    """Inversion from 0 until every element is done (a loop of short unrolled blocks); for
    small arrays and as the continuation of the first pass."""
    start = (jnp.zeros(u.shape, jnp.int32), first_pmf, jnp.zeros(u.shape, jnp.float32), jnp.zeros(u.shape, bool))
    final = jax.lax.while_loop(lambda state: ~jnp.all(state[3]),
                               lambda state: _inversion_steps(u, *state[:3], ratio, CONTINUATION_STEPS), start)
    return final[0]


# --------------------------------------------------------- gamma and Poisson (small arrays)

def _until_accepted(propose, value, done):
    """Rounds of a vectorised rejection sampler until every element is done:
    ``propose(round_index) -> (accepted, proposal)``, each of ``value``'s shape; elements
    already ``done`` keep ``value``, the others get their first accepted proposal.

    The loop's state is the values alone (NaN while pending): an element counts as done
    exactly when it holds a value. (With a separate done flag, the compiled loop ended with
    elements flagged done but still NaN, for Gamma shapes above 1,000 about 1 in 10,000
    draws, all near the acceptance boundary; computing the test once behind an
    optimisation barrier did not help, and the cause inside XLA was not pinned down. This
    layout cannot end that way.)"""
    pending = ~done  # fixed: the elements to sample

    def round_(state):
        index, value = state
        accepted, proposal = propose(index)
        take = pending & jnp.isnan(value) & accepted & ~jnp.isnan(proposal)
        return index + 1, jnp.where(take, proposal, value)

    start = (0, jnp.where(done, value, jnp.nan))
    return jax.lax.while_loop(lambda state: jnp.any(pending & jnp.isnan(state[1])), round_, start)[1]


def sample_gamma(key, shape_param, shape) -> jax.Array:
    """Exact ``Gamma(shape_param, 1)`` samples of ``shape`` (Marsaglia & Tsang 2000): one
    normal and one uniform per proposal (accepted with probability above 0.95 for shape >=
    1), rounds over the whole array until all are accepted; shapes below 1 use
    ``Gamma(a) = Gamma(a + 1) * U^(1/a)``. Meant for the gathered elements of
    :func:`sample_negative_binomial` (for large arrays, rounds cost whole-array passes)."""
    shape = tuple(shape)
    alpha = jnp.broadcast_to(jnp.asarray(shape_param, jnp.float32), shape)
    boost = alpha < 1.0
    d = jnp.where(boost, alpha + 1.0, alpha) - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * d)
    round_key, boost_key = jax.random.split(key)

    def propose(index):
        normal_key, uniform_key = jax.random.split(jax.random.fold_in(round_key, index))
        z = normal(normal_key, shape)
        log_u = jnp.log(uniform(uniform_key, shape))
        w = c * z
        v = (1.0 + w) ** 3
        safe_w = jnp.where(v > 0, w, 0.0)
        # d * (1 - v + log v) with v = (1 + w)^3, written so that the terms of size d cancel exactly:
        # 1 - v = -w (3 + 3 w + w^2), log v = 3 log1p(w) (float32 error ~ eps sqrt(d), not eps d)
        log_ratio = d * (3.0 * jnp.log1p(safe_w) - safe_w * (3.0 + safe_w * (3.0 + safe_w)))
        return (v > 0) & (log_u < 0.5 * z * z + log_ratio), d * jnp.where(v > 0, v, 1.0)

    valid = jnp.isfinite(alpha) & (alpha > 0)  # invalid shapes give NaN instead of an endless loop
    value = _until_accepted(propose, jnp.full(shape, jnp.nan, jnp.float32), ~valid)
    u = uniform(boost_key, shape, np.finfo(np.float32).tiny, 1.0)
    return jnp.where(boost, value * u ** (1.0 / alpha), value)


_LOG_FACTORIALS = np.cumsum(np.log(np.maximum(np.arange(16, dtype=np.float64), 1.0))).astype(np.float32)


def _log_factorial(k):
    """``log k!`` for whole numbers ``k >= 0`` (float32): a table below 16, Stirling's series
    (:func:`sams_jax.special.stirling_lgamma`) above. Cheaper than ``gammaln``, whose
    reflection branch is never needed here."""
    stirling = stirling_lgamma(jnp.maximum(k, 15.0) + 1.0)
    return jnp.where(k < 16.0, jnp.asarray(_LOG_FACTORIALS)[jnp.clip(k, 0, 15).astype(jnp.int32)], stirling)


def _ptrs(key, rate):
    """One round of Hörmann's (1993) transformed rejection for Poisson rates >= 10:
    ``(accepted, proposal)`` per element, two uniforms per element."""
    u_key, v_key = jax.random.split(key)
    u = uniform(u_key, rate.shape) - 0.5
    v = uniform(v_key, rate.shape)
    b = 0.931 + 2.53 * jnp.sqrt(rate)
    a = -0.059 + 0.02483 * b
    inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
    v_r = 0.9277 - 3.6224 / (b - 2.0)
    us = 0.5 - jnp.abs(u)
    k = jnp.floor((2.0 * a / us + b) * u + rate + 0.43)
    quick = (us >= 0.07) & (v <= v_r)
    log_ratio = jnp.log(v * inv_alpha / (a / (us * us) + b))
    full = (k >= 0) & ~((us < 0.013) & (v > us)) & (log_ratio <= -rate + k * jnp.log(rate) - _log_factorial(k))
    return quick | full, k


def sample_poisson(key, rate, shape) -> jax.Array:
    """Exact Poisson samples (float32 counts) of ``shape``: inversion (one uniform) for rates
    below 10, PTRS rounds for the others. Meant for small arrays (see :func:`sample_gamma`)."""
    shape = tuple(shape)
    rate = jnp.broadcast_to(jnp.asarray(rate, jnp.float32), shape)
    small = rate < POISSON_INVERSION_MAX_RATE
    small_rate = jnp.where(small, rate, 0.0)
    inversion_key, ptrs_key = jax.random.split(key)
    count = _search(uniform(inversion_key, shape), jnp.exp(-small_rate),
                    lambda x: small_rate / (x + 1.0)).astype(jnp.float32)
    large_rate = jnp.where(small, POISSON_INVERSION_MAX_RATE, rate)

    valid = jnp.isfinite(rate) & (rate >= 0)  # invalid rates give NaN instead of an endless loop
    count = jnp.where(valid, count, jnp.nan)
    return _until_accepted(lambda index: _ptrs(jax.random.fold_in(ptrs_key, index), large_rate), count,
                           small | ~valid)


# ------------------------------------------------------------- negative binomial

def sample_negative_binomial(key, concentration, mean, shape, inversion_steps: int = NB_INVERSION_STEPS) -> jax.Array:
    """Exact negative-binomial (Gamma-Poisson) samples (float32 counts) of ``shape``.

    ``concentration`` ``r`` and ``mean`` ``m`` broadcast to ``shape``; variance
    ``m + m^2 / r``. Elements with ``m < 64`` and ``m <= 63 r`` (tail decaying at least as
    fast as ``(63 / 64)^x``; nearly all single-cell counts) are drawn by inversion with one
    uniform each: ``inversion_steps`` unrolled steps of ``p(x + 1) = p(x) (x + r) / (x +
    1) * m / (r + m)`` from ``p(0) = (r / (r + m))^r`` in one fused pass, and a gathered
    continuation for larger counts. The other elements (large means, heavy tails) are
    gathered and drawn as ``Poisson(Gamma(r, 1) m / r)``.
    """
    shape = tuple(shape)
    n = int(np.prod(shape))
    inversion_key, continuation_key, mixture_key = jax.random.split(key, 3)

    def parameters(index=None):
        """``(r, m)`` of every element (``[n]``), or of the elements numbered ``index``
        (gathered through the broadcast, so the ``[n]`` arrays are never stored)."""
        out = []
        for value in (concentration, mean):
            value = jnp.asarray(value, jnp.float32)
            if index is None:
                out.append(jnp.broadcast_to(value, shape).reshape(-1))
                continue
            value = value.reshape((1,) * (len(shape) - value.ndim) + value.shape)
            coords = jnp.unravel_index(jnp.minimum(index, n - 1), shape)
            out.append(jnp.broadcast_to(value[tuple(c if size > 1 else 0 for c, size in zip(coords, value.shape))],
                                        index.shape))
        return out

    def inversion(r, m, counters):  # uniforms, p(0) and the pmf ratio's terms of the inverted elements
        invert = (m < NB_INVERSION_MAX_MEAN) & (m <= NB_INVERSION_MAX_ODDS * r)
        inverted_mean = jnp.where(invert, m, 0.0)
        success = inverted_mean / (r + inverted_mean)
        u = _uniform_from_bits(_bits_at(inversion_key, counters))
        return invert, u, jnp.exp(-r * jnp.log1p(inverted_mean / r)), success, success * r

    # First pass over every element; only its counts leave the fused kernel (count < steps: done).
    r, m = parameters()
    invert, u, first_pmf, success, success_r = inversion(r, m, jax.lax.iota(jnp.uint32, n))
    count = _first_pass(u, first_pmf, success, success_r, inversion_steps)

    def continuation(_, index):  # the same uniforms, inverted from 0 until done
        _, u, first_pmf, success, success_r = inversion(*parameters(index), index)
        return _search(u, first_pmf, lambda x: (success * x + success_r) / (x + 1.0)).astype(jnp.float32)

    count = _fill_pending(continuation_key, count >= inversion_steps, count, continuation, _capacity(n, 1 / 16))

    def gamma_poisson(key, index):
        r_, m_ = parameters(index)
        gamma_key, poisson_key = jax.random.split(key)
        rates = sample_gamma(gamma_key, r_, r_.shape) * (m_ / r_)
        return sample_poisson(poisson_key, rates, r_.shape)

    count = _fill_pending(mixture_key, ~invert, count, gamma_poisson, _capacity(n, 1 / 32))
    return count.reshape(shape)
