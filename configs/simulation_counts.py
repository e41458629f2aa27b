"""SAMS-VAE on the count-valued simulation: library-size negative-binomial observations,
the scRNA-seq path (``library_nb`` likelihood, ``log_standardize`` encoder input) end to
end without downloads.

    python -m sams_jax.train --config configs/simulation_counts.py --workdir runs/simulation_counts
"""

import pathlib
import runpy


def get_config():
    """``configs/simulation.py`` with count observations and the scRNA-seq likelihood."""
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("simulation.py")))["get_config"]()
    config.data.observation = "library_nb"
    config.model.update(likelihood="library_nb", normalization="log_standardize")
    return config
