"""Log-densities of the likelihood heads and guide pieces against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import stats

from sams_jax.likelihoods import LikelihoodHead
from sams_jax.nn import NormalHead, ResidualMLP, straight_through_bernoulli


def _head(likelihood, hidden, library_size, n_genes=4):
    module = LikelihoodHead(likelihood, n_genes)
    variables = module.init(jax.random.key(0), hidden, library_size)
    return module, variables


def _dense(params, h):
    return np.asarray(h) @ np.asarray(params["kernel"]) + np.asarray(params["bias"])


def test_normal_head_log_prob_matches_closed_form():
    h = jax.random.normal(jax.random.key(1), (3, 5))
    module, variables = _head("normal", h, jnp.ones(3))
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    p = variables["params"]["normal"]
    loc, logvar = _dense(p["loc"], h), _dense(p["logvar"], h)
    expected = stats.norm(loc, np.sqrt(np.exp(logvar) + 1e-4)).logpdf(x)
    got = module.apply(variables, h, jnp.ones(3)).log_prob(x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_poisson_head_rate_is_softplus():
    h = jax.random.normal(jax.random.key(2), (3, 5))
    module, variables = _head("poisson", h, jnp.ones(3))
    x = np.array([[0, 1, 2, 5]] * 3, np.float32)
    rate = np.log1p(np.exp(_dense(variables["params"]["rate"], h)))
    got = module.apply(variables, h, jnp.ones(3)).log_prob(x)
    np.testing.assert_allclose(got, stats.poisson(rate).logpmf(x), rtol=1e-5, atol=1e-5)


def test_library_nb_matches_scipy_negative_binomial():
    h = jax.random.normal(jax.random.key(3), (3, 5))
    library = jnp.array([100.0, 2000.0, 50.0])
    module, variables = _head("library_nb", h, library)
    variables = jax.tree.map(lambda v: v, variables)
    variables["params"]["log_theta"] = jnp.array([0.5, -1.0, 2.0, 0.0])
    logits = _dense(variables["params"]["logits"], h)
    rho = np.exp(logits - logits.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    mu = np.asarray(library)[:, None] * rho
    theta = np.exp(np.asarray(variables["params"]["log_theta"]))
    x = np.array([[0, 3, 10, 40], [200, 800, 0, 5], [1, 1, 1, 1]], np.float32)
    # Gamma-Poisson(concentration theta, rate theta / (mu + 1e-4)) = NB(n = theta, p = theta / (theta + mu + 1e-4))
    expected = stats.nbinom(theta, theta / (theta + mu + 1e-4)).logpmf(x)
    got = module.apply(variables, h, library).log_prob(x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(module.apply(variables, h, library).mean, mu + 1e-4, rtol=1e-5)


def test_unknown_likelihood_raises():
    with pytest.raises(ValueError, match="allowed"):
        _head("gaussian", jnp.ones((2, 3)), jnp.ones(2))


def test_normal_head_variance_floor():
    head = NormalHead(2)
    variables = head.init(jax.random.key(0), jnp.ones((1, 3)))
    variables = jax.tree.map(jnp.zeros_like, variables)
    variables["params"]["logvar"]["bias"] = jnp.full((2,), -50.0)
    q = head.apply(variables, jnp.ones((1, 3)))
    np.testing.assert_allclose(q.scale, np.sqrt(np.exp(-50.0) + 1e-4), rtol=1e-6)


@pytest.mark.parametrize("features", [15, 100])
def test_normal_head_is_its_two_linear_heads(features):
    """A narrow head (one product with both kernels side by side) and a wide one (two
    products) are ``Normal(h @ W_loc + b_loc, sqrt(exp(h @ W_logvar + b_logvar) + 1e-4))``,
    with the parameter names and gradients of two separate layers."""
    h = jax.random.normal(jax.random.key(0), (2, 9, 40))
    head = NormalHead(features)
    variables = head.init(jax.random.key(1), h)
    p = variables["params"]
    assert set(p) == {"loc", "logvar"} and p["loc"]["kernel"].shape == (40, features)
    loc = np.asarray(h) @ p["loc"]["kernel"] + p["loc"]["bias"]
    variance = np.exp(np.asarray(h) @ p["logvar"]["kernel"] + p["logvar"]["bias"]) + 1e-4
    q = head.apply(variables, h)
    np.testing.assert_allclose(q.loc, loc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.scale, np.sqrt(variance), rtol=1e-5)

    def reference(params):
        return dist.Normal(h @ params["loc"]["kernel"] + params["loc"]["bias"],
                           jnp.sqrt(jnp.exp(h @ params["logvar"]["kernel"] + params["logvar"]["bias"]) + 1e-4))

    value = jnp.ones((2, 9, features))
    ours = jax.grad(lambda params: head.apply({"params": params}, h).log_prob(value).sum())(p)
    theirs = jax.grad(lambda params: reference(params).log_prob(value).sum())(p)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_residual_mlp_multi_input_equals_concatenation():
    """Separate first-layer kernels per input (and a per-row kernel) are exactly one
    dense layer on [x, offset, one_hot(row)]; later layers are residual."""
    x = jax.random.normal(jax.random.key(0), (7, 5))
    offset = jax.random.normal(jax.random.key(1), (7, 3))
    mlp = ResidualMLP(n_hidden=6, n_layers=2, row_one_hot=True, n_rows=7)
    variables = mlp.init(jax.random.key(2), x, offset)
    p = variables["params"]
    kernel = np.concatenate([p["kernel_0_0"], p["kernel_0_1"], p["kernel_0_rows"]], axis=0)
    inputs = np.concatenate([x, offset, np.eye(7)], axis=1)
    leaky = lambda v: np.where(v > 0, v, 0.01 * v)
    h1 = leaky(inputs @ kernel + p["bias_0"])
    h2 = h1 + leaky(h1 @ p["dense_1"]["kernel"] + p["dense_1"]["bias"])
    np.testing.assert_allclose(mlp.apply(variables, x, offset), h2, rtol=1e-5, atol=1e-6)
    # evaluating selected rows only equals taking those rows of the full evaluation
    rows = jnp.array([4, 0, 4])
    np.testing.assert_allclose(mlp.apply(variables, x[rows], offset[rows], row_index=rows), h2[np.asarray(rows)],
                               rtol=1e-5, atol=1e-6)
    # PyTorch-style init: bound 1/sqrt(total fan-in) = 1/sqrt(5 + 3 + 7)
    assert np.abs(kernel).max() <= 1 / np.sqrt(15) + 1e-7


def test_straight_through_sample_is_hard_with_relaxed_gradient():
    logits = jnp.array([[-2.0, 0.0, 3.0]] * 200)
    key = jax.random.key(0)
    sample = straight_through_bernoulli(key, logits, 1.0)
    assert set(np.unique(np.asarray(sample)).tolist()) <= {0.0, 1.0}
    # frequency of ones follows sigmoid(logits)
    np.testing.assert_allclose(np.asarray(sample).mean(0), jax.nn.sigmoid(logits[0]), atol=0.1)
    # the gradient is that of the relaxed sample sigmoid((logits + L) / temperature)
    soft = dist.RelaxedBernoulliLogits(0.5, logits).rsample(key)
    grad_st = jax.grad(lambda l: straight_through_bernoulli(key, l, 0.5).sum())(logits)
    grad_soft = jax.grad(lambda l: dist.RelaxedBernoulliLogits(0.5, l).rsample(key).sum())(logits)
    np.testing.assert_allclose(grad_st, grad_soft, rtol=1e-6)
    assert np.all(np.asarray(grad_st) > 0)
    np.testing.assert_array_equal(np.asarray(straight_through_bernoulli(key, logits, 0.5)),
                                  (np.asarray(soft) > 0.5).astype(np.float32))


def test_match_particles_sums_over_particles_with_a_product(monkeypatch):
    """Inside the objective's vmap over particles, a per-cell array meeting per-particle
    ones is broadcast explicitly: same values and gradients as the implicit broadcast,
    but the backward sum over particles is a dot (no leading-axis reduce_sum); a per-cell
    array meeting per-cell ones stays per-cell; outside the vmap it is the identity."""
    import sams_jax.nn
    from sams_jax.nn import PARTICLE_AXIS, add_across_particles, match_particles

    monkeypatch.setattr(sams_jax.nn, "EXPLICIT_BROADCAST_MIN_ELEMENTS", 0)  # these arrays are small
    monkeypatch.setattr(sams_jax.nn, "EXPLICIT_BROADCAST_BACKENDS", (jax.default_backend(),))
    shared = jax.random.normal(jax.random.key(0), (4, 3))
    per_particle = jax.random.normal(jax.random.key(1), (5, 4, 3))

    def objective(add):
        def f(s):
            return jax.vmap(lambda p: jnp.tanh(add(s, p)).sum(), axis_name=PARTICLE_AXIS)(per_particle).sum()
        return f

    plain, ours = objective(lambda a, b: a + b), objective(add_across_particles)
    np.testing.assert_allclose(ours(shared), plain(shared), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(shared), jax.grad(plain)(shared), rtol=1e-5, atol=1e-6)
    particle_sum = "f32[4,3] = reduce_sum[axes=(0,)"  # the cotangent of `shared`, summed over particles
    assert particle_sum in str(jax.make_jaxpr(jax.grad(plain))(shared))
    backward = str(jax.make_jaxpr(jax.grad(ours))(shared))
    assert particle_sum not in backward and "dot_general" in backward
    # per-cell with per-cell: not broadcast (out_axes=None fails for a per-particle output)
    _, kept = jax.vmap(lambda p: (p, match_particles(shared, 2 * shared)), axis_name=PARTICLE_AXIS,
                       out_axes=(0, None))(per_particle)
    np.testing.assert_array_equal(kept, shared)
    # outside the vmap: the identity, differentiable
    assert match_particles(shared, per_particle[0]) is shared
    np.testing.assert_allclose(jax.grad(lambda s: (add_across_particles(s, per_particle[0]) ** 2).sum())(shared),
                               2 * (shared + per_particle[0]), rtol=1e-6)
    # below the size threshold, and on backends outside EXPLICIT_BROADCAST_BACKENDS, the
    # broadcast stays implicit
    monkeypatch.setattr(sams_jax.nn, "EXPLICIT_BROADCAST_BACKENDS", ())
    assert particle_sum in str(jax.make_jaxpr(jax.grad(ours))(shared))
    monkeypatch.setattr(sams_jax.nn, "EXPLICIT_BROADCAST_BACKENDS", (jax.default_backend(),))
    monkeypatch.setattr(sams_jax.nn, "EXPLICIT_BROADCAST_MIN_ELEMENTS", 5 * 12 + 1)
    assert particle_sum in str(jax.make_jaxpr(jax.grad(ours))(shared))


def test_model_loss_and_gradients_do_not_depend_on_match_particles(monkeypatch):
    """SAMS-VAE's loss and gradients (correlated guide: per-cell encoder input, mask and
    embedding encoder rows) equal those with the implicit broadcasts of plain vmap."""
    import sams_jax.nn
    from sams_jax.data import plate_scale, simulate

    monkeypatch.setattr(sams_jax.nn, "EXPLICIT_BROADCAST_MIN_ELEMENTS", 0)  # a small model: broadcast everything
    monkeypatch.setattr(sams_jax.nn, "EXPLICIT_BROADCAST_BACKENDS", (jax.default_backend(),))
    from sams_jax.models import SAMSVAE
    from sams_jax.objective import ObjectiveConfig, loss_fn

    data = simulate(n_latent=4, n_perturbations=6, n_genes=12, cells_per_perturbation=(8, 2, 2), seed=0)
    model = SAMSVAE(n_genes=12, n_perturbations=6, n_latent=4, guide="correlated", likelihood="normal",
                    decoder_n_hidden=8, basal_encoder_n_hidden=8, embedding_encoder_n_hidden=8,
                    embedding_encoder_n_layers=2)
    batch = {k: jnp.asarray(v) for k, v in data.arrays("train").items()}
    batch = {k: v[:16] for k, v in batch.items()}
    variables = model.init({"params": jax.random.key(0), "globals": jax.random.key(1), "local": jax.random.key(2)},
                           batch["x"], batch["dosages"], batch["library_size"])
    scale = jnp.asarray(plate_scale(data.cells_per_perturbation("train")))
    config = ObjectiveConfig(n_particles=3)
    run = lambda: jax.value_and_grad(lambda v: loss_fn(model.apply, config, v, jax.random.key(3), batch, scale))(
        variables)
    loss, grads = run()
    monkeypatch.setattr(sams_jax.nn, "PARTICLE_AXIS", "not-the-objective-axis")  # match_particles: identity
    plain_loss, plain_grads = run()
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_gamma_poisson_log_prob_matches_numpyro_and_scipy_with_gradients():
    """The cheaper closed form of the NB log-density (sams_jax.likelihoods.GammaPoisson)
    equals numpyro's, and scipy's where numpyro's form cancels (concentration >> mean)."""
    import numpyro.distributions as dist

    from sams_jax.likelihoods import GammaPoisson

    concentration = jnp.array([0.3, 1.0, 5.0, 50.0])
    mean = jnp.array([[0.01, 0.5, 3.0, 20.0], [2.0, 40.0, 0.2, 1.0]])
    x = jnp.array([[0.0, 1.0, 4.0, 30.0], [5.0, 0.0, 0.0, 2.0]])
    ours = lambda r, m: GammaPoisson(r, r / m).log_prob(x)
    theirs = lambda r, m: dist.GammaPoisson(r, r / m).log_prob(x)
    np.testing.assert_allclose(ours(concentration, mean), theirs(concentration, mean), rtol=1e-5, atol=1e-5)
    for arg in (0, 1):
        np.testing.assert_allclose(jax.grad(lambda r, m: ours(r, m).sum(), arg)(concentration, mean),
                                   jax.grad(lambda r, m: theirs(r, m).sum(), arg)(concentration, mean),
                                   rtol=1e-4, atol=1e-5)
    big = jnp.array([1e4, 3e4])
    small_mean = jnp.array([[0.02, 0.3]])
    counts = jnp.array([[0.0, 1.0]])
    expected = stats.nbinom(np.asarray(big, np.float64), np.asarray(big, np.float64)
                            / (np.asarray(big, np.float64) + np.asarray(small_mean, np.float64))).logpmf(counts)
    np.testing.assert_allclose(GammaPoisson(big, big / small_mean).log_prob(counts), expected, rtol=1e-5, atol=1e-5)


