"""The shared objective (SPEC 3): plate weights, IWELBO, custom weights, and the
SAMS-VAE particle terms that feed it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

from sams_jax.data import plate_scale, simulate
from sams_jax.models import SAMSVAE, ParticleTerms
from sams_jax.objective import (ObjectiveConfig, elbo_per_cell, loss_fn, particle_keys, predictive_iwelbo,
                                reduce_objective, sample_particles)


def _terms(n_cells, n_perturbations, n_particles=1, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return ParticleTerms(
        log_likelihood=f(n_particles, n_cells),
        local_log_p={"z_basal": f(n_particles, n_cells)},
        local_log_q={"z_basal": f(n_particles, n_cells)},
        global_log_p={"mask": f(n_particles, n_perturbations), "embedding": f(n_particles, n_perturbations)},
        global_log_q={"mask": f(n_particles, n_perturbations), "embedding": f(n_particles, n_perturbations)},
    )


def test_plate_weights_count_each_global_term_once_per_pass():
    """Summed over a full pass of the training cells (in any mini-batches), the global
    term of every perturbation with N_t > 0 is counted exactly once, pairs included."""
    rng = np.random.default_rng(0)
    n, t = 60, 5
    dosages = np.zeros((n, t), np.float32)
    dosages[np.arange(n), rng.integers(0, t - 1, n)] = 1.0  # perturbation t-1 never seen: N_t = 0
    dosages[:10, 2] = 1.0  # some pairs
    dosages[10:15] = 0.0  # controls
    scale = jnp.asarray(plate_scale((dosages != 0).sum(0)))
    terms = _terms(n, t)
    config = ObjectiveConfig()
    full = elbo_per_cell(terms, jnp.asarray(dosages), scale, config).sum()
    batches = sum(elbo_per_cell(jax.tree.map(lambda v: v[:, idx] if v.shape[-1] == n else v, terms),
                                jnp.asarray(dosages[idx]), scale, config).sum()
                  for idx in np.array_split(rng.permutation(n), 7))
    local = (terms.log_likelihood + terms.local_log_p["z_basal"] - terms.local_log_q["z_basal"]).sum()
    seen = (dosages != 0).any(0)
    global_once = sum((terms.global_log_p[v] - terms.global_log_q[v])[0, seen].sum() for v in ("mask", "embedding"))
    np.testing.assert_allclose(full, local + global_once, rtol=1e-5)
    np.testing.assert_allclose(batches, full, rtol=1e-5)


def test_plate_scale_zero_where_unseen():
    np.testing.assert_array_equal(plate_scale([4, 0, 1]), np.array([0.25, 0.0, 1.0], np.float32))


def test_custom_variable_weights_and_per_cell_variables():
    n, t = 8, 3
    dosages = jnp.asarray(np.eye(t, dtype=np.float32)[np.arange(n) % t])
    scale = jnp.asarray(plate_scale(np.asarray(dosages).sum(0)))
    terms = _terms(n, t)
    base = elbo_per_cell(terms, dosages, scale, ObjectiveConfig())
    mask_term = (terms.global_log_p["mask"] - terms.global_log_q["mask"]) @ (scale * np.asarray(dosages)).T
    weighted = elbo_per_cell(terms, dosages, scale, ObjectiveConfig(variable_weights=(("mask", 3.0),)))
    np.testing.assert_allclose(weighted, base + 2.0 * mask_term, rtol=1e-5, atol=1e-5)
    per_cell = elbo_per_cell(terms, dosages, scale, ObjectiveConfig(per_cell_variables=("mask",)))
    mask_per_cell = (terms.global_log_p["mask"] - terms.global_log_q["mask"]) @ np.asarray(dosages).T
    np.testing.assert_allclose(per_cell, base - mask_term + mask_per_cell, rtol=1e-5, atol=1e-5)
    z_weighted = elbo_per_cell(terms, dosages, scale, ObjectiveConfig(variable_weights=(("z_basal", 0.0),)))
    kl = terms.local_log_p["z_basal"] - terms.local_log_q["z_basal"]
    np.testing.assert_allclose(z_weighted, base - kl, rtol=1e-5, atol=1e-5)


def test_iwelbo_bounds_elbo_and_equals_it_for_one_particle():
    elbo = jnp.asarray(np.random.default_rng(1).normal(size=(7, 20)) * 3)
    assert np.all(reduce_objective(elbo, "iwelbo") >= reduce_objective(elbo, "elbo") - 1e-6)
    np.testing.assert_allclose(reduce_objective(elbo[:1], "iwelbo"), reduce_objective(elbo[:1], "elbo"), rtol=1e-6)
    with pytest.raises(ValueError, match="allowed"):
        reduce_objective(elbo, "vae")


def test_objective_config_parses_weights():
    from ml_collections import ConfigDict
    cfg = ObjectiveConfig.from_config(ConfigDict(dict(kind="iwelbo", n_particles=3,
                                                      variable_weights="mask=0.5, embedding=2",
                                                      per_cell_variables="mask")))
    assert cfg.weight("mask") == 0.5 and cfg.weight("embedding") == 2.0 and cfg.weight("z_basal") == 1.0
    assert cfg.per_cell_variables == ("mask",) and cfg.kind == "iwelbo"
    with pytest.raises(ValueError, match="variable_weights"):
        ObjectiveConfig.from_config(ConfigDict(dict(kind="elbo", n_particles=1, variable_weights="mask:2",
                                                    per_cell_variables="")))


# --- SAMS-VAE particle terms -------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    data = simulate(n_latent=3, n_perturbations=4, n_genes=6, mask_prob=0.5, cells_per_perturbation=(8, 2, 2))
    batch = {k: jnp.asarray(v) for k, v in data.arrays("train").items()}
    return data, batch


def _init(model, batch):
    keys = {"params": jax.random.key(0), "globals": jax.random.key(1), "local": jax.random.key(2)}
    return model.init(keys, batch["x"], batch["dosages"], batch["library_size"])


def test_sams_vae_terms_match_hand_computation(small):
    """Rebuild one particle by hand from the same random streams: masks, embeddings,
    z_basal and every log-density (SPEC 1-2)."""
    data, batch = small
    model = SAMSVAE(n_genes=6, n_perturbations=4, n_latent=3, guide="mean_field", mask_prior_prob=0.2,
                    embedding_prior_scale=1.5, normalization="none", embedding_loc_init_scale=0.3)
    variables = _init(model, batch)
    rngs = {"globals": jax.random.key(5), "local": jax.random.key(6)}
    terms = model.apply(variables, batch["x"], batch["dosages"], batch["library_size"], rngs=rngs)

    def capture(module):
        shift, *_ = module.sample_globals()
        return shift
    shift = model.apply(variables, method=capture, rngs={"globals": jax.random.key(5)})
    p = variables["params"]
    mask = (shift != 0)
    # mask log-probabilities of the hard sample
    mask_values = np.asarray(mask, np.float32)
    np.testing.assert_allclose(
        terms.global_log_q["mask"],
        dist.BernoulliLogits(p["mask_logits"]).log_prob(mask_values).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(terms.global_log_p["mask"],
                               (mask_values * np.log(0.2) + (1 - mask_values) * np.log(0.8)).sum(-1), rtol=1e-5)
    # all masks on: the shift is the embedding sample itself, scored under q and p
    variables["params"]["mask_logits"] = jnp.full((4, 3), 30.0)
    terms = model.apply(variables, batch["x"], batch["dosages"], batch["library_size"], rngs=rngs)
    embedding = model.apply(variables, method=capture, rngs={"globals": jax.random.key(5)})
    q = dist.Normal(p["embedding_loc"], np.exp(p["embedding_log_scale"]) + 1e-4)
    np.testing.assert_allclose(terms.global_log_q["embedding"], q.log_prob(embedding).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(terms.global_log_p["embedding"],
                               dist.Normal(0.0, 1.5).log_prob(embedding).sum(-1), rtol=1e-5)
    assert np.abs(np.asarray(p["embedding_loc"])).max() > 0  # embedding_loc_init_scale > 0


def test_correlated_guide_matches_hand_computation(small):
    """SPEC 2's correlated guide: q(embedding[t] | mask[t]) = Normal(loc, sqrt(exp(logvar)
    + 1e-4)) from a residual MLP (LeakyReLU 0.01) on [mask[t], one_hot(t)], rebuilt in
    numpy from the parameters; the particle's log q(embedding) is scored under it."""
    _, batch = small
    t, k = 4, 3
    model = SAMSVAE(n_genes=6, n_perturbations=t, n_latent=k, guide="correlated", embedding_encoder_n_layers=2,
                    embedding_encoder_n_hidden=5, normalization="none")
    variables = _init(model, batch)
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), variables["params"])
    encoder, head = p["embedding_encoder"], p["embedding_head"]
    leaky = lambda h: np.where(h > 0, h, 0.01 * h)

    def by_hand(mask):  # [T, K] -> (loc, scale) [T, K]
        inputs = np.concatenate([mask, np.eye(t)], axis=1)
        h = leaky(inputs @ np.concatenate([encoder["kernel_0_0"], encoder["kernel_0_rows"]]) + encoder["bias_0"])
        h = h + leaky(h @ encoder["dense_1"]["kernel"] + encoder["dense_1"]["bias"])
        loc = h @ head["loc"]["kernel"] + head["loc"]["bias"]
        return loc, np.sqrt(np.exp(h @ head["logvar"]["kernel"] + head["logvar"]["bias"]) + 1e-4)

    mask = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], np.float32)
    q = model.apply(variables, jnp.asarray(mask), method=lambda module, m: module.q_embedding(m))
    loc, scale = by_hand(mask)
    np.testing.assert_allclose(q.loc, loc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.scale, scale, rtol=1e-5, atol=1e-6)
    assert not np.allclose(by_hand(np.ones((t, k)))[0], loc)  # the mask is an input
    # every mask on: the particle's shift is its embedding draw, scored under q(embedding | ones)
    variables["params"]["mask_logits"] = jnp.full((t, k), 30.0)
    rngs = {"globals": jax.random.key(5), "local": jax.random.key(6)}
    terms = model.apply(variables, batch["x"], batch["dosages"], batch["library_size"], rngs=rngs)
    embedding = model.apply(variables, method=lambda module: module.sample_globals()[0],
                            rngs={"globals": jax.random.key(5)})
    loc, scale = by_hand(np.ones((t, k)))
    np.testing.assert_allclose(terms.global_log_q["embedding"],
                               dist.Normal(loc, scale).log_prob(np.asarray(embedding, np.float64)).sum(-1), rtol=1e-5)
    # a mixed mask (saturated logits): the same keys give the same noise eps (recovered from the all-on draw),
    # and the guide must see this mask, not ones: shift = (loc + scale * eps) * mask under by_hand(mask)
    eps = (np.asarray(embedding, np.float64) - loc) / scale
    variables["params"]["mask_logits"] = jnp.asarray(30.0 * (2 * mask - 1))
    shift, _, log_q, _ = model.apply(variables, method=lambda module: module.sample_globals(),
                                     rngs={"globals": jax.random.key(5)})
    loc, scale = by_hand(mask)
    np.testing.assert_allclose(shift, (loc + scale * eps) * mask, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(log_q["embedding"], dist.Normal(loc, scale).log_prob(loc + scale * eps).sum(-1),
                               rtol=1e-5)


def test_offset_enters_encoder_unless_mean_field_encoder(small):
    """With mean_field_encoder=True, q(z_basal) ignores D @ (E * M)."""
    _, batch = small
    for mean_field_encoder, should_change in ((False, True), (True, False)):
        model = SAMSVAE(n_genes=6, n_perturbations=4, n_latent=3, mean_field_encoder=mean_field_encoder,
                        normalization="none")
        variables = _init(model, batch)

        def q_z(module, dosages):
            shift, *_ = module.sample_globals()
            offset = None if module.mean_field_encoder else dosages @ shift
            return module.basal_head(module.basal_encoder(batch["x"], offset)).loc

        variables["params"]["mask_logits"] = jnp.full((4, 3), 20.0)  # masks on
        a = model.apply(variables, batch["dosages"], method=q_z, rngs={"globals": jax.random.key(0)})
        b = model.apply(variables, jnp.zeros_like(batch["dosages"]), method=q_z, rngs={"globals": jax.random.key(0)})
        assert (not np.allclose(a, b)) == should_change
        assert ("kernel_0_1" in variables["params"]["basal_encoder"]) == (not mean_field_encoder)


def test_gradient_reaches_mask_logits_and_encoders(small):
    data, batch = small
    model = SAMSVAE(n_genes=6, n_perturbations=4, n_latent=3, mask_prior_prob=0.1, normalization="standardize")
    variables = _init(model, batch)
    scale = jnp.asarray(plate_scale(data.cells_per_perturbation("train")))
    grads = jax.grad(lambda p: loss_fn(model.apply, ObjectiveConfig(n_particles=3),
                                       {**variables, "params": p}, jax.random.key(3), batch, scale))(
        variables["params"])
    assert float(jnp.abs(grads["mask_logits"]).sum()) > 0
    for name in ("embedding_encoder", "basal_encoder", "decoder"):
        assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads[name]))) > 0


