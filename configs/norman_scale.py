"""SAMS-VAE on a simulated screen the size of the paper's Norman data (no download).

    python -m sams_jax.train --config configs/norman_scale.py --workdir runs/norman_scale

105 perturbations x 500 cells (320 train / 80 val / 100 test) x 5,000 genes of simulated
counts (library-size negative binomial, 10 true latent dimensions), trained with the
paper's Norman settings (SPEC 7; ``configs/norman_ood.py`` holds them for the real file):
K = 200, encoder and decoder 1 x 400, correlated guide with a 4 x 400 embedding encoder,
lr 3e-4, batch 512, 5 particles, 30,000 steps, gradient clipping at 100.
``benchmarks/train_throughput.py --config norman_scale`` times this configuration.
"""

from sams_jax.config import base_config


def get_config():
    config = base_config()
    config.data.update(observation="library_nb", n_latent=10, n_perturbations=105, n_genes=5_000,
                       cells_per_perturbation=(320, 80, 100))
    config.model.update(n_latent=200, likelihood="library_nb", guide="correlated", normalization="log_standardize",
                        decoder_n_layers=1, decoder_n_hidden=400, basal_encoder_n_layers=1,
                        basal_encoder_n_hidden=400, embedding_encoder_n_layers=4, embedding_encoder_n_hidden=400)
    config.train.update(learning_rate=3e-4, batch_size=512, max_steps=30_000, grad_clip_norm=100.0, eval_every=1_000,
                        steps_per_dispatch=50)
    return config
