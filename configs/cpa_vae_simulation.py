"""CPA-VAE (SAMS-VAE without the mask, mean-field q(embedding); SPEC 4) on the paper's
default simulation, with the settings of ``configs/simulation.py``.

    python -m sams_jax.train --config configs/cpa_vae_simulation.py --workdir runs/cpa_vae_simulation
"""

import pathlib
import runpy


def get_config():
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("simulation.py")))["get_config"]()
    config.model.update(name="cpa_vae", guide="mean_field")
    return config