def test_particles_share_globals_across_cells_and_differ_between_particles(small):
    _, batch = small
    model = SAMSVAE(n_genes=6, n_perturbations=4, n_latent=3, normalization="none")
    variables = _init(model, batch)
    g, l = particle_keys(jax.random.key(0), 4)
    terms = sample_particles(model.apply, variables, batch, g, l)
    assert terms.global_log_q["mask"].shape == (4, 4)
    assert terms.log_likelihood.shape == (4, batch["x"].shape[0])
    assert not np.allclose(terms.global_log_q["embedding"][0], terms.global_log_q["embedding"][1])
    # same keys -> same numbers
    again = sample_particles(model.apply, variables, batch, g, l)
    np.testing.assert_array_equal(terms.log_likelihood, again.log_likelihood)


@pytest.mark.parametrize("n_cells, chunk_size, first_chunk", [(23, 5, 0), (23, 5, 7), (20, 5, 0), (3, 8, 2)])
def test_chunked_per_cell_gives_each_cell_its_row_and_chunk(n_cells, chunk_size, first_chunk):
    """Chunk ``i`` (numbered from ``first_chunk``) holds cells ``i * chunk + r`` in rows
    ``r``, also in a last, partial chunk (read from the arrays' end, no padding)."""
    from sams_jax.objective import chunked_per_cell
    cells = jnp.arange(n_cells, dtype=jnp.float32)
    arrays = {"x": jnp.stack([cells, -cells], axis=1), "library_size": 2 * cells}
    chunk = min(chunk_size, n_cells)
    rows = jnp.arange(chunk, dtype=jnp.float32)

    def fn(batch, index):  # the cell (from every leaf), its row within the chunk and the chunk's number
        cell = (batch["x"][:, 0] - batch["x"][:, 1] + batch["library_size"]) / 4
        return cell + 1e3 * rows + 1e5 * index

    out = np.asarray(jax.jit(chunked_per_cell, static_argnums=(0, 2))(fn, arrays, chunk_size, first_chunk))
    expected = np.arange(n_cells) + 1e3 * (np.arange(n_cells) % chunk) + 1e5 * (np.arange(n_cells) // chunk
                                                                                  + first_chunk)
    np.testing.assert_array_equal(out, expected)


