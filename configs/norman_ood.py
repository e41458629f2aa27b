"""SAMS-VAE on Norman et al. 2019, out-of-distribution combinations (SPEC 6 and 7).

    python -m sams_jax.train --config configs/norman_ood.py --workdir runs/norman_ood_f075_s0 \
        --config.data.path=/path/to/norman.h5ad \
        --config.data.frac_combinations_train=0.75 --config.data.split_seed=0

The file is the curated Norman file of the sc-pert collection
(https://ndownloader.figshare.com/files/34027562): raw counts in ``layers["counts"]``,
the ``var["highly_variable"]`` genes, one 0/1 ``guide_*`` obs column per targeted gene,
``guide_identity`` naming the condition. The unique pairs are shuffled with
``split_seed``; the last 25% are test pairs, the first ``frac_combinations_train``
(paper: 0, 0.25, 0.5, 0.75, 1) are training pairs. Model (SPEC 7): K = 200, encoder and
decoder 1 x 400, embedding encoder 4 x 400, mask prior 0.01, lr 3e-4, batch 512,
30,000 steps, gradient clipping at 100, 5 particles; five split seeds per setting.
"""

from sams_jax.config import base_config


def get_config():
    config = base_config()
    config.data.update(
        source="anndata", perturbation_key="guide_identity", guide_column_pattern="guide_", control="control",
        counts_layer="counts", use_highly_variable=True, encode_combinations="additive",
        task="norman_ood", frac_combinations_train=0.75, frac_combinations_test=0.25, split_seed=0,
    )
    config.model.update(n_latent=200, likelihood="library_nb", embedding_encoder_n_layers=4,
                        embedding_encoder_n_hidden=400)  # otherwise the defaults of base_config
    config.train.update(learning_rate=3e-4, batch_size=512, max_steps=30_000, grad_clip_norm=100.0,
                        eval_every=1_000)
    return config
