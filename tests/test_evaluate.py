"""Evaluation (SPEC 5): ATE estimators against closed forms, data ATEs by hand, the
metrics against numpy/scipy, the predictor API and the evaluate command end to end."""

import json
import os
import pathlib
import subprocess
import sys
import warnings

import anndata
import pandas as pd
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import stats
import scipy.sparse as sp

import sams_jax
from sams_jax import metrics
from sams_jax.ate import data_expectations, transform
from sams_jax.checkpoint import CheckpointError
from sams_jax.data import DataError, PerturbationData, load_data, simulate
from sams_jax.models import SAMSVAE
from sams_jax.predictor import InterventionError, InterventionWarning, Predictor
from sams_jax.train import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    sys.path.insert(0, str(ROOT))
    from configs import test as test_config
    sys.path.pop(0)
    config = test_config.get_config()
    config.train.update(max_steps=3000, eval_every=1000, steps_per_dispatch=100)
    workdir = tmp_path_factory.mktemp("trained")
    train_and_evaluate(config, str(workdir))
    return workdir, config


# --- ATE estimators ------------------------------------------------------------------

def _linear_predictor():
    """SAMS-VAE whose decoder is linear in z (first-layer bias large enough that the
    LeakyReLU is the identity), normal likelihood, mean-field guide with tiny scales."""
    t, k, g = 4, 3, 5
    model = SAMSVAE(n_genes=g, n_perturbations=t, n_latent=k, guide="mean_field", normalization="none",
                    decoder_n_hidden=6, basal_encoder_n_hidden=4)
    dummy = (jnp.zeros((2, g)), jnp.zeros((2, t)), jnp.ones(2))
    variables = model.init({"params": jax.random.key(0), "globals": jax.random.key(1), "local": jax.random.key(2)},
                           *dummy)
    params = jax.tree.map(lambda v: v, variables["params"])
    params["decoder"]["bias_0"] = jnp.full((6,), 100.0)
    logvar = params["likelihood_head"]["normal"]["logvar"]
    params["likelihood_head"]["normal"]["logvar"] = {"kernel": jnp.zeros_like(logvar["kernel"]),
                                                     "bias": jnp.full_like(logvar["bias"], -4.0)}
    rng = np.random.default_rng(0)
    params["embedding_loc"] = jnp.asarray(rng.normal(size=(t, k)) * 2, jnp.float32)
    params["embedding_log_scale"] = jnp.full((t, k), -9.0)
    params["mask_logits"] = jnp.asarray(np.where(rng.random((t, k)) < 0.5, 12.0, -12.0), jnp.float32)
    variables = {**variables, "params": params}
    from ml_collections import ConfigDict
    config = ConfigDict({"model": {"likelihood": "normal", "name": "sams_vae"}})
    metadata = {"feature_names": [f"g{i}" for i in range(g)], "perturbation_names": ["a", "b", "c", "d"],
                "control": "control"}
    return Predictor(model, variables, config, metadata, 0, ""), params


def test_model_ate_matches_closed_form_for_linear_decoder():
    predictor, p = _linear_predictor()
    shift = np.asarray(jax.nn.sigmoid(p["mask_logits"]) * p["embedding_loc"])  # E[E * M]
    w = np.asarray(p["decoder"]["kernel_0_0"]) @ np.asarray(p["likelihood_head"]["normal"]["loc"]["kernel"])
    dosages = predictor.dosages(["a", "b+c", "d"])
    expected = (dosages @ shift) @ w
    crn = predictor.ate(["a", "b+c", "d"], method="crn", n_particles=4000, seed=1)
    np.testing.assert_allclose(crn.X, expected, atol=0.02)
    paper = predictor.ate(["a", "b+c", "d"], method="paper", n_particles=4000, seed=1)
    np.testing.assert_allclose(paper.X, expected, atol=0.15)
    assert crn.uns["control"] == "control" and list(crn.obs_names) == ["a", "b+c", "d"]
    # a pair's effect is the sum of its members' effects (additive latent shifts)
    np.testing.assert_allclose(crn.X[1], expected[1], atol=0.02)


def test_crn_has_much_lower_variance_than_independent_draws():
    predictor, _ = _linear_predictor()
    def spread(method):
        runs = np.stack([predictor.ate(["a", "b"], method=method, n_particles=64, seed=s).X for s in range(6)])
        return runs.std(0).mean()
    assert spread("crn") < 0.25 * spread("paper")


def test_summed_observations_have_the_paper_estimators_distribution():
    """With a normal likelihood and scale="mean", the paper estimator draws the particle sum
    of x in one go (N(sum mu, sum sigma^2)); over many seeds its estimates have the same
    mean and spread as drawing every cell, including a last particle chunk that overruns
    (5 particles in chunks of 4). The observation noise dominates here (sigma^2 = e)."""
    predictor, params = _linear_predictor()
    params = jax.tree.map(lambda v: v, params)
    params["likelihood_head"]["normal"]["logvar"]["bias"] = jnp.ones_like(
        params["likelihood_head"]["normal"]["logvar"]["bias"])
    variables = {**predictor.variables, "params": params}
    dosages = jnp.asarray(predictor.dosages(["a", "b+c"]))

    def estimates(summed):
        run = jax.jit(jax.vmap(lambda key: predictor._expectations(
            variables, dosages, key, n_particles=5, scale="mean", method="paper", particle_chunk=4,
            summed_observations=summed)))
        return np.asarray(run(jax.random.split(jax.random.key(3), 600)))  # [seeds, I, G]

    summed, per_cell = estimates(True), estimates(False)
    assert not np.allclose(summed[0], per_cell[0])  # different random numbers ...
    np.testing.assert_allclose(summed.mean(0), per_cell.mean(0), atol=0.12)  # ... the same distribution
    np.testing.assert_allclose(summed.std(0), per_cell.std(0), rtol=0.12)
    np.testing.assert_allclose(per_cell.std(0), np.sqrt(np.e / 5), rtol=0.12)  # sigma / sqrt(S)


def test_model_expectations_fix_the_library_size_at_ten_thousand():
    """SPEC 5: model expectations generate cells with library size 10,000. For a
    ``library_nb`` SAMS-VAE (NB mean ``l * softmax + 1e-4``, concentration ``e^5`` so
    that the draws are nearly Poisson), every intervention's expected counts on the mean
    scale sum over genes to about 10,000, by default both in :func:`model_expectations` and
    in :meth:`Predictor.expectations`."""
    from ml_collections import ConfigDict

    t, k, g = 3, 2, 20
    model = SAMSVAE(n_genes=g, n_perturbations=t, n_latent=k, likelihood="library_nb", normalization="none",
                    guide="mean_field", decoder_n_hidden=8, basal_encoder_n_hidden=4)
    dummy = (jnp.zeros((2, g)), jnp.zeros((2, t)), jnp.ones(2))
    variables = jax.jit(model.init)({"params": jax.random.key(0), "globals": jax.random.key(1),
                                     "local": jax.random.key(2)}, *dummy)
    params = {**variables["params"], "embedding_loc": jnp.ones((t, k))}
    params["likelihood_head"] = {**params["likelihood_head"], "log_theta": jnp.full((g,), 5.0)}
    config = ConfigDict({"model": {"likelihood": "library_nb", "name": "sams_vae"}})
    metadata = {"feature_names": [f"g{i}" for i in range(g)], "perturbation_names": ["a", "b", "c"],
                "control": "control"}
    predictor = Predictor(model, {**variables, "params": params}, config, metadata, 0, "")
    interventions = ["control", "a", "b+c", "c"]
    means = predictor.expectations(interventions, n_particles=64, scale="mean", seed=1)
    assert means.shape == (4, g)
    np.testing.assert_allclose(means.sum(1), 10_000.0, rtol=0.02)
    # sams_jax.ate.model_expectations (jitted by the predictor) without a library size
    default = np.asarray(predictor._expectations(predictor.variables, jnp.asarray(predictor.dosages(interventions)),
                                                 jax.random.key(3), n_particles=64, scale="mean"))
    np.testing.assert_allclose(default.sum(1), 10_000.0, rtol=0.02)
    # near-Poisson genes (concentration e^7 ~ 1,100): every generated count is a number (the Gamma draws of
    # large shapes came back NaN about once in 10,000, and an expectation with them)
    params["likelihood_head"] = {**params["likelihood_head"], "log_theta": jnp.full((g,), 7.0)}
    near_poisson = Predictor(model, {**variables, "params": params}, config, metadata, 0, "")
    for seed in (0, 1):
        assert np.isfinite(near_poisson.expectations(interventions, n_particles=64, scale="mean", seed=seed)).all()


