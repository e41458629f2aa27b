"""The baselines of SPEC 4 on the shared machinery: CPA-VAE, conditional VAE, SVAE+ and
SAMS-VAE with a Beta-Bernoulli mask prior (and SAMS-VAE itself where all models are
checked alike)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

from sams_jax.checkpoint import Checkpointer
from sams_jax.config import ConfigError, validate_config
from sams_jax.data import DataError, load_data, plate_scale, simulate
from sams_jax.models import (CPAVAE, MODELS, SAMSVAE, ConditionalVAE, SAMSVAEBetaBernoulli, SVAEPlus, check_data,
                             create_model, model_fields)
from sams_jax.objective import ObjectiveConfig, loss_fn
from sams_jax.train import create_optimizer, create_train_state, final_metrics, train_and_evaluate

SIZES = dict(n_genes=6, n_perturbations=4, n_latent=3, decoder_n_hidden=5, basal_encoder_n_hidden=5,
             normalization="standardize")


@pytest.fixture(scope="module")
def batch():
    data = simulate(n_latent=3, n_perturbations=4, n_genes=6, cells_per_perturbation=(5, 1, 1), seed=2)
    arrays = {k: jnp.asarray(v) for k, v in data.arrays("train").items()}
    arrays["dosages"] = arrays["dosages"].at[:3].set(0.0)  # a few control cells
    arrays["library_size"] = jnp.full_like(arrays["library_size"], 100.0)  # (row sums of real values can be < 0)
    return arrays, jnp.asarray(plate_scale(np.asarray(arrays["dosages"] != 0).sum(0)))


def _init(model, batch):
    keys = {"params": jax.random.key(0), "globals": jax.random.key(1), "local": jax.random.key(2)}
    return model.init(keys, batch["x"], batch["dosages"], batch["library_size"])


def _rngs(seed=0):
    return {"globals": jax.random.key(seed + 10), "local": jax.random.key(seed + 20)}


def _apply(model, variables, *args, method=None, rngs=None):
    """``model.apply``, also returning the inputs of every decoder call. (Eager: with the
    tiny shapes shared by these tests, eager op caches make this faster than compiling.)"""
    calls = []

    def record(next_fun, call_args, kwargs, context):
        if context.module.name == "decoder" and context.method_name == "__call__":
            calls.append(call_args)
        return next_fun(*call_args, **kwargs)

    with nn.intercept_methods(record):
        out = model.apply(variables, *args, method=method, rngs=rngs)
    return out, calls


def _terms(model, variables, batch, rngs):
    return model.apply(variables, batch["x"], batch["dosages"], batch["library_size"], rngs=rngs)


class _Noise(nn.Module):
    """The first draw of the "local" stream, as a model's ``generate`` makes it (latent
    axis first)."""

    @nn.compact
    def __call__(self, n, k):
        return jax.random.normal(self.make_rng("local"), (k, n)).T


def _noise(n, k=3):
    return np.asarray(_Noise().apply({}, n, k, rngs=_rngs()))


def _cpa_comparison(model, variables, arrays, scale, variable_weights=()):
    """Terms (two particles), losses (ELBO, IWELBO), generate, encode, embedding means."""
    terms = [_terms(model, variables, arrays, _rngs(seed)) for seed in range(2)]
    losses = [loss_fn(model.apply, ObjectiveConfig(kind=kind, n_particles=3, variable_weights=variable_weights),
                      variables, jax.random.key(4), arrays, scale) for kind in ("elbo", "iwelbo")]
    generated = model.apply(variables, arrays["dosages"], arrays["library_size"], method="generate", rngs=_rngs())
    encoded = model.apply(variables, arrays["x"], arrays["dosages"], method="encode", rngs=_rngs())
    return terms, losses, generated, encoded, model.apply(variables, method="embedding_means")


def test_cpa_vae_equals_sams_vae_with_the_mask_fixed_to_ones(batch):
    """Same parameters and keys: CPA-VAE's terms and loss are SAMS-VAE's (mean-field
    guide) with every mask on, the mask's own term left out (custom weight 0)."""
    arrays, scale = batch
    cpa = CPAVAE(**SIZES)
    sams = SAMSVAE(**SIZES, guide="mean_field")
    cpa_vars = _init(cpa, arrays)
    assert "mask_logits" not in cpa_vars["params"] and not hasattr(cpa, "mask_probs")
    cpa_vars["params"]["embedding_loc"] = jax.random.normal(jax.random.key(7), (4, 3))  # non-trivial effects
    sams_vars = jax.tree.map(lambda v: v, cpa_vars)
    sams_vars["params"]["mask_logits"] = jnp.full((4, 3), 40.0)  # straight-through mask: all ones
    assert jax.tree.structure(_init(sams, arrays)) == jax.tree.structure(sams_vars)
    cpa_terms, *cpa_rest = _cpa_comparison(cpa, cpa_vars, arrays, scale)
    sams_terms, *sams_rest = _cpa_comparison(sams, sams_vars, arrays, scale, variable_weights=(("mask", 0.0),))
    same = np.testing.assert_array_equal  # bit for bit (eagerly; compiled separately they may differ by rounding)
    for a, b in zip(cpa_terms, sams_terms):
        assert set(a.global_log_p) == set(a.global_log_q) == {"embedding"} and "mask" in b.global_log_p
        same(a.log_likelihood, b.log_likelihood)
        for side in ("local_log_p", "local_log_q"):
            same(getattr(a, side)["z_basal"], getattr(b, side)["z_basal"])
        for side in ("global_log_p", "global_log_q"):
            same(getattr(a, side)["embedding"], getattr(b, side)["embedding"])
    for u, v in zip(jax.tree.leaves(cpa_rest), jax.tree.leaves(sams_rest)):  # losses, generate, encode, embeddings
        same(u, v)
    assert not np.allclose(cpa_terms[0].log_likelihood, cpa_terms[1].log_likelihood)  # particles differ