def test_predictive_iwelbo_chunking_is_invariant(small):
    """Chunking the cells must not change the predictive IWELBO (globals are shared)."""
    data, _ = small
    arrays = {k: jnp.asarray(v) for k, v in data.arrays("train").items()}
    model = SAMSVAE(n_genes=6, n_perturbations=4, n_latent=3, normalization="none")
    variables = _init(model, arrays)
    whole = predictive_iwelbo(model.apply, variables, jax.random.key(1), arrays, 8, chunk_size=1000)
    # the same global draws, chunk size 5: local draws differ, so compare the mean loosely
    chunked = predictive_iwelbo(model.apply, variables, jax.random.key(1), arrays, 8, chunk_size=5)
    assert whole.shape == chunked.shape == (arrays["x"].shape[0],)
    np.testing.assert_allclose(whole.mean(), chunked.mean(), rtol=0.05)


# --- closed-form KL option (objective.analytic_kl) ------------------------------------------

def test_bernoulli_kl_matches_enumeration_and_gradient():
    from sams_jax.models.components import bernoulli_kl

    logits = jnp.array([-30.0, -3.0, -0.5, 0.0, 1.2, 30.0])
    prior = 0.2
    q_on = jax.nn.sigmoid(logits)
    enumerated = q_on * jnp.log(q_on / prior) + (1 - q_on) * jnp.log((1 - q_on) / (1 - prior))
    np.testing.assert_allclose(bernoulli_kl(logits[1:-1], prior), enumerated[1:-1], rtol=1e-5)
    assert np.all(np.isfinite(bernoulli_kl(logits, prior)))  # saturated logits stay finite
    np.testing.assert_allclose(bernoulli_kl(jnp.array([30.0]), prior), -np.log(prior), rtol=1e-4)
    # exact gradient: sigmoid'(l) * (l - logit(prior))
    grad = jax.vmap(jax.grad(lambda l: bernoulli_kl(l, prior)))(logits[1:-1])
    expected = q_on[1:-1] * (1 - q_on[1:-1]) * (logits[1:-1] - np.log(prior / (1 - prior)))
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("guide", ["mean_field", "correlated"])
def test_closed_form_kls_are_the_mean_of_the_sampled_terms(small, guide):
    """For mask, embedding (given the mask draw) and z_basal, the average over many
    particles of the sampled ``log q - log p`` equals the average closed-form KL."""
    data, batch = small
    model = SAMSVAE(n_genes=6, n_perturbations=4, n_latent=3, guide=guide, mask_prior_prob=0.3,
                    embedding_prior_scale=1.5, normalization="none", mask_init_logits=0.4,
                    embedding_loc_init_scale=0.5)
    variables = _init(model, batch)
    terms = sample_particles(model.apply, variables, batch, *particle_keys(jax.random.key(3), 4000))
    for kind, log_p, log_q, kl in (("global", terms.global_log_p, terms.global_log_q, terms.global_kl),
                                   ("local", terms.local_log_p, terms.local_log_q, terms.local_kl)):
        assert set(kl) == set(log_p), kind
        for name in kl:
            sampled = np.asarray(log_q[name] - log_p[name]).mean(0)
            closed = np.asarray(kl[name]).mean(0)
            spread = np.asarray(log_q[name] - log_p[name]).std(0) / np.sqrt(4000)
            np.testing.assert_array_less(np.abs(sampled - closed), 5 * spread + 1e-3, err_msg=name)
    # the mask's KL does not depend on the draw; it equals the closed form at the logits
    from sams_jax.models.components import bernoulli_kl
    np.testing.assert_allclose(terms.global_kl["mask"][0],
                               bernoulli_kl(variables["params"]["mask_logits"], 0.3).sum(-1), rtol=1e-5)