def test_summed_observation_closed_forms():
    from sams_jax.likelihoods import GammaPoisson, Normal, summed_observation

    loc, scale = jnp.arange(12.0).reshape(4, 3), jnp.arange(1.0, 13.0).reshape(4, 3)
    weights = jnp.array([1.0, 0.0])  # 2 groups of 2 rows; the second row of each is left out
    total = summed_observation(Normal(loc, scale), weights)
    np.testing.assert_allclose(total.loc, loc[::2])
    np.testing.assert_allclose(total.scale, scale[::2])
    total = summed_observation(Normal(loc, scale), jnp.ones(2))
    np.testing.assert_allclose(total.loc, loc[::2] + loc[1::2])
    np.testing.assert_allclose(total.scale, np.sqrt(scale[::2] ** 2 + scale[1::2] ** 2), rtol=1e-6)
    np.testing.assert_allclose(summed_observation(dist.Poisson(scale), jnp.ones(4)).rate, scale.sum(0, keepdims=True))
    assert summed_observation(GammaPoisson(jnp.ones(3), jnp.ones((4, 3))), jnp.ones(2)) is None


def test_normal_head_summed_equals_the_sum_of_its_rows():
    """The normal head's group sums (mean head applied to the summed hidden states) equal
    the closed-form sum of its per-row normals, with padding particles left out."""
    from sams_jax.likelihoods import summed_observation
    from sams_jax.nn import NormalHead

    head = NormalHead(7)
    hidden = jax.random.normal(jax.random.key(0), (3 * 4, 5))  # 3 groups of 4 particles
    params = head.init(jax.random.key(1), hidden)
    weights = jnp.array([1.0, 1.0, 1.0, 0.0])
    expected = summed_observation(head.apply(params, hidden), weights)
    total = head.apply(params, hidden, weights, method="summed")
    np.testing.assert_allclose(total.loc, expected.loc, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(total.scale, expected.scale, rtol=1e-6)
    rows = head.apply(params, hidden)
    np.testing.assert_allclose(total.loc[1], rows.loc[4:7].sum(0), rtol=1e-5, atol=1e-5)
    # through the likelihood head: Poisson rates are summed; the negative binomial has no closed form
    from sams_jax.likelihoods import LikelihoodHead

    library = jnp.full((12,), 1e4)
    for likelihood in ("poisson", "library_nb"):
        head = LikelihoodHead(likelihood, 7)
        params = head.init(jax.random.key(1), hidden, library)
        total = head.apply(params, hidden, library, weights)
        if likelihood == "poisson":
            np.testing.assert_allclose(total.rate, summed_observation(head.apply(params, hidden, library), weights).rate)
        else:
            assert total is None


def test_ate_chunk_sizes_bound_the_chunk():
    """CPU: 8 interventions x a power of two of particles, cache-sized (at most 4,096 cells
    and ATE_CHUNK_ELEMENTS cell-genes). Other backends: 64 interventions x the fewest equal
    particle chunks whose cell-genes fit their larger bound (the H200's Replogle-scale ATEs
    took 2.1-2.6 s with the CPU's chunks, 0.18 s with these)."""
    from sams_jax.ate import ATE_CHUNK_ELEMENTS, ATE_DEFAULT_CHUNK_ELEMENTS, ate_chunk_sizes, particle_chunk_size

    assert particle_chunk_size(100) == 512  # 4,096 cells: the cap
    assert particle_chunk_size(1187) == 256  # 2,048 cells x 1,187 genes within the budget
    assert particle_chunk_size(1187, intervention_chunk=4) == 512
    assert ate_chunk_sizes(1187, 2_500, backend="cpu") == (8, 256)
    assert ate_chunk_sizes(1187, 100, backend="cpu") == (8, 100)
    assert ate_chunk_sizes(1187, 2_500, backend="gpu") == (64, 2_500)  # one chunk per 64 interventions
    assert ate_chunk_sizes(1187, 2_500, intervention_chunk=16, backend="gpu") == (16, 2_500)
    assert ate_chunk_sizes(20_000, 2_500, backend="gpu") == (64, 209)  # 12 equal chunks, not 11 and a rest
    for n_genes in (1, 100, 1187, 5000, 33_000, 10**7):
        per_chunk = particle_chunk_size(n_genes) * 8
        assert per_chunk * n_genes <= ATE_CHUNK_ELEMENTS["cpu"] or particle_chunk_size(n_genes) == 1
        assert per_chunk <= 4096
        for n_particles in (1, 25, 2_500, 100_000):
            rows, particles = ate_chunk_sizes(n_genes, n_particles, backend="gpu")
            assert rows * particles * n_genes <= ATE_DEFAULT_CHUNK_ELEMENTS or (rows, particles) == (1, 1)
            most = max(1, ATE_DEFAULT_CHUNK_ELEMENTS // (n_genes * rows))
            assert -(-n_particles // particles) == -(-n_particles // most)  # no more chunks than needed


def test_observed_interventions_are_those_of_the_data_set_with_all_their_cells():
    """Cells a task leaves out of every split (split "") add to an intervention's cells (its
    data ATE averages all of them, SPEC 5); an intervention with such cells alone is scored
    in the "all" metrics (the paper's code scores every intervention of the data set), in
    no split's."""
    from sams_jax.evaluate import observed_interventions

    predictor, _ = _linear_predictor()
    labels = ["control"] * 4 + ["a"] * 3 + ["b"] * 5 + ["c"] * 2
    split = ["train"] * 4 + ["train"] * 3 + ["test", "test", "", "", ""] + ["", ""]
    data = PerturbationData(x=np.zeros((len(labels), len(predictor.feature_names)), np.float32),
                            dosages=predictor.dosages(labels), split=np.array(split),
                            feature_names=predictor.feature_names, perturbation_names=predictor.perturbation_names,
                            library_size=np.ones(len(labels), np.float32), control="control")
    data.validate()
    names, rows, membership, n_cells = observed_interventions(predictor, data, predictor.dosages(["control"])[0])
    assert names == ["a", "b", "c"] and n_cells.tolist() == [3, 5, 2]  # c: left-out cells only
    assert membership["train"].tolist() == [True, False, False]
    assert membership["test"].tolist() == [False, True, False] and not membership["val"].any()


def test_gpu_chunks_estimate_the_closed_form_ates_too():
    """The GPU's chunking (all interventions and particles in one chunk), run on the CPU,
    estimates the same closed-form ATEs as the CPU's chunks (other random numbers)."""
    from sams_jax.ate import ate_chunk_sizes

    predictor, p = _linear_predictor()
    shift = np.asarray(jax.nn.sigmoid(p["mask_logits"]) * p["embedding_loc"])
    w = np.asarray(p["decoder"]["kernel_0_0"]) @ np.asarray(p["likelihood_head"]["normal"]["loc"]["kernel"])
    names = ["a", "b+c", "d"]
    expected = (predictor.dosages(names) @ shift) @ w
    rows, particles = ate_chunk_sizes(len(predictor.feature_names), 4_000, backend="gpu")
    assert (rows, particles) == (64, 4_000)
    dosages = jnp.asarray(predictor.dosages(["control", *names]))
    for method, atol in (("crn", 0.02), ("paper", 0.15)):
        means = np.asarray(predictor._expectations(
            predictor.variables, dosages, jax.random.key(1), n_particles=4_000, scale="mean", method=method,
            max_active=2, intervention_chunk=rows, particle_chunk=particles))
        np.testing.assert_allclose(means[1:] - means[0], expected, atol=atol)


def test_ate_scale_and_method_validation():
    predictor, _ = _linear_predictor()
    with pytest.raises(ValueError, match="allowed"):
        predictor.ate(["a"], scale="log")
    with pytest.raises(ValueError, match="allowed"):
        predictor.ate(["a"], method="fast")
    # a normal likelihood generates negative values, whose log2 on the perturbseq scale would be NaN
    with pytest.raises(ValueError, match="needs counts.*'normal'.*scale='mean'"):
        predictor.ate(["a"], scale="perturbseq")
    from sams_jax.evaluate import EvaluationError, check_ate_scale
    with pytest.raises(EvaluationError, match="needs counts"):
        check_ate_scale("normal", "perturbseq")
    check_ate_scale("poisson", "perturbseq")


def test_unknown_intervention_lists_closest_names():
    predictor, _ = _linear_predictor()
    np.testing.assert_array_equal(predictor.dosages(["b+c", "control"]), [[0, 1, 1, 0], [0, 0, 0, 0]])
    with pytest.raises(InterventionError, match=r"unknown perturbation 'cc'.*closest known names: \['c'\]"):
        predictor.dosages(["a+cc"])
    with pytest.raises(InterventionError, match=r"unknown perturbation 'B'.*closest known names: \['b'\]"):
        predictor.dosages(["B"])  # names differing only in case come first
    with pytest.raises(InterventionError, match=r"unknown perturbation 'g3'.*'g3' is one of the model's genes, not a "
                                                r"perturbation"):
        predictor.dosages(["g3"])
    with pytest.raises(InterventionError, match=r"no interventions given"):
        predictor.ate([])
    for source, message in [(np.zeros((3, 5)), "expected an AnnData or the path to a .h5ad file, got ndarray"),
                            ("/nowhere/x.h5ad", "no file at '/nowhere/x.h5ad'")]:
        with pytest.raises(DataError) as error:  # no advice about how an AnnData was read: none was
            predictor.register(source)
        assert str(error.value).startswith(message) and "was read" not in str(error.value)
    assert repr(predictor) == ("Predictor(model='sams_vae', workdir='', step=0, genes=5, perturbations=4, "
                               "control='control')")


def test_data_expectations_by_hand_on_both_scales():
    x = np.array([[1.0, 3.0], [3.0, 5.0], [10.0, 0.0], [2.0, 2.0], [4.0, 4.0]])
    dosages = np.array([[0, 0], [0, 0], [1, 0], [1, 1], [1, 1]], np.float32)
    rows = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float32)
    mean = data_expectations(x, dosages, rows, "mean")
    np.testing.assert_allclose(mean[:3], [[2.0, 4.0], [10.0, 0.0], [3.0, 3.0]])
    assert np.all(np.isnan(mean[3]))
    signed_zeros = np.where(dosages == 0, np.float32(-0.0), dosages)  # -0.0 is no other intervention than 0.0
    np.testing.assert_array_equal(data_expectations(x, signed_zeros, rows, "mean"), mean)
    log = data_expectations(x, dosages, rows, "perturbseq", cell_chunk=2)
    cell = lambda v: np.log2(1e4 * np.asarray(v) / np.sum(v) + 1)
    np.testing.assert_allclose(log[0], (cell([1, 3]) + cell([3, 5])) / 2)
    np.testing.assert_allclose(log[2], cell([1, 1]))
    np.testing.assert_allclose(data_expectations(sp.csr_matrix(x), dosages, rows, "perturbseq"), log)
    np.testing.assert_allclose(transform(jnp.asarray(x[:1]), "perturbseq"), cell([1, 3])[None], rtol=1e-6)


@pytest.mark.parametrize("method", ["paper", "crn"])
def test_model_expectations_on_the_perturbseq_scale_transform_each_cell_before_the_mean(method):
    """SPEC 5: each generated cell is scaled to 10,000 counts and log2(x + 1)'d, then the
    cells are averaged. A model whose cells are [3, 1] or [1, 3] (times any library size)
    with probability 1/2 has E[f(x)] = (f([3, 1]) + f([1, 3])) / 2 = 12.08 for both genes;
    transforming the mean cell instead would give f([2, 2]) = 12.29."""
    from sams_jax.ate import model_expectations

    def apply_fn(variables, cells, library_size, max_active, rngs, method):  # the model's generate
        assert method == "generate"
        first = jax.random.bernoulli(rngs["local"], 0.5, cells.shape[:1])[:, None]
        x = jnp.where(first, jnp.array([3.0, 1.0]), jnp.array([1.0, 3.0]))
        return x * library_size[:, None] * (1.0 + cells.sum(1, keepdims=True)), None

    dosages = jnp.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    expected = (np.log2(1e4 * 0.75 + 1) + np.log2(1e4 * 0.25 + 1)) / 2
    values = np.asarray(model_expectations(apply_fn, {}, dosages, jax.random.key(0), n_particles=4_000,
                                           scale="perturbseq", method=method))
    assert values.shape == (3, 2)
    np.testing.assert_allclose(values, expected, atol=0.04)  # Monte-Carlo error: 0.79 / 2 / sqrt(4,000) = 0.006
    assert abs(np.log2(1e4 * 0.5 + 1) - expected) > 0.2


# --- metrics -----------------------------------------------------------------------------

def test_agreement_metrics_match_scipy():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(6, 40))
    model = data + rng.normal(size=data.shape) * 0.5
    out = metrics.ate_agreement(data, model, k=20)
    np.testing.assert_allclose(out["ATE_pearsonr"], stats.pearsonr(data.ravel(), model.ravel())[0])
    r2 = 1 - ((data - model) ** 2).sum() / ((data - data.mean()) ** 2).sum()
    np.testing.assert_allclose(out["ATE_r2"], r2)
    top = np.argsort(-np.abs(data), axis=1)[:, :20]
    d_top, m_top = np.take_along_axis(data, top, 1), np.take_along_axis(model, top, 1)
    np.testing.assert_allclose(out["ATE_pearsonr_top20"], stats.pearsonr(d_top.ravel(), m_top.ravel())[0])
    assert metrics.top_k_genes(data, 20).sum(1).tolist() == [20] * 6


def test_perturbench_metrics_by_hand():
    rng = np.random.default_rng(1)
    data_mean = rng.normal(size=(5, 8))
    model_mean = data_mean + 0.1 * rng.normal(size=(5, 8))
    data_ate, model_ate = data_mean - 1.0, model_mean - 1.1
    out = metrics.perturbench_metrics(data_mean, model_mean, data_ate, model_ate)
    cos = [np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(model_ate, data_ate)]
    np.testing.assert_allclose(out["cosine_logfc"], np.mean(cos))
    np.testing.assert_allclose(out["rmse_average"], np.mean(np.sqrt(((model_mean - data_mean) ** 2).mean(1))))
    assert out["rmse_rank"] == 0.0  # each prediction is nearest its own observation
    shuffled = metrics.perturbench_metrics(data_mean, model_mean[::-1], data_ate, model_ate[::-1])
    assert shuffled["rmse_rank"] > 0.3
    one = metrics.perturbench_metrics(data_mean[:1], model_mean[:1], data_ate[:1], model_ate[:1])
    assert np.isnan(one["rmse_rank"]) and np.isnan(one["cosine_logfc_rank"])  # nothing to rank against, not "perfect"
    assert np.isfinite(one["rmse_average"])


def test_mean_correlation_coefficient_is_permutation_and_sign_invariant():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(500, 4))
    learned = -z[:, [2, 0, 3, 1]] * 3 + 0.01 * rng.normal(size=z.shape)
    assert metrics.mean_correlation_coefficient(z, learned) > 0.99
    assert metrics.mean_correlation_coefficient(z, rng.normal(size=z.shape)) < 0.2


