"""Conditional VAE (decoder on ``[z, D]``, encoder on ``[x, D]``; SPEC 4) on Norman et al.
2019, data efficiency: the data, split and training settings of
``configs/norman_data_efficiency.py`` (SPEC 7). A pair is the sum of its two one-hot rows, so
the decoder sees a two-hot input for it.

    python -m sams_jax.train --config configs/conditional_vae_norman_data_efficiency.py \\
        --workdir runs/conditional_vae_norman_data_efficiency \\
        --config.data.path=/path/to/norman.h5ad --config.data.frac_combination_cells_train=0.5 --config.data.split_seed=0
"""

import pathlib
import runpy


def get_config():
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("norman_data_efficiency.py")))["get_config"]()
    config.model.name = "conditional_vae"
    return config