def test_analytic_kl_replaces_sampled_terms_in_the_objective():
    n, t = 6, 3
    dosages = jnp.asarray(np.eye(t, dtype=np.float32)[np.arange(n) % t])
    scale = jnp.asarray(plate_scale(np.asarray(dosages).sum(0)))
    terms = _terms(n, t)._replace(global_kl={"mask": jnp.full((1, t), 2.0), "embedding": jnp.full((1, t), 3.0)},
                                  local_kl={"z_basal": jnp.full((1, n), 0.5)})
    sampled = elbo_per_cell(terms, dosages, scale, ObjectiveConfig())
    analytic = elbo_per_cell(terms, dosages, scale, ObjectiveConfig(analytic_kl=("mask", "z_basal")))
    mask_sampled = (terms.global_log_p["mask"] - terms.global_log_q["mask"]) @ (scale * dosages).T
    z_sampled = terms.local_log_p["z_basal"] - terms.local_log_q["z_basal"]
    np.testing.assert_allclose(analytic, sampled - mask_sampled - z_sampled - 2.0 / 2 - 0.5, rtol=1e-5)
    with pytest.raises(ValueError, match="elbo"):
        ObjectiveConfig(kind="iwelbo", analytic_kl=("mask",))


def test_analytic_kl_unknown_or_unavailable_variable_is_a_config_error(tmp_path):
    from configs import test as test_config
    from sams_jax.config import ConfigError
    from sams_jax.train import train_and_evaluate

    for model_name, name, message in (("sams_vae", "masks", "does not have"),
                                      ("sams_vae_beta_bernoulli", "mask_prob", "no closed-form KL")):
        config = test_config.get_config()
        config.model.name = model_name
        config.objective.analytic_kl = name
        with pytest.raises(ConfigError, match=message):
            train_and_evaluate(config, str(tmp_path / name))
        assert not (tmp_path / name).exists()  # nothing written