# --- API and command ---------------------------------------------------------------------

def test_predictor_api_on_trained_run(trained):
    workdir, config = trained
    predictor = sams_jax.load(str(workdir))
    data = simulate(n_latent=3, n_perturbations=6, n_genes=12, mask_prob=0.3, cells_per_perturbation=(40, 10, 10))
    test = data.arrays("test")
    per_cell = predictor.iwelbo(test, n_particles=4, seed=config.seed)
    reported = json.loads((workdir / "metrics.json").read_text())["test/IWELBO"]
    np.testing.assert_allclose(per_cell.mean(), reported, rtol=1e-5)  # same checkpoint, particles and seed
    assert predictor.latent(data).shape == (data.x.shape[0], 3)
    assert predictor.mask_probs().shape == (6, 3) and predictor.embeddings().shape == (6, 3)
    np.testing.assert_allclose(predictor.shifts().to_numpy(),
                               predictor.embeddings().to_numpy() * predictor.mask_probs().to_numpy())
    basis = predictor.sparse_basis()
    assert basis.mask.shape == (6, 3) and list(basis.mask.index) == predictor.perturbation_names
    np.testing.assert_allclose(basis.effects.to_numpy(), predictor.shifts().to_numpy() @ basis.weights, rtol=1e-6)
    sampled = predictor.sample(["1", "2+3"], n=7)
    assert sampled.shape == (14, 12) and sampled.obs["intervention"].tolist() == ["1"] * 7 + ["2+3"] * 7
    assert sampled.obs_names[0] == "cell0" and sampled.uns["checkpoint_step"] == predictor.step
    pd.testing.assert_frame_equal(predictor.history, pd.read_csv(workdir / "history.csv"))
    assert predictor.step in predictor.checkpoints and predictor.checkpoints == sorted(predictor.checkpoints)
    for call in (lambda: predictor.ate(["1"], None, "crn", 16), lambda: predictor.expectations(["1"], 16),
                 lambda: predictor.sample(["1"], 3)):  # settings after the interventions are keywords
        with pytest.raises(TypeError):
            call()
    ate = predictor.ate(n_particles=16)
    assert ate.shape == (5, 12) and ate.uns["control"] == "0"  # every perturbation but the reference
    np.testing.assert_array_equal(predictor.ate(["1"], n_particles=16, seed=3).X,
                                  predictor.ate(["1"], n_particles=16, seed=3).X)
    bad = simulate(n_latent=3, n_perturbations=6, n_genes=12, cells_per_perturbation=(4, 1, 1))
    bad.feature_names = [f"other_{i}" for i in range(12)]
    with pytest.raises(DataError, match="12 missing.*12 extra"):
        predictor.iwelbo(bad)
    assert predictor.expectations([], n_particles=4).shape == (0, 12)
    for bad_count in (2.5, float("nan"), float("inf"), 0):
        with pytest.raises(ValueError, match="n_particles must be a whole number >= 1, got"):
            predictor.expectations(["1"], n_particles=bad_count)
    assert predictor.ate(["1"], n_particles=16.0).uns["n_particles"] == 16  # an int, as computed
    np.testing.assert_array_equal(predictor.get_latent_representation(data, n_particles=3, seed=1),
                                  predictor.latent(data, n_particles=3, seed=1))  # scvi-tools' name
    for bad_count in (0, -1, 2.5):  # 0 particles gave NaN scores, the others a JAX shape error
        for call in (predictor.iwelbo, predictor.latent):
            with pytest.raises(ValueError, match="n_particles must be a whole number >= 1, got"):
                call(data, n_particles=bad_count)
    # cells whose arrays disagree in length, or no cells at all: errors naming them (a shorter dosages was
    # cut short silently; an empty split was a ZeroDivisionError, dense, or an empty result, sparse)
    with pytest.raises(DataError, match=r"dosages has 9 rows but x has 60 cells; pass one row per cell"):
        predictor.iwelbo({**data.arrays("test"), "dosages": data.arrays("test")["dosages"][:9]})
    empty = simulate(n_latent=3, n_perturbations=6, n_genes=12, cells_per_perturbation=(4, 0, 1))
    for stored in (empty.x, sp.csr_matrix(empty.x)):
        empty.x = stored
        for call in (predictor.iwelbo, predictor.latent):
            with pytest.raises(DataError, match=r"nothing to score: split 'val' of these data has no cells"):
                call(empty, split="val")
    for bad_step in ("first", 3.7, True):
        with pytest.raises(CheckpointError, match=r"checkpoint=.* is not 'best', 'latest' or a step number"):
            sams_jax.load(str(workdir), checkpoint=bad_step)
    # an AnnData of the simulation: its reference perturbation "0" is no control label to register with
    labels = [predictor.intervention_name(row) for row in data.dosages]
    adata = anndata.AnnData(X=np.asarray(data.x), obs=pd.DataFrame({"perturbation": labels},
                                                                   index=[f"c{i}" for i in range(len(labels))]),
                            var=pd.DataFrame(index=data.feature_names))
    with pytest.raises(DataError, match=r"the control label '0' is a perturbation of the vocabulary.*control=None"):
        predictor.register(adata, counts_layer=None, control="0")
    with pytest.raises(DataError, match=r"no layer 'counts'.*read with from_anndata's default registration"):
        predictor.register(adata)
    np.testing.assert_array_equal(predictor.register(adata, counts_layer=None, control=None).dosages, data.dosages)


