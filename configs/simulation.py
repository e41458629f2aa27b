"""SAMS-VAE on the paper's default simulation (SPEC 6), the embedded default job.

    python -m sams_jax.train --config configs/simulation.py --workdir runs/simulation

K = 15, T = 100, G = 100, 500 / 100 / 100 cells per perturbation, seed 0; correlated
guide, normal likelihood, decoder 1 x 50, basal encoder 1 x 50 with ``standardize``,
embedding encoder 2 x 50, mask prior 2/15, lr 1e-3, batch 128, 5 particles, 20,000 steps:
the settings the authors' code was measured with.
"""

from sams_jax.config import base_config


def get_config():
    config = base_config()
    config.model.update(
        n_latent=15,
        likelihood="normal",
        guide="correlated",
        normalization="standardize",
        decoder_n_layers=1,
        decoder_n_hidden=50,
        basal_encoder_n_layers=1,
        basal_encoder_n_hidden=50,
        embedding_encoder_n_layers=2,
        embedding_encoder_n_hidden=50,
        mask_prior_prob=2 / 15,
        embedding_prior_scale=1.0,
    )
    config.train.update(learning_rate=1e-3, batch_size=128, max_steps=20_000, eval_every=1_000)
    return config
