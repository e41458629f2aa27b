"""The paper's simulation (SPEC 6), seeded, with its ground truth.

Every cell receives exactly one of ``T`` perturbations (one-hot dosages). Perturbation
``t`` shifts the latent state by ``mask[t] * embeddings[t]``:

* ``mask[t, k] ~ Bernoulli(mask_prob)`` (default 2/15),
* ``embeddings[t, k] = sign * magnitude``, ``magnitude ~ N(5, 0.5)``, random sign,
* ``z_basal[i] ~ N(0, I_K)``, ``z[i] = z_basal[i] + D[i] @ (mask * embeddings)``.

A random decoder (``decoder_n_layers`` bias-free layers of width ``decoder_n_hidden``
with orthogonal weights and LeakyReLU(0.2), then a linear map to ``G`` genes) maps ``z``
to a signal; each gene is divided by its standard deviation over cells and optionally
exponentiated. Observations:

* ``observation="normal"`` (the paper's): signal plus Normal noise whose per-gene
  variance is ``noise_fraction`` (20%) of the total variance;
* ``observation="library_nb"`` (counts, for the scRNA-seq path): ``rho =
  softmax(gene_baseline + signal)``, library size ``l ~ LogNormal(log(library_size_mean),
  library_size_sd)``, counts ``~ NB(mean = l * rho, concentration = nb_concentration)``.

Perturbation ``"0"`` is the reference for ATEs (no cell is unperturbed).
"""

from __future__ import annotations

import numpy as np

from sams_jax.data.dataset import PerturbationData, SPLITS

OBSERVATIONS = ("normal", "library_nb")


def _orthogonal(rng: np.random.Generator, n_in: int, n_out: int) -> np.ndarray:
    a = rng.standard_normal((max(n_in, n_out), min(n_in, n_out)))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))
    return q if n_in >= n_out else q.T  # [n_in, n_out] with orthonormal rows or columns


def _leaky_relu(x, slope=0.2):
    return np.where(x > 0, x, slope * x)


def simulate(
    n_latent: int = 15,
    n_perturbations: int = 100,
    n_genes: int = 100,
    mask_prob: float = 2 / 15,
    embedding_mean: float = 5.0,
    embedding_sd: float = 0.5,
    decoder_n_layers: int = 4,
    decoder_n_hidden: int = 50,
    exponentiate: bool = False,
    noise_fraction: float = 0.2,
    cells_per_perturbation: tuple[int, int, int] = (500, 100, 100),
    observation: str = "normal",
    library_size_mean: float = 5000.0,
    library_size_sd: float = 0.2,
    nb_concentration: float = 10.0,
    seed: int = 0,
) -> PerturbationData:
    """Simulate a screen; returns :class:`PerturbationData` whose ``truth`` holds
    ``mask`` ``[T, K]``, ``embeddings`` ``[T, K]``, ``z_basal`` ``[n, K]`` and ``z``."""
    if observation not in OBSERVATIONS:
        raise ValueError(f"unknown observation {observation!r}; allowed: {OBSERVATIONS}")
    if not 0.0 <= noise_fraction < 1.0:
        raise ValueError(f"noise_fraction must be in [0, 1), got {noise_fraction}")
    rng = np.random.default_rng(seed)
    k, t, g = n_latent, n_perturbations, n_genes

    mask = (rng.random((t, k)) < mask_prob).astype(np.float32)
    sign = rng.choice(np.array([-1.0, 1.0]), size=(t, k))
    embeddings = (sign * rng.normal(embedding_mean, embedding_sd, size=(t, k))).astype(np.float32)

    per_split = dict(zip(SPLITS, cells_per_perturbation))
    labels = np.concatenate([np.repeat(np.arange(t), per_split[s]) for s in SPLITS])
    split = np.concatenate([np.full(t * per_split[s], s) for s in SPLITS])
    n = labels.shape[0]
    dosages = np.zeros((n, t), np.float32)
    dosages[np.arange(n), labels] = 1.0

    z_basal = rng.standard_normal((n, k)).astype(np.float32)
    z = z_basal + dosages @ (mask * embeddings)

    widths = [k] + [decoder_n_hidden] * decoder_n_layers + [g]
    h = z.astype(np.float64)
    for layer, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        h = h @ _orthogonal(rng, n_in, n_out)
        if layer < len(widths) - 2:
            h = _leaky_relu(h)
    signal = h / h.std(axis=0, keepdims=True)
    if exponentiate:
        signal = np.exp(signal)

    if observation == "normal":
        noise_var = signal.var(axis=0) * noise_fraction / (1.0 - noise_fraction)
        x = signal + rng.standard_normal(signal.shape) * np.sqrt(noise_var)
    else:
        logits = rng.standard_normal(g) + signal
        rho = np.exp(logits - logits.max(axis=1, keepdims=True))
        rho /= rho.sum(axis=1, keepdims=True)
        library = rng.lognormal(np.log(library_size_mean), library_size_sd, size=n)
        mean = library[:, None] * rho
        x = rng.poisson(rng.gamma(nb_concentration, mean / nb_concentration)).astype(np.float64)
    x = x.astype(np.float32)

    return PerturbationData(
        x=x,
        dosages=dosages,
        split=split,
        feature_names=[f"gene_{j}" for j in range(g)],
        perturbation_names=[str(j) for j in range(t)],
        library_size=x.sum(axis=1).astype(np.float32),
        control="0",
        truth={"mask": mask, "embeddings": embeddings, "z_basal": z_basal, "z": z.astype(np.float32)},
        name=f"simulation_{observation}",
    )