def test_iwelbo_chunk_size_bounds_the_intermediates():
    """Chunks are powers of two within the backend's cell cap whose particles x cells x
    genes fit the backend's element bound: cache-sized on the CPU, large on a GPU (the
    H200's Replogle-scale IWELBO: 0.226 s with the CPU's 64-cell chunks, 0.065 s with
    the GPU's 1,024)."""
    from sams_jax.objective import (IWELBO_CHUNK_ELEMENTS, IWELBO_DEFAULT_CHUNK_ELEMENTS,
                                    IWELBO_DEFAULT_MAX_CHUNK_CELLS, iwelbo_chunk_size)

    assert iwelbo_chunk_size(100, 1_187, "cpu") == 64 and iwelbo_chunk_size(100, 100, "cpu") == 256
    assert iwelbo_chunk_size(100, 1_187, "gpu") == 1_024 and iwelbo_chunk_size(100, 100, "gpu") == 4_096
    assert iwelbo_chunk_size(7, 33, "gpu") == IWELBO_DEFAULT_MAX_CHUNK_CELLS
    for backend, largest, elements in (("cpu", 256, IWELBO_CHUNK_ELEMENTS["cpu"]),
                                       ("gpu", IWELBO_DEFAULT_MAX_CHUNK_CELLS, IWELBO_DEFAULT_CHUNK_ELEMENTS)):
        for particles, genes in [(100, 1_187), (100, 100), (7, 33), (2_500, 2_000), (5_000, 20_000)]:
            cells = iwelbo_chunk_size(particles, genes, backend)
            assert cells & (cells - 1) == 0 and 8 <= cells <= largest  # a power of two within the bounds
            assert cells == 8 or cells * particles * genes <= elements < 2 * cells * particles * genes \
                or cells == largest


def test_sparse_basis_with_fewer_perturbations_than_latent_dimensions_says_how_to_get_one():
    from sams_jax.evaluate import EvaluationWarning, _sparse_basis

    predictor, _ = _linear_predictor()  # T = 4 perturbations, K = 3: a basis is fitted
    assert _sparse_basis(predictor, 0, 2) is not None
    predictor.model = predictor.model.clone(n_latent=6)  # K = 6 > T
    predictor.variables = predictor.model.init(
        {"params": jax.random.key(0), "globals": jax.random.key(1), "local": jax.random.key(2)},
        jnp.zeros((2, 5)), jnp.zeros((2, 4)), jnp.ones(2))
    said = []
    with pytest.warns(EvaluationWarning, match=r"no sparse basis: the model has K = 6 latent dimensions and only 4 "
                                               r"perturbations.*--config.model.n_latent=4 or fewer.*"
                                               r"--sparse-basis-restarts 0"):
        assert _sparse_basis(predictor, 0, 8, said.append) is None
    assert said == []  # not announced before it is refused


def test_load_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints"):
        sams_jax.load(str(tmp_path))


