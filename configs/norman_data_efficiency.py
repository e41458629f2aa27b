"""SAMS-VAE on Norman et al. 2019, data efficiency (SPEC 6 and 7).

    python -m sams_jax.train --config configs/norman_data_efficiency.py --workdir runs/norman_eff_f05_s0 \
        --config.data.path=/path/to/norman.h5ad \
        --config.data.frac_combination_cells_train=0.5 --config.data.split_seed=0

The file is the curated Norman file of the sc-pert collection
(https://ndownloader.figshare.com/files/34027562): raw counts in ``layers["counts"]``,
the ``var["highly_variable"]`` genes, one 0/1 ``guide_*`` obs column per targeted gene,
``guide_identity`` naming the condition. All pairs are seen: the pair cells are split
80/20 train+val / test, then 80/20 train / val, by ``split_seed``, and only the first
``frac_combination_cells_train`` of the training pair cells are kept; controls and singles
go 80/20 to train / val. Model (SPEC 7): K = 200, encoder and decoder 1 x 400, embedding
encoder 4 x 400, mask prior 0.01, lr 3e-4, batch 512, 30,000 steps, gradient clipping at
100, 5 particles; five split seeds per setting.
"""

from sams_jax.config import base_config


def get_config():
    config = base_config()
    config.data.update(
        source="anndata", perturbation_key="guide_identity", guide_column_pattern="guide_", control="control",
        counts_layer="counts", use_highly_variable=True, encode_combinations="additive",
        task="norman_data_efficiency", frac_combination_cells_train=0.5, split_seed=0,
    )
    config.model.update(
        n_latent=200,
        likelihood="library_nb",
        guide="correlated",
        normalization="log_standardize",
        decoder_n_layers=1,
        decoder_n_hidden=400,
        basal_encoder_n_layers=1,
        basal_encoder_n_hidden=400,
        embedding_encoder_n_layers=4,
        embedding_encoder_n_hidden=400,
        mask_prior_prob=0.01,
    )
    config.objective.n_particles = 5
    config.train.update(learning_rate=3e-4, batch_size=512, max_steps=30_000, grad_clip_norm=100.0,
                        eval_every=1_000)
    return config
