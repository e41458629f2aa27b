"""Conditional VAE (decoder on ``[z, D]``, encoder on ``[x, D]``; SPEC 4) on the paper's
default simulation, with the settings of ``configs/simulation.py``.

    python -m sams_jax.train --config configs/conditional_vae_simulation.py --workdir runs/conditional_vae_simulation
"""

import pathlib
import runpy


def get_config():
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("simulation.py")))["get_config"]()
    config.model.name = "conditional_vae"
    return config