def test_annealed_weights_interpolate_geometrically_and_train_only():
    config = ObjectiveConfig(variable_weights=(("mask", 4.0),), initial_variable_weights=(("mask", 100.0),),
                             weight_anneal_steps=10)
    np.testing.assert_allclose(config.weight("mask", jnp.asarray(0)), 100.0, rtol=1e-6)
    np.testing.assert_allclose(config.weight("mask", jnp.asarray(5)), 20.0, rtol=1e-5)  # sqrt(100 * 4)
    np.testing.assert_allclose(config.weight("mask", jnp.asarray(50)), 4.0, rtol=1e-6)
    assert config.weight("mask") == 4.0 and config.weight("embedding", jnp.asarray(0)) == 1.0
    n, t = 6, 3
    dosages = jnp.asarray(np.eye(t, dtype=np.float32)[np.arange(n) % t])
    scale = jnp.asarray(plate_scale(np.asarray(dosages).sum(0)))
    terms = _terms(n, t)
    np.testing.assert_allclose(
        elbo_per_cell(terms, dosages, scale, config, jnp.asarray(5)),
        elbo_per_cell(terms, dosages, scale, ObjectiveConfig(variable_weights=(("mask", 20.0),))),
        rtol=1e-5, atol=1e-5)  # atol: the annealed weight is 20 to float32 rounding (exp of a log)
    np.testing.assert_allclose(elbo_per_cell(terms, dosages, scale, config),
                               elbo_per_cell(terms, dosages, scale, ObjectiveConfig(variable_weights=(("mask", 4.0),))),
                               rtol=1e-6)
    from ml_collections import ConfigDict
    parsed = ObjectiveConfig.from_config(ConfigDict(dict(kind="elbo", n_particles=1, variable_weights="mask=4",
                                                         per_cell_variables="", initial_variable_weights="mask=100",
                                                         weight_anneal_steps=10)))
    assert parsed == dataclasses.replace(config, n_particles=1)


