"""SAMS-VAE with a Beta(1, 2) prior on the mask probabilities (SPEC 4) on the paper's
default simulation, with the settings of ``configs/simulation.py``.

    python -m sams_jax.train --config configs/sams_vae_beta_bernoulli_simulation.py \\
        --workdir runs/sams_vae_beta_bernoulli_simulation
"""

import pathlib
import runpy


def get_config():
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("simulation.py")))["get_config"]()
    config.model.update(name="sams_vae_beta_bernoulli", mask_beta_a=1.0, mask_beta_b=2.0)
    return config
