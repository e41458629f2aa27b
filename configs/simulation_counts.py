"""SAMS-VAE on the count-valued simulation: library-size negative-binomial observations,
the scRNA-seq path (``library_nb`` likelihood, ``log_standardize`` encoder input) end to
end without downloads.

    python -m sams_jax.train --config configs/simulation_counts.py --workdir runs/simulation_counts
"""

from sams_jax.config import base_config


def get_config():
    config = base_config()
    config.data.observation = "library_nb"
    config.model.update(
        n_latent=15,
        likelihood="library_nb",
        guide="correlated",
        normalization="log_standardize",
        decoder_n_layers=1,
        decoder_n_hidden=50,
        basal_encoder_n_layers=1,
        basal_encoder_n_hidden=50,
        embedding_encoder_n_layers=2,
        embedding_encoder_n_hidden=50,
        mask_prior_prob=2 / 15,
    )
    config.train.update(learning_rate=1e-3, batch_size=128, max_steps=20_000, eval_every=1_000)
    return config