def test_evaluate_command_end_to_end(trained):
    workdir, config = trained
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "sams_jax.evaluate", "--workdir", str(workdir),
                             "--ate-particles", "64", "--iwelbo-particles", "8", "--interventions", "1+2,3+4,2+1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = workdir / "eval"
    results = json.loads((out / "metrics.json").read_text())
    for split in ("all", "train", "val", "test"):
        for name in ("IWELBO", "ATE_pearsonr", "ATE_r2", "ATE_pearsonr_top20", "ATE_r2_top20", "cosine_logfc",
                     "rmse_average", "cosine_logfc_rank", "rmse_rank"):
            assert np.isfinite(results[f"{name}-{split}"]), f"{name}-{split}"
    assert {"mask_precision", "mask_recall", "mask_f1", "mcc", "sparse_basis_f1"} <= set(results)
    # SPEC 5: the learned mask is sigmoid(q mask logits) > 0.5, matched to the true one
    truth = load_data(config.data).truth
    predictor = sams_jax.load(str(workdir))
    probs = jax.nn.sigmoid(np.asarray(predictor.variables["params"]["mask_logits"]))
    expected = metrics.mask_scores(truth["mask"], np.asarray(probs) > 0.5)
    assert {name: results[name] for name in expected} == pytest.approx(expected)
    assert results["ATE_pearsonr-all"] > 0.9  # 3,000 steps learn the effects (about 0.99)
    ate = anndata.read_h5ad(out / "ate.h5ad")
    assert list(ate.obs_names) == ["1", "2", "3", "4", "5", "1+2", "3+4"]
    assert ate.obs["observed"].tolist() == [True] * 5 + [False] * 2
    assert np.all(np.isnan(ate.layers["data"][5:])) and np.all(np.isfinite(ate.layers["model"]))
    assert ate.uns["control"] == "0"
    top = pd.read_csv(out / "top_genes.csv", dtype={"intervention": str, "gene": str})
    assert len(top) == 7 * 12 and top.columns.tolist() == ["intervention", "rank", "gene", "model_ate", "data_ate",
                                                           "learned"]  # 12 genes: all of them, ranked
    first = top[top["intervention"] == "1+2"]
    assert first["rank"].tolist() == list(range(1, 13)) and first["data_ate"].isna().all()
    column = list(ate.var_names).index(first["gene"].iloc[0])
    np.testing.assert_allclose(first["model_ate"].iloc[0], ate.layers["model"][5, column], rtol=1e-6)
    assert np.all(np.diff(np.abs(first["model_ate"].to_numpy())) <= 0)  # largest |model ATE| first
    observed = top[top["intervention"] == "3"]
    np.testing.assert_allclose(observed["data_ate"], ate.layers["data"][2, [list(ate.var_names).index(g)
                                                                            for g in observed["gene"]]], rtol=1e-6)
    for name in ("history.png", "ate_scatter.png", "mask_probs.png", "embeddings.png", "metrics.csv",
                 "sparse_effects.png", "sparse_effects.csv", "sparse_basis.csv"):
        assert (out / name).stat().st_size > 0
    settings = json.loads((out / "settings.json").read_text())  # what produced the scores
    assert settings["checkpoint"] == "best" and settings["checkpoint_step"] == ate.uns["checkpoint_step"]
    assert (settings["iwelbo_particles"], settings["ate_particles"], settings["ate_method"], settings["ate_scale"],
            settings["interventions"], settings["seed"]) == (8, 64, "paper", "mean", ["1+2", "3+4"], 0)
    step = settings["checkpoint_step"]
    assert f"checkpoint step {step} (best)" in result.stderr and "ATEs: 7 interventions x 64 particles" in \
        result.stderr and f"wrote {out}{os.sep}: metrics.json" in result.stderr
    bad = subprocess.run([sys.executable, "-m", "sams_jax.evaluate", "--workdir", str(workdir),
                          "--interventions", "1+nope"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown perturbation 'nope'" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "sams_jax.evaluate", "--workdir", str(workdir / "nothing")],
                             cwd=ROOT, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "no checkpoints" in missing.stderr


def test_evaluate_writes_ate_h5ad_with_pandas_default_strings(trained):
    """pandas >= 3 stores strings in its own string dtype, which anndata refuses to write
    unless asked; evaluation must still write ate.h5ad (emulated on pandas 2 by
    ``future.infer_string``)."""
    from sams_jax.evaluate import evaluate

    workdir, _ = trained
    try:
        pd.get_option("future.infer_string")
    except KeyError:  # pandas.errors.OptionError
        pytest.skip("this pandas has no future.infer_string")
    with pd.option_context("future.infer_string", True):
        evaluate(str(workdir), iwelbo_particles=2, ate_particles=8, plots=False)
        sampled = sams_jax.load(str(workdir)).sample(["1"], n=3)
    ate = anndata.read_h5ad(workdir / "eval" / "ate.h5ad")
    assert ate.obs_names[0] == "1" and ate.shape[1] == 12
    from sams_jax.data.anndata_io import write_h5ad
    write_h5ad(sampled, workdir / "sampled.h5ad")
    assert anndata.read_h5ad(workdir / "sampled.h5ad").obs["intervention"].tolist() == ["1"] * 3


def _unique_predictor():
    """The linear predictor with a vocabulary of a model trained with
    ``encode_combinations="unique"``: the pair a+b is a perturbation of its own."""
    predictor, _ = _linear_predictor()
    metadata = {**predictor.metadata, "perturbation_names": ["a", "a+b", "b", "c"],
                "registration": {"encode_combinations": "unique", "delimiter": "+"}}
    return Predictor(predictor.model, predictor.variables, predictor.config, metadata, 0, "")


def test_intervention_names_in_any_order_each_member_once():

    predictor, _ = _linear_predictor()
    np.testing.assert_array_equal(predictor.dosages("c+b"), [[0, 1, 1, 0]])  # one name, members in any order
    assert predictor.canonical_name("c + b") == "b+c" and predictor.canonical_name("control") == "control"
    with pytest.raises(InterventionError, match=r"names \['a'\] more than once"):
        predictor.dosages(["a+a"])  # as registration refuses an 'A+A' label
    with pytest.raises(InterventionError, match="names"):
        predictor.dosages([1])
    assert predictor.ate("b+c", n_particles=4).obs_names.tolist() == ["b+c"]  # not 'b', '+', 'c'
    with pytest.warns(InterventionWarning, match=r"\['a', 'b\+c'\] given more than once \(2 interventions"):
        repeated = predictor.ate(["a", "b+c", "a", "c+b"], n_particles=4)
    assert repeated.obs_names.tolist() == ["a", "b+c"]  # unique rows, first occurrences in order, named as given
    np.testing.assert_array_equal(repeated.X, predictor.ate(["a", "b+c"], n_particles=4).X)
    from sams_jax.evaluate import top_genes

    top = top_genes(repeated, n=3)  # Predictor.ate's layout: the model's ATEs in X, no data ATEs
    assert top["intervention"].tolist() == ["a"] * 3 + ["b+c"] * 3 and top["data_ate"].isna().all()
    np.testing.assert_allclose(np.abs(top["model_ate"][:3]), np.sort(np.abs(repeated.X[0]))[::-1][:3])

    unique = _unique_predictor()
    np.testing.assert_array_equal(unique.dosages(["b+a", "a+b", "a"]), [[0, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]])
    assert unique.canonical_name("b+a") == "a+b"
    with pytest.warns(InterventionWarning, match="never learned that combinations add"):
        np.testing.assert_array_equal(unique.dosages(["c+a"]), [[1, 0, 0, 1]])
    assert unique.canonical_name("c+a") == "a+c"
    pairs_only = Predictor(unique.model, unique.variables, unique.config,  # a pair whose members are not singles
                           {**unique.metadata, "perturbation_names": ["b+a", "c", "d", "e"]}, 0, "")
    np.testing.assert_array_equal(pairs_only.dosages(["a + b", "b+a"]), [[1, 0, 0, 0], [1, 0, 0, 0]])
    assert pairs_only.canonical_name("a+b") == "b+a"  # the vocabulary's own name


def test_sample_library_size_and_cell_count(trained):
    workdir, _ = trained
    predictor = sams_jax.load(str(workdir))
    data = simulate(n_latent=3, n_perturbations=6, n_genes=12, mask_prob=0.3, cells_per_perturbation=(40, 10, 10))
    assert predictor.training_library_size == pytest.approx(float(np.median(data.library_size[data.mask("train")])))
    sampled = predictor.sample("1", n=3)
    assert sampled.uns["library_size"] == predictor.training_library_size and sampled.shape == (3, 12)
    assert predictor.sample("1", n=3, library_size=500).uns["library_size"] == 500
    for bad in (0, 2.5, float("nan")):
        with pytest.raises(ValueError, match=r"n \(cells per intervention\) must be a whole number >= 1"):
            predictor.sample(["1"], n=bad)
    assert predictor.sample("1", n=2.0).shape == (2, 12)
    for bad in (0, -5, float("nan"), "many"):  # -5 gave counts, NaN gave NaN cells
        with pytest.raises(ValueError, match=r"library_size must be a finite number > 0"):
            predictor.sample(["1"], n=2, library_size=bad)
        with pytest.raises(ValueError, match=r"library_size must be a finite number > 0"):
            predictor.ate(["1"], n_particles=4, library_size=bad)


def test_mean_scale_is_refused_for_library_size_likelihoods():
    from sams_jax.evaluate import EvaluationError, check_ate_scale

    with pytest.raises(EvaluationError, match="perturbseq"):
        check_ate_scale("library_nb", "mean")
    for likelihood, scale in [("library_nb", "perturbseq"), ("poisson", "mean"), ("normal", "mean")]:
        check_ate_scale(likelihood, scale)


def test_evaluate_unlearned_perturbations_and_runs_without_control(trained, monkeypatch):
    """A perturbation without training cells counts in the ATE metrics as SPEC 5 says
    (every observed intervention), with a warning, and is left out with
    ``ate_metrics_over="learned"`` (``learned`` in ate.h5ad); without a control label
    evaluate scores the IWELBO, writes no ATE outputs and leaves no file of an earlier
    evaluation behind."""
    import ml_collections
    from sams_jax import evaluate as evaluate_lib
    from sams_jax.data import load_data

    workdir, _ = trained
    predictor = sams_jax.load(str(workdir))
    data = load_data(ml_collections.ConfigDict(predictor.config.data.to_dict()), predictor.config.model.likelihood)
    trained_cells = np.asarray(predictor.metadata["cells_per_perturbation"]["train"])
    trained_cells[predictor.perturbation_names.index("5")] = 0  # as if "5" had had no training cells

    def learned(interventions):  # Predictor.learned with those counts (the metadata stay the data's)
        rows = predictor._dosage_rows(interventions)
        return np.all((trained_cells > 0) | (rows == 0), axis=1)

    monkeypatch.setattr(predictor, "learned", learned)
    monkeypatch.setattr(evaluate_lib, "load", lambda *args: predictor)
    with pytest.warns(evaluate_lib.EvaluationWarning, match=r"observed interventions \['5'\] \(1 in all\) have "
                      r"members without training cells.*count in the ATE metrics.*--ate-metrics-over learned"):
        paper = evaluate_lib.evaluate(str(workdir), iwelbo_particles=2, ate_particles=32, data=data, plots=False,
                                      sparse_basis_restarts=0, write=False)
    with pytest.warns(evaluate_lib.EvaluationWarning, match=r"interventions \['4\+5'\] have members without "
                                                             "training cells"):
        results = evaluate_lib.evaluate(str(workdir), iwelbo_particles=2, ate_particles=32, data=data,
                                        sparse_basis_restarts=0, interventions=["4+5", "3+4"],
                                        ate_metrics_over="learned")
    out = workdir / "eval"
    ate = anndata.read_h5ad(out / "ate.h5ad")
    observed = ate.obs["observed"].to_numpy()  # the paper's rule: every observed intervention
    assert ate.uns["ate_metrics_over"] == "learned"  # the last evaluation's rule, and which rows it counted
    np.testing.assert_array_equal(ate.obs["in_metrics"], ate.obs["observed"] & ate.obs["learned"])
    assert paper["ATE_pearsonr-all"] == pytest.approx(metrics.ate_agreement(
        ate.layers["data"][observed], ate.layers["model"][observed], 20)["ATE_pearsonr"])
    assert ate.obs.loc["5", "learned"] == False and ate.obs["learned"].sum() == 5  # noqa: E712
    assert ate.obs.loc["4+5", "learned"] == False and ate.obs.loc["3+4", "learned"] == True  # noqa: E712
    assert ate.obs.loc["3+4", "observed"] == False  # noqa: E712
    # training cells got each single perturbation alone (the patch above changed only the counts), no pair
    np.testing.assert_array_equal(ate.obs["seen_in_training"], ate.obs["observed"])
    kept = ate.obs["learned"].to_numpy()
    expected = metrics.ate_agreement(ate.layers["data"][kept], ate.layers["model"][kept], 20)["ATE_pearsonr"]
    assert results["ATE_pearsonr-all"] == pytest.approx(expected) and expected != paper["ATE_pearsonr-all"]
    assert (out / "ate_scatter.png").exists()
    # the extra interventions are predicted apart: the observed interventions' scores are the same without them
    extra = predictor.expectations(["0", "4+5", "3+4"], n_particles=32, seed=0, stream=1)  # their own control
    np.testing.assert_allclose(ate[["4+5", "3+4"]].layers["model"], extra[1:] - extra[0], rtol=1e-5, atol=1e-6)
    written = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    alone = evaluate_lib.evaluate(str(workdir), iwelbo_particles=2, ate_particles=32, data=data, plots=False,
                                  sparse_basis_restarts=0, write=False, ate_metrics_over="learned")
    assert {k: v for k, v in alone.items() if k.startswith("ATE")} == \
        {k: v for k, v in results.items() if k.startswith("ATE")}
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == written  # write=False: nothing touched
    # the sparse basis was skipped (sparse_basis_restarts=0): its scores are null, not left out
    saved = json.loads((out / "metrics.json").read_text())
    assert all(saved[f"sparse_basis_{name}"] is None for name in ("precision", "recall", "f1"))
    # the Python API says so too
    with pytest.warns(InterventionWarning, match=r"\['5', '4\+5'\] \(2 in all\) have members without training "
                                                 r"cells.*obs\['learned'\] is False"):
        effects = predictor.ate(["4", "5", "4+5"], n_particles=8)
    assert effects.obs["learned"].tolist() == [True, False, False]
    assert effects.obs["seen_in_training"].tolist() == [True, True, False]

    predictor.control = None
    with pytest.warns(evaluate_lib.EvaluationWarning, match="no control label, so there are no ATEs"):
        results = evaluate_lib.evaluate(str(workdir), iwelbo_particles=2, plots=False, data=data,
                                        sparse_basis_restarts=0)
    assert np.isfinite(results["IWELBO-test"]) and not any(name.startswith("ATE") for name in results)
    assert sorted(os.listdir(out)) == ["metrics.csv", "metrics.json", "settings.json"]
    assert json.loads((out / "settings.json").read_text())["data"].startswith("PerturbationData passed from Python")
    predictor.config.model.likelihood = "library_nb"  # evaluate refuses the mean scale for it
    with pytest.raises(evaluate_lib.EvaluationError, match="perturbseq"):
        evaluate_lib.evaluate(str(workdir), ate_scale="mean", data=data)
    with pytest.raises(evaluate_lib.EvaluationError, match=r"ate_metrics_over='all' is not allowed.*'observed', "
                       "'learned'"):
        evaluate_lib.evaluate(str(workdir), data=data, ate_metrics_over="all")


def test_evaluate_refuses_data_other_than_the_trained_runs(trained, monkeypatch):
    """The data rebuilt from the saved config.data are checked against the checkpoint's
    metadata: a run trained on other data (e.g. passed from Python) is not scored on them."""
    from sams_jax import evaluate as evaluate_lib

    workdir, _ = trained
    other = simulate(n_latent=3, n_perturbations=6, n_genes=12, mask_prob=0.3, cells_per_perturbation=(40, 10, 10),
                     seed=1)  # the same sizes and splits, other cells
    monkeypatch.setattr(evaluate_lib, "load_data", lambda *args: other)
    with pytest.raises(DataError, match=r"not the data it was trained on: median_library_size; normalization_stats.*"
                                        r"evaluate\(workdir, data=data\)"):
        evaluate_lib.evaluate(str(workdir), iwelbo_particles=2, ate_particles=8, plots=False)
    # a run whose checkpoint records data passed from Python: said, where config.data does not rebuild them
    predictor = sams_jax.load(str(workdir))
    assert predictor.metadata["data_source"] == "config"
    predictor.metadata["data_source"] = "python"
    monkeypatch.setattr(evaluate_lib, "load", lambda *args: predictor)
    with pytest.raises(evaluate_lib.EvaluationError, match=r"trained on data passed from Python.*data.source="
                                                           r"'simulation'\) describes other data.*"
                                                           r"sams_jax.evaluate.evaluate\(workdir, data=data\)"):
        evaluate_lib.evaluate(str(workdir), iwelbo_particles=2, ate_particles=8, plots=False)
    monkeypatch.undo()  # Python data that config.data does describe: evaluated as any run
    monkeypatch.setattr(evaluate_lib, "load", lambda *args: predictor)
    results = evaluate_lib.evaluate(str(workdir), iwelbo_particles=2, ate_particles=8, plots=False,
                                    sparse_basis_restarts=0)
    assert np.isfinite(results["IWELBO-test"])


def _untrained_predictor(config, model_name: str) -> Predictor:
    """A freshly initialised ``model_name`` of ``config`` (5 genes; perturbations a, b, c)."""
    from sams_jax.models import create_model

    config.model.name = model_name
    model = create_model(config.model, 5, 3)
    dummy = (jnp.zeros((2, 5)), jnp.zeros((2, 3)), jnp.ones(2))
    variables = model.init({"params": jax.random.key(0), "globals": jax.random.key(1), "local": jax.random.key(2)},
                           *dummy)
    metadata = {"feature_names": [f"g{i}" for i in range(5)], "perturbation_names": ["a", "b", "c"],
                "control": "control"}
    return Predictor(model, variables, config, metadata, 0, "")


def test_seen_in_training_tells_measured_conditions_from_composed_ones(tiny_config):
    """``seen_in_training``: the sets of perturbations training cells received (whatever
    the members' order); not a single given only inside a combination, a pair never
    given together, a subset or a superset of a seen triple. Checkpoints without the
    record give ``None`` and no obs column."""
    predictor = _untrained_predictor(tiny_config, "sams_vae")
    predictor.metadata.update(cells_per_perturbation={"train": [10, 5, 2]},
                              training_conditions=[[], [0], [0, 1], [0, 1, 2]])
    names = ["control", "a", "b", "c", "a+b", "b+a", "a+c", "a+b+c"]
    np.testing.assert_array_equal(predictor.seen_in_training(predictor.dosages(names)),
                                  [True, True, False, False, True, True, False, True])
    predictor.metadata["training_conditions"] = [[0], [0, 1, 2]]  # no control cells, a triple alone
    np.testing.assert_array_equal(predictor.seen_in_training(predictor.dosages(["control", "a+b", "a+b+c"])),
                                  [False, False, True])
    assert predictor.ate(["a+b+c", "a+c", "a"], n_particles=4).obs["seen_in_training"].tolist() == [True, False, True]
    # names work as rows do; anything else is a clear error
    assert predictor.seen_in_training("a+b+c").tolist() == [True]
    assert predictor.learned(["c", "a"]).tolist() == [True, True]
    np.testing.assert_array_equal(predictor.seen_in_training(predictor.dosages("a")[0]), [True])
    with pytest.raises(InterventionError, match=r"intervention names .* or dosage rows \[I, 3\].*shape \(2, 2\)"):
        predictor.learned(np.zeros((2, 2)))
    del predictor.metadata["training_conditions"]
    assert predictor.seen_in_training(predictor.dosages(names)) is None
    assert "seen_in_training" not in predictor.ate(["a+c"], n_particles=4).obs


def test_a_model_that_cannot_compose_refuses_combinations(tiny_config):
    predictor = _untrained_predictor(tiny_config, "svae_plus")
    np.testing.assert_array_equal(predictor.dosages(["b", "control"]), [[0, 1, 0], [0, 0, 0]])
    with pytest.raises(InterventionError, match="'a\\+b' combines perturbations, which model 'svae_plus' cannot"):
        predictor.ate(["a+b"], n_particles=4)


def test_per_perturbation_tables_of_a_model_without_them_name_the_models_with_them(tiny_config):
    predictor = _untrained_predictor(tiny_config, "conditional_vae")
    for method, what in [("mask_probs", "mask probs"), ("embeddings", "embedding means"),
                         ("shifts", "embedding means")]:
        with pytest.raises(NotImplementedError, match=rf"model 'conditional_vae' has no {what} \(models that have: "
                                                      r"\[.*'sams_vae'.*\]\)"):
            getattr(predictor, method)()


def test_other_data_under_a_random_split_mention_the_cells_order():
    """A file's cells shuffled give another random split: the refusal says why."""
    import types

    from sams_jax.evaluate import check_trained_data

    data = simulate(n_latent=3, n_perturbations=4, n_genes=6, mask_prob=0.3, cells_per_perturbation=(10, 4, 4), seed=0)
    saved = data.metadata("none")
    saved["median_library_size"] += 1.0  # some difference
    for registration, hint in (({"task": "none", "split_key": None}, True), ({"task": "none", "split_key": "s"}, False),
                               (None, False)):
        predictor = types.SimpleNamespace(metadata={**saved, "registration": registration})
        with pytest.raises(DataError, match="median_library_size") as caught:
            check_trained_data(predictor, data)
        assert ("follows the order of the cells" in str(caught.value)) == hint


def test_names_with_plus_and_no_delimiter_combine_with_ampersand():
    """Replogle's perturbation names contain "+" and are registered without a delimiter:
    combinations are then written with "&", and named so."""
    predictor, _ = _linear_predictor()
    names = ["A_+_1|A_-_2", "B_+_3|B_-_4", "C_+_5", "D"]
    metadata = {**predictor.metadata, "perturbation_names": names, "registration": {"delimiter": None}}
    replogle = Predictor(predictor.model, predictor.variables, predictor.config, metadata, 0, "")
    assert replogle.delimiter == "&" and predictor.delimiter == "+"
    rows = replogle.dosages(["A_+_1|A_-_2", "B_+_3|B_-_4&A_+_1|A_-_2"])
    assert rows.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]
    assert replogle.intervention_name(rows[1]) == "A_+_1|A_-_2&B_+_3|B_-_4"
    with pytest.raises(InterventionError, match="written with '&'"):
        replogle.dosages(["A_+_1|A_-_2+B_+_3|B_-_4"])


def test_pathway_grouping_by_hand():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 10))
    labels = np.array(["A"] * 5 + ["B"] * 5 + ["C"] * 4 + [""] * 3 + ["D"], dtype=object)  # D: one member, left out
    vectors = np.concatenate([np.repeat(centres, [5, 5, 4], axis=0) + 0.05 * rng.normal(size=(14, 10)),
                              rng.normal(size=(4, 10))])
    out = metrics.pathway_grouping(vectors, labels, k=3)
    assert out["knn_purity"] == 1.0  # tight clusters: every nearest neighbour shares the pathway
    np.testing.assert_allclose(out["knn_chance"], (5 * 4 + 5 * 4 + 4 * 3) / 13 / 14)
    unit = vectors[:14] / np.linalg.norm(vectors[:14], axis=1, keepdims=True)
    cosine, same = unit @ unit.T, labels[:14, None] == labels[None, :14]
    np.testing.assert_allclose(out["within_cosine"], cosine[same & ~np.eye(14, dtype=bool)].mean())
    np.testing.assert_allclose(out["between_cosine"], cosine[~same].mean())
    shuffled = metrics.pathway_grouping(vectors, labels[rng.permutation(len(labels))], k=3)
    assert shuffled["knn_purity"] < 0.7
    assert np.isnan(metrics.pathway_grouping(vectors, np.where(labels == "A", "A", ""), k=3)["knn_purity"])
    names = ["AARS_+_70323216.23-P1P2|AARS_-_70323249.23-P1P2", "KLF1", "KLF1X_1", "non-targeting", "DARS", "GATA1",
             "MYC"]
    sets = {"tRNA": ["AARS", "DARS"], "TF": ["KLF1", "GATA1"], "other": ["MYC"], "again": ["KLF1", "CEBPA"]}
    # guide-pair IDs by their gene; a gene in two sets counts for the first; a set of one perturbation groups nothing
    assert metrics.pathway_labels(names, sets).tolist() == ["tRNA", "TF", "", "", "tRNA", "TF", ""]
    keep = np.array([True, True, True, True, True, False, True])  # GATA1 left out: TF keeps one, so none
    assert metrics.pathway_labels(names, sets, keep=keep).tolist() == ["tRNA", "", "", "", "tRNA", "", ""]


