"""Neural-network building blocks shared by every model.

* :class:`ResidualMLP` -- LeakyReLU MLP with residual connections between equal-width
  hidden layers (SPEC 1). Its first layer takes *several* inputs, each with its own
  kernel, which is mathematically the same as one dense layer on their concatenation but
  lets ``jax.vmap`` over particles keep the particle-independent part (the observation)
  unbatched, so it is computed once per cell rather than once per particle.
* :class:`NormalHead` -- mean and log-variance heads giving a ``numpyro`` ``Normal`` with
  variance ``exp(logvar) + 1e-4`` (SPEC 1-2).

Parameters are initialised like PyTorch's ``nn.Linear`` (uniform on
``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` for kernel and bias), the convention of the
authors' code, with ``fan_in`` the total input width of the layer.

``compute_dtype`` (config ``model.compute_dtype``): ``"float32"`` (default) or
``"bfloat16"``, the dtype of the matrix-multiply inputs of every layer here (see
:func:`matmul`). Parameters, biases, activations between layers and everything
downstream (densities, KL terms, the objective) stay float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpyro.distributions as dist

VARIANCE_FLOOR = 1e-4
COMPUTE_DTYPES = ("float32", "bfloat16")


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
    def __call__(self, x):  # [..., d_in] -> [..., features]
        fan_in = x.shape[-1]
        kernel = self.param("kernel", torch_uniform_init(fan_in), (fan_in, self.features))
        y = matmul(x, kernel, self.compute_dtype)
        if self.use_bias:
            y = y + self.param("bias", torch_uniform_init(fan_in), (self.features,))
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
        for j, x in enumerate(inputs):
            h = h + matmul(x, self.param(f"kernel_0_{j}", init, (x.shape[-1], self.n_hidden)), self.compute_dtype)
        if self.row_one_hot:
            row_kernel = self.param("kernel_0_rows", init, (n_rows, self.n_hidden))
            h = h + (row_kernel if row_index is None else row_kernel[row_index])
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

    def __call__(self, h):  # [..., d] -> Normal with batch shape [..., features]
        return dist.Normal(self.loc(h), jnp.sqrt(self.variance(h)))

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
    ``[S]`` -> ``[I, ...]``."""
    grouped = values.reshape(-1, weights.shape[0], *values.shape[1:])
    return jnp.einsum("s,is...->i...", weights.astype(values.dtype), grouped)


def straight_through_bernoulli(key, logits, temperature):
    """Gumbel-softmax straight-through sample of ``Bernoulli(sigmoid(logits))``.

    Forward value: the hard 0/1 sample; gradient: that of the relaxed sample
    ``sigmoid((logits + logistic noise) / temperature)``.
    """
    soft = dist.RelaxedBernoulliLogits(temperature, logits).rsample(key)
    hard = (soft > 0.5).astype(soft.dtype)
    return soft + jax.lax.stop_gradient(hard - soft)

