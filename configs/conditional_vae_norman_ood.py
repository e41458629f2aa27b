"""Conditional VAE (decoder on ``[z, D]``, encoder on ``[x, D]``; SPEC 4) on Norman et al.
2019, out-of-distribution combinations: the data, split and training settings of
``configs/norman_ood.py`` (SPEC 7). A pair is the sum of its two one-hot rows, so
the decoder sees a two-hot input for it.

    python -m sams_jax.train --config configs/conditional_vae_norman_ood.py \\
        --workdir runs/conditional_vae_norman_ood \\
        --config.data.path=/path/to/norman.h5ad --config.data.frac_combinations_train=0.75 --config.data.split_seed=0
"""

import pathlib
import runpy


def get_config():
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("norman_ood.py")))["get_config"]()
    config.model.name = "conditional_vae"
    return config