def test_conditional_vae_dosages_act_only_through_the_decoder_input(batch):
    arrays, _ = batch
    model = ConditionalVAE(**SIZES)
    variables = _init(model, arrays)
    terms, _ = _apply(model, variables, arrays["x"], arrays["dosages"], arrays["library_size"], rngs=_rngs())
    assert terms.global_log_p == {} and terms.global_log_q == {} and set(terms.local_log_p) == {"z"}
    n = 5
    control = jnp.zeros((n, 4))
    perturbed = jnp.zeros((n, 4)).at[:, 1].set(1.0).at[0, 2].set(1.0)  # a pair in row 0
    library = jnp.full((n,), 100.0)
    (_, mean_c), calls_c = _apply(model, variables, control, library, method="generate", rngs=_rngs())
    (_, mean_p), calls_p = _apply(model, variables, perturbed, library, method="generate", rngs=_rngs())
    # one decoder call each, on [z, D]: the same z, drawn from the prior; the dosages as given
    assert len(calls_c) == len(calls_p) == 1
    np.testing.assert_array_equal(calls_c[0][0], calls_p[0][0])
    np.testing.assert_array_equal(calls_c[0][0], _noise(n))
    np.testing.assert_array_equal(calls_c[0][1], control)
    np.testing.assert_array_equal(calls_p[0][1], perturbed)
    assert not np.allclose(mean_c, mean_p)  # the intervention changes the prediction ...
    no_dosage_kernel = jax.tree.map(lambda v: v, variables)
    no_dosage_kernel["params"]["decoder"]["kernel_0_1"] = jnp.zeros_like(variables["params"]["decoder"]["kernel_0_1"])
    same_c, _ = _apply(model, no_dosage_kernel, control, library, method="generate", rngs=_rngs())
    same_p, _ = _apply(model, no_dosage_kernel, perturbed, library, method="generate", rngs=_rngs())
    for u, v in zip(same_c, same_p):  # ... only through the decoder's dosage input
        np.testing.assert_array_equal(u, v)
    # the encoder sees [x, D]
    encode_c, _ = _apply(model, variables, arrays["x"], jnp.zeros_like(arrays["dosages"]), method="encode")
    encode_p, _ = _apply(model, variables, arrays["x"], arrays["dosages"], method="encode")
    assert encode_c.shape == (arrays["x"].shape[0], 3) and not np.allclose(encode_c[3:], encode_p[3:])