def test_active_perturbations_equal_top_k():
    """The argmax path (max_active <= 4) finds the same rows, in the same order, with ties to
    the lower index, as ``lax.top_k``."""
    from sams_jax.models.components import active_perturbations

    rng = np.random.default_rng(0)
    dosages = np.zeros((300, 30), np.float32)
    for row in dosages:
        row[rng.choice(30, rng.integers(0, 4), replace=False)] = rng.choice([1.0, 0.5, -1.0, 2.0])
    dosages[0, [3, 7, 9]] = 1.0  # a tie
    for max_active in (1, 2, 3, 4):
        values, rows = active_perturbations(jnp.asarray(dosages), max_active)
        _, expected = jax.lax.top_k(jnp.abs(jnp.asarray(dosages)), max_active)
        np.testing.assert_array_equal(rows, expected)
        np.testing.assert_array_equal(values, np.take_along_axis(dosages, np.asarray(expected), -1))
    dosages[5, [2, 4]] = np.nan  # a NaN is found first (argmax's rule), so it reaches the values
    values, rows = active_perturbations(jnp.asarray(dosages), 2)
    assert rows[5, 0] == 2 and np.isnan(values[5, 0]) and rows[5, 0] == jnp.argmax(jnp.abs(jnp.asarray(dosages[5])))


def test_generation_draws_equal_numpyro(small):
    """Generating cells draws masks, embeddings and z with the fused-hash samplers; the
    numbers equal numpyro's / jax.random's for the same keys (flax hands out the same key
    to the first ``make_rng`` call of a stream in every ``apply``), with z and the
    embeddings drawn with the latent axis first."""
    _, batch = small
    model = SAMSVAE(n_genes=6, n_perturbations=4, n_latent=3, normalization="none")
    variables = _init(model, batch)
    rngs = {"globals": jax.random.key(5), "local": jax.random.key(6)}
    global_key = model.apply(variables, method=lambda m: m.make_rng("globals"), rngs=rngs)
    local_key = model.apply(variables, method=lambda m: m.make_rng("local"), rngs=rngs)
    rows = jnp.asarray([[0], [2], [3], [2]])
    masks = model.apply(variables, rows, method=lambda m, r: m.sample_row_masks(r), rngs=rngs)
    expected = dist.BernoulliLogits(variables["params"]["mask_logits"][rows]).sample(global_key)
    np.testing.assert_array_equal(masks, expected)

    dosages = jax.nn.one_hot(rows[:, 0], 4)
    shift = model.apply(variables, dosages, method=lambda m, d: m.prior_shift(d, 1)[0], rngs=rngs)
    z_mean = model.apply(variables, dosages, jnp.ones(4), method=lambda m, d, l: m.generate(d, l, 1)[1], rngs=rngs)
    z = jax.random.normal(local_key, shift.shape[::-1]).T + shift  # drawn with the latent axis first
    expected_mean = model.apply(variables, z, jnp.ones(4), method=lambda m, z, l: m.p_x(z, l).mean)
    np.testing.assert_array_equal(z_mean, expected_mean)
    # the per-row global draws of generation: mask (first globals key), then embedding (second)
    first, second = model.apply(variables, method=lambda m: (m.make_rng("globals"), m.make_rng("globals")),
                                rngs=rngs)
    dosages = jax.nn.one_hot(rows[:, 0], 4)
    offsets = model.apply(variables, dosages, method=lambda m, d: m.sample_offsets(d, 1), rngs=rngs)
    mask = dist.BernoulliLogits(variables["params"]["mask_logits"][rows]).sample(first).astype(jnp.float32)
    q_embedding = model.apply(variables, mask, rows, method=lambda m, k, r: m.q_embedding(k, r))
    embedding = q_embedding.loc + jnp.moveaxis(jax.random.normal(second, (3, 4, 1)), 0, -1) * q_embedding.scale
    np.testing.assert_array_equal(offsets, (embedding * mask)[:, 0])


