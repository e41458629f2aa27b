"""SAMS-VAE with a Beta(1, 2) prior on the mask probabilities (SPEC 4) on Norman et al.
2019, out-of-distribution combinations: the data, split and training settings of
``configs/norman_ood.py`` (SPEC 7).

    python -m sams_jax.train --config configs/sams_vae_beta_bernoulli_norman_ood.py \\
        --workdir runs/sams_vae_beta_bernoulli_norman_ood \\
        --config.data.path=/path/to/norman.h5ad --config.data.frac_combinations_train=0.75 --config.data.split_seed=0
"""

import pathlib
import runpy


def get_config():
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("norman_ood.py")))["get_config"]()
    config.model.update(name="sams_vae_beta_bernoulli", mask_beta_a=1.0, mask_beta_b=2.0)
    return config
