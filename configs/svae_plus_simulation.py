"""SVAE+ (Lopez et al. 2022; Beta(1, 2) mask probabilities, learned prior means; SPEC 4)
on the paper's default simulation (one-hot perturbations), with the settings of
``configs/simulation.py``.

    python -m sams_jax.train --config configs/svae_plus_simulation.py --workdir runs/svae_plus_simulation
"""

import pathlib
import runpy


def get_config():
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("simulation.py")))["get_config"]()
    config.model.update(name="svae_plus", mask_beta_a=1.0, mask_beta_b=2.0)
    return config
