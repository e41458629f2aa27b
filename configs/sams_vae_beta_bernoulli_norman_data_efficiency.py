"""SAMS-VAE with a Beta(1, 2) prior on the mask probabilities (SPEC 4) on Norman et al.
2019, data efficiency: the data, split and training settings of
``configs/norman_data_efficiency.py`` (SPEC 7).

    python -m sams_jax.train --config configs/sams_vae_beta_bernoulli_norman_data_efficiency.py \\
        --workdir runs/sams_vae_beta_bernoulli_norman_data_efficiency \\
        --config.data.path=/path/to/norman.h5ad --config.data.frac_combination_cells_train=0.5 --config.data.split_seed=0
"""

import pathlib
import runpy


def get_config():
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("norman_data_efficiency.py")))["get_config"]()
    config.model.update(name="sams_vae_beta_bernoulli", mask_beta_a=1.0, mask_beta_b=2.0)
    return config