def test_svae_plus_rejects_pairs_with_the_intended_message(tiny_config, tmp_path):
    data = load_data(tiny_config.data)
    check_data("svae_plus", data)  # one-hot simulation: accepted
    train_cells = np.nonzero(data.split == "train")[0]
    data.dosages[train_cells[:4], 0] = 1.0
    data.dosages[train_cells[:4], 1] = 1.0  # pairs
    tiny_config.model.name = "svae_plus"
    with pytest.raises(DataError, match=r"SVAE\+ \(model.name='svae_plus'\) accepts one-hot perturbations only, "
                                        r"but 4 cells received several perturbations .*encode_combinations=\"unique\""):
        train_and_evaluate(tiny_config, str(tmp_path / "w"), data=data)
    assert not (tmp_path / "w").exists()  # rejected before anything was written or compiled
    for name in ("sams_vae", "cpa_vae", "conditional_vae", "sams_vae_beta_bernoulli"):
        check_data(name, data)  # the other models accept pairs


def test_svae_plus_terms(batch):
    """Local prior Normal(mask[t_i] * prior_mean[t_i], I) (0 for controls); Beta prior on
    the point-mass mask probabilities; the encoder sees x only."""
    arrays, _ = batch
    model = SVAEPlus(**SIZES, mask_beta_a=1.5, mask_beta_b=3.0)
    variables = _init(model, arrays)
    prior_mean = np.asarray(variables["params"]["prior_mean"])
    assert 0.02 < prior_mean.std() < 0.3  # 0.1 * N(0, 1)
    t = np.argmax(np.asarray(arrays["dosages"]) != 0, axis=1)
    control = ~np.asarray(arrays["dosages"] != 0).any(1)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    for mask_logits, expected_mean in ((40.0, np.where(control[:, None], 0.0, prior_mean[t])), (-40.0, 0.0),
                                       (logits, None), (200.0, None)):
        variables["params"]["mask_logits"] = jnp.broadcast_to(mask_logits, (4, 3))
        terms, calls = _apply(model, variables, arrays["x"], arrays["dosages"], arrays["library_size"],
                              rngs=_rngs())
        if expected_mean is not None:  # all masks on / all off
            np.testing.assert_allclose(terms.local_log_p["z"],
                                       dist.Normal(expected_mean, 1.0).log_prob(calls[0][0]).sum(-1), rtol=1e-5,
                                       atol=1e-5)
        if expected_mean is None and mask_logits is logits:  # (numpyro's Beta is -inf where sigmoid rounds to 1)
            np.testing.assert_allclose(terms.global_log_p["mask_prob"],
                                       dist.Beta(1.5, 3.0).log_prob(jax.nn.sigmoid(logits)).sum(-1), rtol=1e-5)
        np.testing.assert_array_equal(terms.global_log_q["mask_prob"], np.zeros(4))
        np.testing.assert_array_equal(terms.global_log_p["mask"], terms.global_log_q["mask"])
        assert np.all(np.isfinite(terms.global_log_p["mask_prob"]))  # also at saturated logits
    encoded, _ = _apply(model, variables, arrays["x"], arrays["dosages"], method="encode")
    other, _ = _apply(model, variables, arrays["x"], 1 - arrays["dosages"], method="encode")
    np.testing.assert_array_equal(encoded, other)