def test_library_nb_written_out_derivatives_equal_automatic_differentiation():
    """LibraryNB's log_prob (nb_mean_terms with hand-written derivatives) equals the
    composed GammaPoisson form in value and in every gradient, vmapped over particles as in
    the objective, with an unbatched library size, concentration and counts."""
    from sams_jax.likelihoods import NB_MEAN_FLOOR, GammaPoisson, LibraryNB

    rng = np.random.default_rng(0)
    particles, cells, genes = 3, 6, 7
    logits = jnp.asarray(rng.normal(size=(particles, cells, genes)) * 2, jnp.float32)
    log_library = jnp.asarray(np.log(rng.uniform(1.0, 5000.0, cells)), jnp.float32)
    log_theta = jnp.asarray(rng.normal(size=genes) * 2, jnp.float32)  # concentrations 0.02 .. 50
    x = jnp.asarray(rng.poisson(rng.uniform(0, 30, (cells, genes))), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(particles, cells, genes)), jnp.float32)

    def composed(logits, log_library, log_theta, x):
        mean = jnp.exp(log_library)[..., None] * jnp.exp(jax.nn.log_softmax(logits, axis=-1))
        r = jnp.exp(log_theta)
        return GammaPoisson(r, r / (mean + NB_MEAN_FLOOR)).log_prob(x)

    def written_out(logits, log_library, log_theta, x):
        return LibraryNB(logits, jnp.exp(log_library), log_theta).log_prob(x)

    def weighted(fn):
        def total(*args):
            values = jax.vmap(fn, in_axes=(0, None, None, None))(*args)
            return (values * cotangent).sum()
        return total

    args = (logits, log_library, log_theta, x)
    np.testing.assert_allclose(jax.vmap(written_out, in_axes=(0, None, None, None))(*args),
                               jax.vmap(composed, in_axes=(0, None, None, None))(*args), rtol=1e-5, atol=1e-4)
    ours = jax.grad(weighted(written_out), argnums=(0, 1, 2, 3))(*args)
    reference = jax.grad(weighted(composed), argnums=(0, 1, 2, 3))(*args)
    for name, got, expected in zip(("logits", "log_library", "log_theta", "x"), ours, reference):
        assert got.shape == expected.shape, name
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4 * float(jnp.abs(expected).max()),
                                   err_msg=name)
    returned = jax.jit(lambda *a: LibraryNB(*a))(logits[0], jnp.exp(log_library), log_theta)  # a pytree
    np.testing.assert_allclose(returned.log_prob(x), written_out(logits[0], log_library, log_theta, x), rtol=1e-6)
    dist_ = LibraryNB(logits[0], jnp.exp(log_library), log_theta)  # sampling and moments: the GammaPoisson's
    np.testing.assert_allclose(dist_.mean, jnp.exp(log_library)[:, None] * jax.nn.softmax(logits[0]) + NB_MEAN_FLOOR,
                               rtol=1e-5)