# --- reductions and whole-split scoring, rebuilt by hand ------------------------------------

def _jit_init(model, batch):
    """``_init`` compiled as one program (op-by-op initialisation is slow on the CPU)."""
    keys = {"params": jax.random.key(0), "globals": jax.random.key(1), "local": jax.random.key(2)}
    return jax.jit(model.init)(keys, batch["x"], batch["dosages"], batch["library_size"])


@pytest.fixture(scope="module")
def small_model(small):
    """A SAMS-VAE (correlated guide) on the ``small`` data, initialised once."""
    model = SAMSVAE(n_genes=6, n_perturbations=4, n_latent=3, normalization="none", mask_prior_prob=0.2)
    return model, _jit_init(model, small[1])


def test_iwelbo_subtracts_log_particles():
    """IWELBO = logsumexp_s elbo[s, i] - log S: a constant ``c`` over S = 5 particles gives
    exactly ``c``, and random values match scipy's logsumexp minus log S."""
    from scipy.special import logsumexp

    constant = jnp.full((5, 4), -3.25)
    np.testing.assert_allclose(reduce_objective(constant, "iwelbo"), np.full(4, -3.25), rtol=1e-6)
    elbo = np.random.default_rng(2).normal(size=(5, 9)) * 4
    np.testing.assert_allclose(reduce_objective(jnp.asarray(elbo), "iwelbo"), logsumexp(elbo, 0) - np.log(5),
                               rtol=1e-5)
    np.testing.assert_allclose(reduce_objective(jnp.asarray(elbo), "elbo"), elbo.mean(0), rtol=1e-5)


@pytest.mark.parametrize("kind", ["elbo", "iwelbo"])
def test_loss_is_minus_the_mean_over_cells_of_the_particle_reduction(small, small_model, kind):
    """``loss_fn`` = ``-mean_i reduce_s elbo[s, i]``, rebuilt from ``sample_particles`` with
    the same keys (``particle_keys(rng, S)``): a mean over cells, not a sum (the scale of the
    loss must not grow with the batch size)."""
    data, batch = small
    model, variables = small_model
    scale = jnp.asarray(plate_scale(data.cells_per_perturbation("train")))
    config = ObjectiveConfig(kind=kind, n_particles=3)
    rng = jax.random.key(11)
    loss, terms = jax.jit(lambda v: (loss_fn(model.apply, config, v, rng, batch, scale),
                                     sample_particles(model.apply, v, batch, *particle_keys(rng, 3))))(variables)
    per_cell = np.asarray(reduce_objective(elbo_per_cell(terms, batch["dosages"], scale, config), kind))
    assert per_cell.shape == (batch["x"].shape[0],) and batch["x"].shape[0] > 1
    np.testing.assert_allclose(loss, -per_cell.mean(), rtol=1e-5)


def test_score_split_shares_global_draws_across_chunks(small, small_model):
    """Every chunk of a split scores the same ``n_particles`` global draws (the globals key
    of ``particle_keys(rng, S)``): a score depending only on the global draws is the same
    for all 23 cells in chunks of 5, and equals its value from ``sample_particles`` with
    those keys."""
    from sams_jax.objective import score_split

    arrays = {k: v[:23] for k, v in small[1].items()}
    model, variables = small_model
    rng = jax.random.key(4)

    def global_score(terms, batch):  # [chunk]: the particles' global log q, the same for every cell
        total = sum(v.sum() for v in terms.global_log_q.values())
        return jnp.broadcast_to(total, batch["x"].shape[:1])

    scores, terms = jax.jit(lambda v: (score_split(model.apply, v, rng, arrays, 3, global_score, chunk_size=5),
                                       sample_particles(model.apply, v, arrays, *particle_keys(rng, 3))))(variables)
    scores = np.asarray(scores)
    assert scores.shape == (23,)
    expected = float(sum(v.sum() for v in terms.global_log_q.values()))
    np.testing.assert_allclose(scores, np.full(23, expected), rtol=1e-6)


