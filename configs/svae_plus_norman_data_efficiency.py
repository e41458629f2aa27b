"""SVAE+ (Lopez et al. 2022; Beta(1, 2) mask probabilities; SPEC 4) on Norman et al. 2019,
data efficiency: the data, split and training settings of
``configs/norman_data_efficiency.py`` (SPEC 7), except that SVAE+ accepts one-hot
perturbations only, so every pair is encoded as a perturbation of its own
(``encode_combinations="unique"``).

    python -m sams_jax.train --config configs/svae_plus_norman_data_efficiency.py \\
        --workdir runs/svae_plus_norman_data_efficiency \\
        --config.data.path=/path/to/norman.h5ad --config.data.frac_combination_cells_train=0.5 \\
        --config.data.split_seed=0
"""

import pathlib
import runpy


def get_config():
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("norman_data_efficiency.py")))["get_config"]()
    config.data.encode_combinations = "unique"
    config.model.update(name="svae_plus", mask_beta_a=1.0, mask_beta_b=2.0)
    return config