def test_normal_observation_samples_equal_numpyro():
    """The likelihood's Normal draws numpyro's numbers exactly (its faster normals equal
    jax.random.normal bit for bit)."""
    from sams_jax.likelihoods import Normal

    key = jax.random.key(4)
    loc, scale = jnp.linspace(-2.0, 2.0, 12).reshape(3, 4), jnp.full((3, 4), 0.7)
    np.testing.assert_array_equal(Normal(loc, scale).sample(key, (5,)), dist.Normal(loc, scale).sample(key, (5,)))


def test_normal_from_variance_has_numpyros_density_and_gradients():
    """The observation Normal made from its variance scores values as numpyro's Normal
    with ``scale = sqrt(variance)`` (scipy in float64 as the reference), with the same
    gradients; it keeps the support check (NaN -> -inf), and its ``variance`` and
    ``scale`` properties agree with the variance it was given."""
    from sams_jax.likelihoods import Normal

    loc = jnp.linspace(-3.0, 3.0, 20).reshape(4, 5)
    variance = jnp.exp(jnp.linspace(-9.0, 6.0, 20)).reshape(4, 5) + 1e-4
    value = jnp.linspace(-5.0, 8.0, 20).reshape(4, 5)[::-1]
    given = Normal.from_variance(loc, variance)
    expected = stats.norm(np.asarray(loc, np.float64), np.sqrt(np.asarray(variance, np.float64))).logpdf(value)
    np.testing.assert_allclose(given.log_prob(value), expected, rtol=2e-6, atol=2e-5)
    np.testing.assert_allclose(given.variance, variance, rtol=1e-6)
    np.testing.assert_allclose(given.scale, jnp.sqrt(variance), rtol=1e-6)

    def total(make, loc, variance):
        return make(loc, variance).log_prob(value).sum()

    ours = jax.grad(total, argnums=(1, 2))(Normal.from_variance, loc, variance)
    theirs = jax.grad(total, argnums=(1, 2))(lambda m, v: dist.Normal(m, jnp.sqrt(v)), loc, variance)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match="Out-of-support"):  # numpyro's own warning for a concrete NaN
        assert Normal.from_variance(loc, variance).log_prob(value.at[0, 0].set(jnp.nan))[0, 0] == -jnp.inf