def test_evaluate_pathway_metrics_and_plot(trained, tmp_path):
    from sams_jax import evaluate as evaluate_lib

    workdir, _ = trained
    names = sams_jax.load(str(workdir)).perturbation_names
    pathways = {"first": names[:3], "second": names[3:6]}
    results = evaluate_lib.evaluate(str(workdir), iwelbo_particles=2, ate_particles=8, sparse_basis_restarts=0,
                                    pathways=pathways)
    for vectors in ("mask", "embedding"):
        assert 0.0 <= results[f"pathway_{vectors}_knn_purity"] <= 1.0
        np.testing.assert_allclose(results[f"pathway_{vectors}_knn_chance"], 2 / 5)  # 2 of the 5 others share one
    assert (workdir / "eval" / "pathways.png").is_file()
    (tmp_path / "sets.json").write_text(json.dumps(pathways))
    from_file = evaluate_lib.evaluate(str(workdir), iwelbo_particles=2, ate_particles=8, sparse_basis_restarts=0,
                                      pathways=str(tmp_path / "sets.json"), write=False)
    assert {k: v for k, v in from_file.items() if k.startswith("pathway")} == \
        {k: v for k, v in results.items() if k.startswith("pathway")}
    with pytest.raises(evaluate_lib.EvaluationError, match="map each pathway to a list of genes"):
        (tmp_path / "bad.json").write_text("[1, 2]")
        evaluate_lib.evaluate(str(workdir), write=False, pathways=str(tmp_path / "bad.json"))
    with pytest.warns(evaluate_lib.EvaluationWarning, match=r"1 of the 3 genes in the sets name no perturbation of "
                                                              r"the model, e.g. \['NOT_A_GENE'\].*no pathway metrics"):
        evaluate_lib.evaluate(str(workdir), iwelbo_particles=2, ate_particles=8, sparse_basis_restarts=0,
                              pathways={"other": ["NOT_A_GENE"], "typo": names[:2]}, write=False)
    evaluate_lib.evaluate(str(workdir), iwelbo_particles=2, ate_particles=8, sparse_basis_restarts=0)
    assert not (workdir / "eval" / "pathways.png").exists()  # no pathways now: the earlier plot is gone


