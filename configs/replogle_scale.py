"""SAMS-VAE on a simulated screen the size of the paper's Replogle data (no download).

    python -m sams_jax.train --config configs/replogle_scale.py --workdir runs/replogle_scale

118,494 cells (681 perturbations x 174 cells: 111 train / 28 val / 35 test; the real file: 118,641) x 1,187 genes
of simulated counts (library-size negative binomial, 10 true latent dimensions), trained
with the paper's Replogle settings (SPEC 7; ``configs/replogle.py`` holds them for the real
file): K = 100, encoder and decoder 1 x 400, correlated guide with a 2 x 200 embedding
encoder, mask prior 0.01, lr 3e-4, batch 512, 5 particles, 150,000 steps. This is the
configuration that ``benchmarks/train_throughput.py --config replogle_scale`` times; here it
runs the whole schedule, with validation and a checkpoint every 5,000 steps.
"""

from sams_jax.config import base_config


def get_config():
    config = base_config()
    config.data.update(observation="library_nb", n_latent=10, n_perturbations=681, n_genes=1_187,
                       cells_per_perturbation=(111, 28, 35))
    config.model.update(n_latent=100, likelihood="library_nb", guide="correlated", normalization="log_standardize",
                        decoder_n_layers=1, decoder_n_hidden=400, basal_encoder_n_layers=1,
                        basal_encoder_n_hidden=400, embedding_encoder_n_layers=2, embedding_encoder_n_hidden=200)
    config.train.update(learning_rate=3e-4, batch_size=512, max_steps=150_000, eval_every=5_000,
                        steps_per_dispatch=50)
    return config
