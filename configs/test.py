"""A tiny configuration for tests and smoke runs (seconds on a CPU).

    python -m sams_jax.train --config configs/test.py --workdir /tmp/sams_test
"""

from sams_jax.config import base_config


def get_config():
    config = base_config()
    config.data.update(n_latent=3, n_perturbations=6, n_genes=12, mask_prob=0.3,
                       cells_per_perturbation=(40, 10, 10))
    config.model.update(
        n_latent=3, likelihood="normal", normalization="standardize",
        decoder_n_layers=1, decoder_n_hidden=8,
        basal_encoder_n_layers=1, basal_encoder_n_hidden=8,
        embedding_encoder_n_layers=2, embedding_encoder_n_hidden=8,
        mask_prior_prob=0.3,
    )
    config.objective.n_particles = 2
    config.train.update(learning_rate=1e-3, batch_size=32, max_steps=40, eval_every=20, steps_per_dispatch=10,
                        eval_batch_size=64, progress=False)
    config.eval.iwelbo_n_particles = 4
    return config
