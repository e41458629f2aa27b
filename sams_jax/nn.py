"""Neural-network building blocks shared by every model.

* :class:`ResidualMLP` -- LeakyReLU MLP with residual connections between equal-width
  hidden layers (SPEC 1). Its first layer takes *several* inputs, each with its own
  kernel, which is mathematically the same as one dense layer on their concatenation but
  lets ``jax.vmap`` over particles keep the particle-independent part (the observation)
  unbatched, so it is computed once per cell rather than once per particle.
* :class:`NormalHead` -- mean and log-variance heads giving a ``numpyro`` ``Normal`` with
  variance ``exp(logvar) + 1e-4`` (SPEC 1-2).
* :func:`match_particles` / :func:`add_across_particles` -- how a per-cell (or global)
  array meets per-particle ones inside the objective's ``vmap`` over particles
  (:data:`PARTICLE_AXIS`), so that the backward pass sums over particles with a matrix
  product (see :func:`match_particles`).

Parameters are initialised like PyTorch's ``nn.Linear`` (uniform on
``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` for kernel and bias), the convention of the
authors' code, with ``fan_in`` the total input width of the layer.

``compute_dtype`` (config ``model.compute_dtype``): ``"float32"`` (default) or
``"bfloat16"``, the dtype of the matrix-multiply inputs of every layer here (see
:func:`matmul`). Parameters, biases, activations between layers and everything
downstream (densities, KL terms, the objective) stay float32.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpyro.distributions as dist

VARIANCE_FLOOR = 1e-4
COMPUTE_DTYPES = ("float32", "bfloat16")
PARTICLE_AXIS = "particles"  # axis name of the objective's vmap over particles
EXPLICIT_BROADCAST_MIN_ELEMENTS = 2**16  # match_particles: smaller broadcasts stay implicit
EXPLICIT_BROADCAST_BACKENDS = ("cpu",)  # match_particles: elsewhere every broadcast stays implicit
JOINT_HEAD_MAX_FEATURES = 64  # NormalHead: narrower mean and log-variance heads share one product


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _broadcast_particles(x, n_particles):  # [...] -> [S, ...]; backward: a product with ones
    return jnp.broadcast_to(x, (n_particles, *x.shape))


def _broadcast_particles_fwd(x, n_particles):
    return _broadcast_particles(x, n_particles), None


def _broadcast_particles_bwd(n_particles, _, cotangent):
    flat = cotangent.reshape(n_particles, -1)
    return ((jnp.ones((n_particles,), flat.dtype) @ flat).reshape(cotangent.shape[1:]),)


_broadcast_particles.defvjp(_broadcast_particles_fwd, _broadcast_particles_bwd)


@jax.custom_batching.custom_vmap
def _match_batched(x, like, index):
    # index (the particle's axis_index) is always per-particle inside the vmap, so the rule
    # below runs even when x and like are both per-cell: custom_vmap left unresolved could
    # not be differentiated
    return x


@_match_batched.def_vmap
def _match_batched_rule(axis_size, in_batched, x, like, index):
    x_batched, like_batched, _ = in_batched
    if (like_batched and not x_batched and axis_size * x.size >= EXPLICIT_BROADCAST_MIN_ELEMENTS
            and jax.default_backend() in EXPLICIT_BROADCAST_BACKENDS):
        return _broadcast_particles(x, axis_size), True
    return x, x_batched


def match_particles(x, like):
    """``x``, made per-particle where ``like`` is, inside the objective's ``vmap`` over
    particles (named :data:`PARTICLE_AXIS`); ``x`` unchanged anywhere else.

    Where a per-cell or global array (an observation's encoding, a parameter) meets
    per-particle arrays, ``vmap`` broadcasts it over particles implicitly, and the
    backward pass then sums its cotangent over the particle axis with a reduction over
    the leading axis. XLA's CPU backend (YNNPACK) runs such reductions about 40x slower
    than a matrix product by a vector of ones (``[5, 512, 400] -> [512, 400]``: 6-14 ms
    against 0.06-0.3 ms on the 2-core CPU). Broadcasting explicitly here makes that sum a
    product with ones. Values and gradients are the same (up to float rounding of the
    sum); ``x`` is not broadcast where ``like`` is not per-particle, so per-cell work stays
    once per cell. Below ``EXPLICIT_BROADCAST_MIN_ELEMENTS`` particles x elements the
    implicit broadcast is kept: there the extra operations cost more than the reduction
    (default simulation, batch 128: 3-5% slower steps). Only on the backends in
    ``EXPLICIT_BROADCAST_BACKENDS`` (the CPU): on an H100 the implicit broadcast's step
    was 1% faster. Reverse-mode differentiation works inside and outside the vmap.
    """
    try:
        index = jax.lax.axis_index(PARTICLE_AXIS)  # per-particle inside the vmap
    except NameError:  # not inside the objective's vmap over particles
        return x
    return _match_batched(x, like, index)


def add_across_particles(a, b):
    """``a + b`` where either may be per-particle (see :func:`match_particles`)."""
    return match_particles(a, b) + match_particles(b, a)


def matmul(x, kernel, compute_dtype: str = "float32"):
    """``x @ kernel``. With ``compute_dtype="bfloat16"`` both inputs are rounded to
    bfloat16 and the products are accumulated and returned in float32
    (``preferred_element_type``); ``"float32"`` is the plain float32 product."""
    if compute_dtype == "float32":
        return x @ kernel
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute_dtype {compute_dtype!r}; allowed: {COMPUTE_DTYPES}")
    dtype = jnp.dtype(compute_dtype)
    return jnp.matmul(x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)


def torch_uniform_init(fan_in: int):
    """Initializer ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (PyTorch ``nn.Linear``)."""
    bound = 1.0 / float(max(fan_in, 1)) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TorchDense(nn.Module):
    """Dense layer with PyTorch's default initialisation."""

    features: int
    use_bias: bool = True
    compute_dtype: str = "float32"

    @nn.compact
    def __call__(self, x, parameters_only: bool = False):  # [..., d_in] -> [..., features]
        """``x @ kernel + bias``; with ``parameters_only``, ``(kernel [d_in, features], bias
        [features] or None)`` instead (for products that combine several layers' kernels)."""
        fan_in = x.shape[-1]
        kernel = self.param("kernel", torch_uniform_init(fan_in), (fan_in, self.features))
        bias = self.param("bias", torch_uniform_init(fan_in), (self.features,)) if self.use_bias else None
        if parameters_only:
            return kernel, bias
        y = matmul(x, kernel, self.compute_dtype)
        if self.use_bias:
            y = y + bias
        return y


class ResidualMLP(nn.Module):
    """``n_layers`` hidden layers of width ``n_hidden`` with LeakyReLU activations.

    ``h_1 = act(sum_j W_j x_j + b)``; ``h_l = h_{l-1} + act(W_l h_{l-1} + b_l)`` for
    ``l >= 2`` (residual connections between equal-width hidden layers, no batch norm).

    Call with one or more input arrays (all ``[..., d_j]`` with broadcastable leading
    dimensions). ``row_one_hot=True`` adds a learned row per position of the leading
    axis, which equals appending ``one_hot(row index)`` to the inputs (used by the
    correlated embedding encoder, whose rows are perturbations) without the matrix
    product by an identity matrix.
    """

    n_hidden: int
    n_layers: int
    negative_slope: float = 0.01
    row_one_hot: bool = False

    n_rows: int = 0  # with row_one_hot: the number of rows (e.g. perturbations)
    compute_dtype: str = "float32"  # matrix-multiply inputs (see matmul)

    @nn.compact
    def __call__(self, *inputs, row_index=None):  # each [..., d_j] -> [..., n_hidden]
        """``row_index`` (``[...]`` ints, optional with ``row_one_hot``): evaluate only those
        rows, i.e. the input rows are ``[x_j, one_hot(row_index)]``; by default the inputs
        hold all ``n_rows`` rows in order along their second-to-last axis."""
        if self.n_layers < 1:
            raise ValueError(f"ResidualMLP needs n_layers >= 1, got {self.n_layers}")
        inputs = [x for x in inputs if x is not None]
        n_rows = self.n_rows if self.row_one_hot else 0
        fan_in = sum(x.shape[-1] for x in inputs) + n_rows
        init = torch_uniform_init(fan_in)
        h = self.param("bias_0", init, (self.n_hidden,))
        for j, x in enumerate(inputs):  # some inputs per cell, some per particle (add_across_particles)
            product = matmul(x, self.param(f"kernel_0_{j}", init, (x.shape[-1], self.n_hidden)), self.compute_dtype)
            h = h + product if j == 0 else add_across_particles(h, product)
        if self.row_one_hot:
            row_kernel = self.param("kernel_0_rows", init, (n_rows, self.n_hidden))
            h = add_across_particles(h, row_kernel if row_index is None else row_kernel[row_index])
        h = nn.leaky_relu(h, self.negative_slope)
        for layer in range(1, self.n_layers):
            dense = TorchDense(self.n_hidden, compute_dtype=self.compute_dtype, name=f"dense_{layer}")
            h = h + nn.leaky_relu(dense(h), self.negative_slope)
        return h


class NormalHead(nn.Module):
    """Linear mean and log-variance heads: ``Normal(mean, sqrt(exp(logvar) + 1e-4))``."""

    features: int
    compute_dtype: str = "float32"

    def setup(self):
        self.loc = TorchDense(self.features, compute_dtype=self.compute_dtype)
        self.logvar = TorchDense(self.features, compute_dtype=self.compute_dtype)

    def variance(self, h):  # [..., d] -> [..., features]
        return jnp.exp(self.logvar(h)) + VARIANCE_FLOOR

    def loc_and_variance(self, h):  # [..., d] -> ([..., features], [..., features])
        """Mean and variance. Heads narrower than ``JOINT_HEAD_MAX_FEATURES`` (K = 15
        latent dimensions) run as one product with both kernels side by side, which fills
        the CPU's vector tiles better than two narrow ones: the simulation's IWELBO 3-4% and
        ATEs 3% faster, its training step unchanged within noise; wider heads keep two
        products (the Replogle-scale training step, K = 100, was 1.5% slower joined)."""
        if self.features >= JOINT_HEAD_MAX_FEATURES:
            return self.loc(h), self.variance(h)
        loc_kernel, loc_bias = self.loc(h, parameters_only=True)
        logvar_kernel, logvar_bias = self.logvar(h, parameters_only=True)
        both = matmul(h, jnp.concatenate([loc_kernel, logvar_kernel], 1), self.compute_dtype) \
            + jnp.concatenate([loc_bias, logvar_bias])
        return both[..., :self.features], jnp.exp(both[..., self.features:]) + VARIANCE_FLOOR

    def __call__(self, h):  # [..., d] -> Normal with batch shape [..., features]
        loc, variance = self.loc_and_variance(h)
        return dist.Normal(loc, jnp.sqrt(variance))

    def summed(self, h, weights):
        """The distribution of ``sum_s weights[s] * y[i * S + s]`` for independent draws
        ``y ~ self(h)``: ``h`` ``[I * S, d]`` (``I`` groups of ``S`` consecutive rows),
        ``weights`` ``[S]`` of 0 / 1 -> Normal with batch shape ``[I, features]``.

        The mean head is linear, so the summed mean is the head applied to the group's
        mean hidden state, times the group's weight: one ``d x features`` product per
        group instead of one per row (exact up to float rounding). The variances are
        summed row by row."""
        count = weights.sum()
        mean_hidden = grouped_sum(h, weights) / jnp.maximum(count, 1.0)  # [I, d]
        return dist.Normal(count * self.loc(mean_hidden), jnp.sqrt(grouped_sum(self.variance(h), weights)))


def grouped_sum(values, weights):
    """``sum_s weights[s] * values[i * S + s]``: ``values`` ``[I * S, ...]``, ``weights``
    ``[S]`` -> ``[I, ...]``.

    A weighted sum over the middle axis, which XLA's CPU backend fuses with the producer
    of ``values`` (an einsum became a transposing copy and a product: the simulation's
    ATEs took 0.087 s against 0.075 s this way, ``benchmarks/RESULTS.md``)."""
    grouped = values.reshape(-1, weights.shape[0], *values.shape[1:])
    return (grouped * weights.astype(values.dtype).reshape(1, -1, *([1] * (values.ndim - 1)))).sum(1)


def straight_through_bernoulli(key, logits, temperature):
    """Gumbel-softmax straight-through sample of ``Bernoulli(sigmoid(logits))``.

    Forward value: the hard 0/1 sample; gradient: that of the relaxed sample
    ``sigmoid((logits + logistic noise) / temperature)``.
    """
    # numpyro's RelaxedBernoulliLogits(temperature, logits).rsample(key), with the logits
    # made per-particle explicitly (match_particles): the same numbers
    noise = jax.random.logistic(key, jnp.shape(logits)) * (1 / temperature)
    soft = dist.transforms.SigmoidTransform()(match_particles(logits / temperature, noise) + noise)
    hard = (soft > 0.5).astype(soft.dtype)
    return soft + jax.lax.stop_gradient(hard - soft)