def test_predictive_iwelbo_by_hand_leaves_out_the_global_terms(small, small_model):
    """Predictive IWELBO (SPEC 5) per cell = logsumexp_s (log p(x | z) + log p(z_basal) -
    log q(z_basal)) - log S, rebuilt from ``sample_particles`` with the keys
    ``score_split`` uses for one chunk (globals: ``particle_keys(rng, S)``; locals:
    ``split(fold_in(fold_in(rng, 1), 0), S)``); the global variables' log p - log q are
    not part of it."""
    from scipy.special import logsumexp

    _, batch = small
    model, variables = small_model
    rng, n_particles = jax.random.key(9), 6
    global_keys, _ = particle_keys(rng, n_particles)
    local_keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(rng, 1), 0), n_particles)
    scores, terms = jax.jit(lambda v: (predictive_iwelbo(model.apply, v, rng, batch, n_particles, chunk_size=1000),
                                       sample_particles(model.apply, v, batch, global_keys, local_keys)))(variables)
    log_w = np.asarray(terms.log_likelihood + terms.local_log_p["z_basal"] - terms.local_log_q["z_basal"],
                       np.float64)
    np.testing.assert_allclose(scores, logsumexp(log_w, 0) - np.log(n_particles), rtol=1e-5, atol=1e-5)
    global_ratio = sum(np.asarray(terms.global_log_p[v] - terms.global_log_q[v]).sum(-1) for v in terms.global_log_p)
    assert np.abs(global_ratio).min() > 1e-2  # the global terms would have changed the score


def test_decoder_sees_the_perturbation_offset(small):
    """The likelihood decodes ``z_basal + D @ (embedding * mask)`` (SPEC 1). With the encoder
    blind to the offset (``mean_field_encoder``), the same keys give the same ``z_basal``
    for all-zero and one-hot dosages; with every mask on the log-likelihoods differ and
    equal a hand decode of ``z_basal + offset``; with every mask off they are equal."""
    _, batch = small
    model = SAMSVAE(n_genes=6, n_perturbations=4, n_latent=3, guide="mean_field", mean_field_encoder=True,
                    normalization="none", embedding_loc_init_scale=1.0)
    variables = _jit_init(model, batch)
    rngs = {"globals": jax.random.key(5), "local": jax.random.key(6)}
    x, library = batch["x"], batch["library_size"]
    one_hot = jax.nn.one_hot(jnp.arange(x.shape[0]) % 4, 4)

    def draws(module, dosages):  # the particle's shift and z_basal, in __call__'s order of draws
        shift, *_ = module.sample_globals()
        z_basal = module.q_z_basal(x, dosages @ shift).rsample(module.make_rng("local"))
        return shift, z_basal

    def log_likelihood(module, z):
        return module.p_x(z, library).log_prob(x).sum(-1)

    @jax.jit
    def run(v):  # the particle's log-likelihoods, its draws and the hand decodes, with the same keys
        on = model.apply(v, x, one_hot, library, rngs=rngs).log_likelihood
        off = model.apply(v, x, jnp.zeros_like(one_hot), library, rngs=rngs).log_likelihood
        shift, z_basal = model.apply(v, one_hot, method=draws, rngs=rngs)
        by_hand_on = model.apply(v, z_basal + one_hot @ shift, method=log_likelihood)
        return on, off, shift, by_hand_on, model.apply(v, z_basal, method=log_likelihood)

    for logit, differ in ((30.0, True), (-30.0, False)):
        params = {**variables["params"], "mask_logits": jnp.full((4, 3), logit)}
        on, off, shift, by_hand_on, by_hand_off = run({**variables, "params": params})
        np.testing.assert_array_equal(np.asarray(shift) != 0, differ)  # masks all on / all off
        np.testing.assert_allclose(on, by_hand_on, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(off, by_hand_off, rtol=1e-5, atol=1e-4)
        assert (np.abs(np.asarray(on - off)).min() > 1e-3) == differ


def test_normalize_input_log_standardize_standardize_and_none():
    """The encoder input: log_standardize standardises log(1 + x), standardize x itself,
    and none (zero means, unit scales) leaves x as it is."""
    from sams_jax.data import normalization_stats, normalize_input

    x = jnp.array([[0.0, 1.0, 3.0]])
    stats = {"mean": jnp.array([0.1, 0.2, 0.3]), "scale": jnp.array([2.0, 2.0, 2.0])}
    expected = [[(0.0 - 0.1) / 2, (np.log(2.0) - 0.2) / 2, (np.log(4.0) - 0.3) / 2]]
    np.testing.assert_allclose(normalize_input(x, stats, "log_standardize"), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(normalize_input(x, stats, "standardize"),
                               [[(0.0 - 0.1) / 2, (1.0 - 0.2) / 2, (3.0 - 0.3) / 2]], rtol=1e-6, atol=1e-7)
    none = normalization_stats(np.asarray(x), "none")
    np.testing.assert_array_equal(none["mean"], np.zeros(3))
    np.testing.assert_array_equal(none["scale"], np.ones(3))
    np.testing.assert_array_equal(normalize_input(x, none, "none"), x)
