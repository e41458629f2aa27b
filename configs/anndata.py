"""SAMS-VAE on your own perturbation screen (an AnnData .h5ad file).

    python -m sams_jax.train --config configs/anndata.py --workdir runs/my_screen \
        --config.data.path=/path/to/screen.h5ad \
        --config.data.perturbation_key=perturbation --config.data.control=control

Raw counts in ``layers["counts"]`` (``--config.data.counts_layer=''`` for X), pairs written
``A+B``, a random 64/16/20 split unless ``--config.data.split_key=split`` names an obs
column of train / val / test. Model: K = 100, encoder and decoder 1 x 400, embedding
encoder 2 x 200, mask prior 0.01, ``library_nb`` likelihood with ``log_standardize``
encoder input, lr 3e-4, batch 512, 5 particles, 20,000 steps.
"""

from sams_jax.config import base_config


def get_config():
    config = base_config()
    config.data.update(source="anndata", perturbation_key="perturbation", control="control", delimiter="+",
                       counts_layer="counts", task="none")
    config.model.update(n_latent=100, likelihood="library_nb")  # otherwise the defaults of base_config
    config.train.update(learning_rate=3e-4, batch_size=512, max_steps=20_000, eval_every=1_000)
    return config
