"""``model.compute_dtype``: float32 (default) is the plain float32 product; bfloat16 rounds
the matrix-multiply inputs of the networks and keeps parameters, outputs and the
objective in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sams_jax.config import ConfigError, validate_config
from sams_jax.data import load_data, plate_scale
from sams_jax.models import create_model
from sams_jax.nn import ResidualMLP, TorchDense, matmul
from sams_jax.objective import ObjectiveConfig, loss_fn
from sams_jax.train import create_optimizer, create_train_state

BF16 = jnp.bfloat16


def test_float32_is_the_plain_product_and_bfloat16_rounds_inputs():
    x = jax.random.normal(jax.random.key(0), (7, 33))
    dense = TorchDense(5)
    params = dense.init(jax.random.key(1), x)
    kernel, bias = params["params"]["kernel"], params["params"]["bias"]
    np.testing.assert_array_equal(dense.apply(params, x), x @ kernel + bias)  # bit for bit
    y = TorchDense(5, compute_dtype="bfloat16").apply(params, x)
    assert y.dtype == jnp.float32 and kernel.dtype == jnp.float32
    rounded = x.astype(BF16).astype(jnp.float32) @ kernel.astype(BF16).astype(jnp.float32) + bias
    np.testing.assert_allclose(y, rounded, rtol=1e-5, atol=1e-6)
    assert np.abs(y - (x @ kernel + bias)).max() > 0  # the rounding is real
    with pytest.raises(ValueError, match="unknown compute_dtype"):
        matmul(x, kernel, "float16")


def test_residual_mlp_default_is_unchanged():
    x, extra = jax.random.normal(jax.random.key(0), (2, 4, 6)), jax.random.normal(jax.random.key(1), (2, 4, 3))
    mlp = ResidualMLP(n_hidden=8, n_layers=3)
    params = mlp.init(jax.random.key(2), x, extra)
    p = params["params"]
    h = jax.nn.leaky_relu(p["bias_0"] + x @ p["kernel_0_0"] + extra @ p["kernel_0_1"], 0.01)
    for layer in (1, 2):
        d = p[f"dense_{layer}"]
        h = h + jax.nn.leaky_relu(h @ d["kernel"] + d["bias"], 0.01)
    np.testing.assert_array_equal(mlp.apply(params, x, extra), h)
    bf16 = ResidualMLP(n_hidden=8, n_layers=3, compute_dtype="bfloat16").apply(params, x, extra)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, h, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("name", ["sams_vae", "cpa_vae", "conditional_vae", "svae_plus"])
def test_bfloat16_loss_and_gradients_are_close_to_float32(tiny_config, name):
    config = tiny_config
    config.model.update(name=name, guide="mean_field" if name == "cpa_vae" else "correlated",
                        decoder_n_hidden=32, basal_encoder_n_hidden=32, embedding_encoder_n_hidden=32)
    data = load_data(config.data)
    batch = jax.tree.map(jnp.asarray, data.arrays("train"))
    scale = jnp.asarray(plate_scale(data.cells_per_perturbation("train")))
    objective = ObjectiveConfig.from_config(config.objective)
    results = {}
    for dtype in ("float32", "bfloat16"):
        config.model.compute_dtype = dtype
        model = create_model(config.model, data.n_genes, data.n_perturbations)
        state = create_train_state(model, create_optimizer(config.train),
                                   data.normalization_stats(config.model.normalization), jax.random.key(0))

        def loss(params):
            return loss_fn(model.apply, objective, {"params": params, "normalization": state.normalization},
                           jax.random.key(1), batch, scale)

        value, grads = jax.jit(jax.value_and_grad(loss))(state.params)
        assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
        results[dtype] = float(value), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
    (loss32, grad32), (loss16, grad16) = results["float32"], results["bfloat16"]
    assert np.isfinite(loss16) and np.all(np.isfinite(grad16))
    assert abs(loss16 - loss32) < 1e-3 * abs(loss32)
    # bfloat16 keeps 8 significant bits: gradients agree to a few percent, in direction to 1e-3
    assert np.linalg.norm(grad16 - grad32) < 0.03 * np.linalg.norm(grad32)
    assert grad16 @ grad32 > 0.999 * np.linalg.norm(grad16) * np.linalg.norm(grad32)


def test_configs_without_the_field_get_float32(tiny_config):
    """Checkpoints saved before the field existed rebuild the float32 model."""
    del tiny_config.model["compute_dtype"]
    assert create_model(tiny_config.model, 12, 6).compute_dtype == "float32"


def test_unknown_compute_dtype_is_a_clear_error(tiny_config):
    tiny_config.model.compute_dtype = "float16"
    with pytest.raises(ConfigError, match=r"model.compute_dtype='float16' is not allowed; choose one of "
                                          r"\['float32', 'bfloat16'\]"):
        validate_config(tiny_config)


def test_runs_saved_before_the_field_resume_with_the_default(tiny_config):
    import json

    from sams_jax.train import config_changes

    saved = json.loads(tiny_config.to_json_best_effort())
    del saved["model"]["compute_dtype"]
    assert config_changes(saved, tiny_config) == []
    tiny_config.model.compute_dtype = "bfloat16"
    assert config_changes(saved, tiny_config) == [("model.compute_dtype", "float32", "bfloat16")]