def test_beta_bernoulli_sams_vae_changes_only_the_mask_prior(batch):
    arrays, _ = batch
    sams = SAMSVAE(**SIZES, guide="mean_field")
    beta = SAMSVAEBetaBernoulli(**SIZES, guide="mean_field", mask_beta_a=2.0, mask_beta_b=5.0)
    variables = _init(beta, arrays)
    args = (arrays["x"], arrays["dosages"], arrays["library_size"])
    a, _ = _apply(sams, variables, *args, rngs=_rngs())
    b, _ = _apply(beta, variables, *args, rngs=_rngs())
    np.testing.assert_array_equal(a.log_likelihood, b.log_likelihood)
    np.testing.assert_array_equal(a.global_log_q["embedding"], b.global_log_q["embedding"])
    np.testing.assert_array_equal(a.global_log_q["mask"], b.global_log_q["mask"])
    np.testing.assert_array_equal(b.global_log_p["mask"], b.global_log_q["mask"])
    logits = variables["params"]["mask_logits"]
    np.testing.assert_allclose(b.global_log_p["mask_prob"],
                               dist.Beta(2.0, 5.0).log_prob(jax.nn.sigmoid(logits)).sum(-1), rtol=1e-5)
    np.testing.assert_array_equal(b.global_log_q["mask_prob"], np.zeros(4))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_generate_encode_and_interpretation_shapes(batch, name):
    """generate: x under interventions, the local latent from its prior with zero offset
    for control rows; encode: [n, K]; mask_probs / embedding_means: [T, K]."""
    arrays, _ = batch
    counts = {**arrays, "x": jnp.round(jnp.abs(arrays["x"]) * 10)}
    model = MODELS[name](**SIZES, likelihood="library_nb")
    variables = _init(model, counts)
    if "mask_logits" in variables["params"]:
        variables["params"]["mask_logits"] = jnp.full((4, 3), 40.0)  # masks on: perturbations shift z
    n = 6
    dosages = jnp.zeros((n, 4)).at[3:, 2].set(1.0)  # 3 control rows, 3 rows with perturbation 2
    library = jnp.full((n,), 50.0)
    (x_sample, x_mean), calls = _apply(model, variables, dosages, library, method="generate", rngs=_rngs())
    assert x_sample.shape == x_mean.shape == (n, 6)
    assert np.all(np.asarray(x_sample) >= 0) and np.array_equal(x_sample, np.round(x_sample))
    np.testing.assert_allclose(np.asarray(x_mean).sum(1), 50.0, rtol=1e-3)  # library_nb: mean = l * rho
    z, noise = np.asarray(calls[0][0]), _noise(n)
    np.testing.assert_array_equal(z[:3], noise[:3])  # control rows: z from N(0, I), no offset
    if name != "conditional_vae":
        assert not np.allclose(z[3:], noise[3:])  # perturbed rows: shifted
    encoded, _ = _apply(model, variables, counts["x"], counts["dosages"], method="encode", rngs=_rngs())
    assert encoded.shape == (counts["x"].shape[0], 3) and np.all(np.isfinite(encoded))
    for method in ("mask_probs", "embedding_means"):
        if hasattr(model, method):
            assert _apply(model, variables, method=method)[0].shape == (4, 3)
    assert hasattr(model, "mask_probs") == (name in ("sams_vae", "sams_vae_beta_bernoulli", "svae_plus"))


