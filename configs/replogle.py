"""SAMS-VAE on the filtered Replogle et al. 2022 genome-wide K562 screen (SPEC 6 and 7).

    python -m sams_jax.data.prepare_replogle K562_gwps_raw_singlecell_01.h5ad replogle.h5ad
    python -m sams_jax.train --config configs/replogle.py --workdir runs/replogle_s0 \
        --config.data.path=replogle.h5ad --config.seed=0

``prepare_replogle`` rebuilds the paper's 118,641 cells x 1,187 genes (counts in X) from
the public raw file (https://plus.figshare.com/ndownloader/files/35775507). Each guide pair
(``obs["sgID_AB"]``) is one perturbation (722 columns; no delimiter: the labels contain
'+' and '|' as part of their names); every pair containing ``non-targeting`` is merged
into the all-zero control. Random 80/20 train+val / test, then 80/20 train / val
(``split_seed``). Model (SPEC 7): K = 100 (200 also run), encoder and decoder 1 x 400,
embedding encoder 2 x 200, mask prior 0.01 (0.1 and 0.001 also run), lr 3e-4,
batch 512, 150,000 steps, 5 particles; five seeds.
"""

from sams_jax.config import base_config


def get_config():
    config = base_config()
    config.data.update(
        source="anndata", perturbation_key="sgID_AB", control="non-targeting", control_match="contains",
        delimiter="", counts_layer="", task="replogle", split_seed=0,
        gene_symbols_key="gene_name",  # var_names are Ensembl IDs; prepare_replogle keeps the symbols here
    )
    config.model.update(n_latent=100, likelihood="library_nb")  # otherwise the defaults of base_config
    config.train.update(learning_rate=3e-4, batch_size=512, max_steps=150_000, eval_every=5_000)
    return config