def test_evaluate_does_not_repeat_the_registrations_data_warnings(trained, monkeypatch):
    from sams_jax import evaluate as evaluate_lib
    from sams_jax.data.anndata_io import DataWarning

    workdir, _ = trained
    original = evaluate_lib.load_data

    def load_data_with_a_warning(*args):
        warnings.warn("perturbations with few training cells: ...", DataWarning)  # as registration warns
        return original(*args)

    monkeypatch.setattr(evaluate_lib, "load_data", load_data_with_a_warning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate_lib.evaluate(str(workdir), iwelbo_particles=2, ate_particles=8, sparse_basis_restarts=0, write=False)
    assert not [w.message for w in caught if issubclass(w.category, DataWarning)]  # given at training already


def test_a_wrong_control_is_named_as_the_control():
    predictor, _ = _linear_predictor()
    with pytest.raises(InterventionError, match=r"control='contrl' is neither the data's control label \('control'\)"):
        predictor.ate(["a"], control="contrl")
    assert predictor.ate(["b"], control="a", n_particles=8).uns["control"] == "a"  # another intervention: allowed


def test_perturbation_data_repr_gives_sizes_not_arrays():
    data = simulate(n_latent=3, n_perturbations=4, n_genes=5, cells_per_perturbation=(4, 1, 1))
    assert repr(data) == ("PerturbationData(name='simulation_normal', cells=24, genes=5, perturbations=4, "
                          "control='0', splits={'train': 16, 'val': 4, 'test': 4}, x=ndarray)")


def test_heatmap_size_is_bounded_for_many_latent_dimensions(tmp_path):
    import matplotlib.image

    from sams_jax import plots

    frame = pd.DataFrame(np.random.default_rng(0).uniform(size=(5, 100)), index=[f"p{i}" for i in range(5)])
    with matplotlib.rc_context({"backend": "svg"}):  # a user's backend (a notebook's, say) is left as it is
        plots.plot_heatmap(frame, str(tmp_path / "wide.png"), "mask probabilities")
        assert matplotlib.rcParams["backend"] == "svg"
    height, width = matplotlib.image.imread(str(tmp_path / "wide.png")).shape[:2]
    assert width <= 16 * 120 and height >= 3.5 * 120  # K = 100 in at most 16 inches; a few rows still readable


def test_heatmaps_share_one_row_order(tmp_path, monkeypatch):
    """heatmap_rows orders rows by similarity (similar rows adjacent) and keeps the most
    active ones beyond max_rows; plot_heatmap shows the rows it is given, in that order."""
    from sams_jax import plots

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 6)) * 5
    values = np.concatenate([centres[i % 3] + 0.01 * rng.normal(size=(1, 6)) for i in range(9)])
    frame = pd.DataFrame(values, index=[f"p{i}" for i in range(9)])
    rows, note = plots.heatmap_rows(frame)
    groups = [int(name[1:]) % 3 for name in rows]
    assert note == "" and sorted(rows) == sorted(frame.index)
    assert sum(a != b for a, b in zip(groups, groups[1:])) == 2  # three contiguous groups
    kept, note = plots.heatmap_rows(pd.DataFrame(-np.arange(1.0, 10.0)[:, None] * np.ones((9, 6)), index=frame.index),
                                    max_rows=4, measure="expected shift")
    assert sorted(kept) == ["p5", "p6", "p7", "p8"]
    assert note == "the 4 of 9 perturbations with the largest sum of |expected shift|"
    shown = {}
    monkeypatch.setattr("matplotlib.axes.Axes.set_yticks", lambda self, ticks, labels=None, **kw: shown.update(
        labels=list(labels)))
    other = pd.DataFrame(rng.uniform(size=(9, 6)), index=frame.index)  # another frame, the same order
    plots.plot_heatmap(other, str(tmp_path / "h.png"), "other", rows=(kept, "some rows"))
    assert shown["labels"] == list(kept)


def test_history_plot_names_the_objective_and_shows_the_mask_where_recorded(tmp_path):
    from sams_jax import plots

    history = pd.DataFrame({"step": [10, 20], "train_loss": [5.0, 4.0], "val_loss": [5.5, 4.5],
                            "mask_density": [0.9, 0.5], "mask_f1": [0.2, 0.4]})
    loss, masks = plots.plot_history(history, str(tmp_path / "h.png"), "iwelbo")
    assert loss.get_ylabel() == "loss (minus IWELBO per cell)"
    assert [line.get_label() for line in masks.get_lines()] == ["mask density", "mask f1"]
    loss, masks = plots.plot_history(history, str(tmp_path / "h.png"), "iwelbo", true_mask_density=0.133)
    assert masks.get_lines()[-1].get_label() == "true mask density (0.133)"
    assert masks.get_lines()[-1].get_ydata()[0] == pytest.approx(0.133)
    (alone,) = plots.plot_history(history.drop(columns=["mask_density", "mask_f1"]), str(tmp_path / "h2.png"))
    assert alone.get_ylabel() == "loss (minus ELBO per cell)"
