"""CPA-VAE (SAMS-VAE without the mask, mean-field q(embedding); SPEC 4) on Norman et al.
2019, out-of-distribution combinations: the data, split and training settings of
``configs/norman_ood.py`` (SPEC 7).

    python -m sams_jax.train --config configs/cpa_vae_norman_ood.py --workdir runs/cpa_vae_norman_ood \\
        --config.data.path=/path/to/norman.h5ad --config.data.frac_combinations_train=0.75 --config.data.split_seed=0
"""

import pathlib
import runpy


def get_config():
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("norman_ood.py")))["get_config"]()
    config.model.update(name="cpa_vae", guide="mean_field")
    return config
