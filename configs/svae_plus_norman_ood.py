"""SVAE+ (Lopez et al. 2022; Beta(1, 2) mask probabilities; SPEC 4) on Norman et al. 2019,
out-of-distribution combinations: the data, split and training settings of
``configs/norman_ood.py`` (SPEC 7), except that SVAE+ accepts one-hot perturbations only,
so every pair is encoded as a perturbation of its own (``encode_combinations="unique"``).

A test pair then is a perturbation without training cells: its mask probabilities and
prior mean keep their initial values, so SVAE+ has no way to predict it (it is the
no-transfer reference here); use ``configs/svae_plus_norman_data_efficiency.py``, where
every pair is seen in training (at a fraction of pair cells above 0), to compare it on pairs.

    python -m sams_jax.train --config configs/svae_plus_norman_ood.py --workdir runs/svae_plus_norman_ood \\
        --config.data.path=/path/to/norman.h5ad --config.data.frac_combinations_train=0.75 \\
        --config.data.split_seed=0
"""

import pathlib
import runpy


def get_config():
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("norman_ood.py")))["get_config"]()
    config.data.encode_combinations = "unique"
    config.model.update(name="svae_plus", mask_beta_a=1.0, mask_beta_b=2.0)
    return config