def test_special_functions_match_scipy_over_the_whole_range():
    """sams_jax.special's log_beta (one log-gamma and Stirling differences), lgamma and
    digamma of positive arguments equal scipy's (float64) to float32 precision, on both
    sides of their switch at 8, for tiny, equal and very unequal arguments, as does the NB
    coefficient built on log_beta over counts 0-20,000 and concentrations 1e-3-1e5."""
    from scipy import special

    from sams_jax.likelihoods import log_nb_coefficient
    from sams_jax.special import digamma_positive, lgamma_positive, log_beta

    rng = np.random.default_rng(0)
    a = np.exp(rng.uniform(-8, 12, 20_000)).astype(np.float32)
    b = np.exp(rng.uniform(-8, 12, 20_000)).astype(np.float32)
    edges = np.array([[1e-3, 7.999], [1e-3, 8.0], [7.999, 8.0], [8.0, 8.0], [0.5, 1e5], [3.0, 3.0], [1.0, 1.0]],
                     np.float32)
    a, b = np.concatenate([a, edges[:, 0], edges[:, 1]]), np.concatenate([b, edges[:, 1], edges[:, 0]])
    expected = special.betaln(a.astype(np.float64), b.astype(np.float64))
    got = np.asarray(jax.jit(log_beta)(a, b), np.float64)
    np.testing.assert_array_less(np.abs(got - expected) / np.maximum(1.0, np.abs(expected)), 4e-6)
    z = np.exp(rng.uniform(-9, 12, 20_000)).astype(np.float32)
    lgamma = special.gammaln(z.astype(np.float64))
    np.testing.assert_array_less(np.abs(np.asarray(lgamma_positive(z), np.float64) - lgamma)
                                 / np.maximum(1.0, np.abs(lgamma)), 4e-6)
    z = np.concatenate([z, np.float32([7.999, 8.0, 1.0, 1e-4])])
    psi = special.digamma(z.astype(np.float64))
    np.testing.assert_array_less(np.abs(np.asarray(digamma_positive(z), np.float64) - psi)
                                 / np.maximum(1.0, np.abs(psi)), 2e-6)
    counts = np.floor(np.exp(rng.uniform(0, 10, 20_000)) - 1).astype(np.float32)
    concentration = np.exp(rng.uniform(-7, 11.5, 20_000)).astype(np.float32)
    r64, x64 = concentration.astype(np.float64), counts.astype(np.float64)
    expected = special.gammaln(r64 + x64) - special.gammaln(r64) - special.gammaln(x64 + 1)
    got = np.asarray(log_nb_coefficient(concentration, counts), np.float64)
    np.testing.assert_array_less(np.abs(got - expected) / np.maximum(1.0, np.abs(expected)), 5e-6)