def test_config_fields_and_checks(tiny_config):
    assert "guide" not in model_fields("cpa_vae") and "mask_prior_prob" not in model_fields("cpa_vae")
    assert {"mask_beta_a", "mask_beta_b"} <= set(model_fields("svae_plus"))
    assert {"mask_beta_a", "mask_beta_b", "guide"} <= set(model_fields("sams_vae_beta_bernoulli"))
    tiny_config.model.update(name="svae_plus", mask_beta_b=7.0)
    assert create_model(tiny_config.model, 12, 6).mask_beta_b == 7.0
    tiny_config.model.name = "cpa_vae"
    with pytest.raises(ConfigError, match="model.guide='correlated' is not allowed with model.name='cpa_vae'"):
        validate_config(tiny_config)
    tiny_config.model.update(guide="mean_field", mask_beta_a=0.0)
    with pytest.raises(ConfigError, match="model.mask_beta_a=0.0 is out of range"):
        validate_config(tiny_config)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_checkpoints_and_reloads(tiny_config, tmp_path, name):
    """A few steps on the tiny simulation through the one training loop; the IWELBO of the
    reloaded best checkpoint is the one in metrics.json."""
    tiny_config.model.name = name
    if name == "cpa_vae":
        tiny_config.model.guide = "mean_field"
    tiny_config.train.update(max_steps=10, eval_every=10)
    metrics = train_and_evaluate(tiny_config, str(tmp_path))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == metrics and np.isfinite(saved["test/IWELBO"]) and np.isfinite(saved["val/IWELBO"])
    assert ("mask_f1" in saved) == hasattr(MODELS[name], "mask_probs")
    data = load_data(tiny_config.data)
    model = create_model(tiny_config.model, data.n_genes, data.n_perturbations)
    target = create_train_state(model, create_optimizer(tiny_config.train),
                                data.normalization_stats(tiny_config.model.normalization), jax.random.key(1))
    ckpt = Checkpointer(str(tmp_path), read_only=True)
    try:
        config, _ = ckpt.restore_json(ckpt.best_step())
        assert config["model"]["name"] == name
        restored = ckpt.restore_state(ckpt.best_step(), target)
    finally:
        ckpt.close()
    again = final_metrics(model, tiny_config, data, restored.variables, jax.random.key(tiny_config.seed))
    for split in ("val", "test"):
        np.testing.assert_allclose(again[f"{split}/IWELBO"], saved[f"{split}/IWELBO"], rtol=1e-6)


def test_svae_plus_generation_shifts_z_by_the_masked_prior_mean(batch):
    """SVAE+ generate: a cell of perturbation t gets z = noise + mask[t] * prior_mean[t]; with
    the mask of t saturated to [1, 0, 1] only latent dims 0 and 2 shift, and with every
    mask off nothing shifts (controls never shift). (Jitted: eager, this takes ~10 s.)"""
    arrays, _ = batch
    model = SVAEPlus(**SIZES)
    keys = {"params": jax.random.key(0), "globals": jax.random.key(1), "local": jax.random.key(2)}
    variables = jax.jit(model.init)(keys, arrays["x"], arrays["dosages"], arrays["library_size"])
    prior_mean = np.asarray(variables["params"]["prior_mean"])
    pattern = np.array([1.0, 0.0, 1.0])
    n = 6
    dosages = jnp.zeros((n, 4)).at[3:, 2].set(1.0)  # 3 control rows, 3 rows with perturbation 2
    library = jnp.full((n,), 50.0)

    @jax.jit
    def generated_z(variables):  # the decoder's input in generate
        return _apply(model, variables, dosages, library, method="generate", rngs=_rngs())[1][0][0]

    noise = _noise(n)
    on = jnp.full((4, 3), 40.0).at[2].set(jnp.array([40.0, -40.0, 40.0]))
    for mask_logits, expected in ((on, pattern * prior_mean[2]), (jnp.full((4, 3), -40.0), np.zeros(3))):
        variables["params"]["mask_logits"] = mask_logits
        shift = np.asarray(generated_z(variables)) - noise
        np.testing.assert_allclose(shift[:3], 0.0, atol=1e-6)
        np.testing.assert_allclose(shift[3:], np.broadcast_to(expected, (3, 3)), atol=1e-5)
    assert np.abs(prior_mean[2]).min() > 1e-4  # so a shift where the mask is off, or none where on, would show