def test_log_nb_coefficient_values_and_derivatives_match_closed_forms():
    """log_nb_coefficient(r, x) = log G(r+x) - log G(r) - log G(x+1), with its hand-written
    derivatives d/dr = digamma(r+x) - digamma(r) and d/dx = digamma(r+x) - digamma(x+1)
    (scipy, float64), also for a per-gene r broadcast against [cells, genes] counts."""
    from scipy import special

    from sams_jax.likelihoods import log_nb_coefficient

    r = np.array([0.05, 0.3, 1.0, 7.5, 60.0, 2e4])
    x = np.array([[0.0, 1.0, 3.0, 0.0, 250.0, 2.0], [12.0, 0.0, 1.0, 40.0, 0.0, 0.0]])
    r64, x64 = np.broadcast_arrays(r.astype(np.float64), x.astype(np.float64))
    expected = special.gammaln(r64 + x64) - special.gammaln(r64) - special.gammaln(x64 + 1)
    np.testing.assert_allclose(log_nb_coefficient(jnp.asarray(r, jnp.float32), jnp.asarray(x, jnp.float32)),
                               expected, rtol=1e-5, atol=2e-5)
    d_r = jax.grad(lambda r_: log_nb_coefficient(r_, jnp.asarray(x, jnp.float32)).sum())(jnp.asarray(r, jnp.float32))
    np.testing.assert_allclose(d_r, (special.digamma(r64 + x64) - special.digamma(r64)).sum(0), rtol=1e-4, atol=1e-5)
    d_x = jax.grad(lambda x_: log_nb_coefficient(jnp.asarray(r, jnp.float32), x_).sum())(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(d_x, special.digamma(r64 + x64) - special.digamma(x64 + 1), rtol=1e-4, atol=1e-5)
    per_particle = jax.vmap(jax.grad(lambda r_, s: (s * log_nb_coefficient(r_, jnp.asarray(x, jnp.float32))).sum()),
                            in_axes=(None, 0))(jnp.asarray(r, jnp.float32), jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(per_particle[1], 2 * per_particle[0], rtol=1e-6)
