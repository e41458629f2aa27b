"""SAMS-VAE on Norman et al. 2019, data efficiency (SPEC 6 and 7).

    python -m sams_jax.train --config configs/norman_data_efficiency.py --workdir runs/norman_eff_f05_s0 \
        --config.data.path=/path/to/norman.h5ad \
        --config.data.frac_combination_cells_train=0.5 --config.data.split_seed=0

The file is the curated Norman file of the sc-pert collection
(https://ndownloader.figshare.com/files/34027562): raw counts in ``layers["counts"]``,
the ``var["highly_variable"]`` genes, one 0/1 ``guide_*`` obs column per targeted gene,
``guide_identity`` naming the condition. All pairs are seen: the pair cells are split
80/20 train+val / test, then 80/20 train / val, by ``split_seed``, and only the first
``frac_combination_cells_train`` of the training pair cells are kept; controls and singles
go 80/20 to train / val. Model (SPEC 7): K = 200, encoder and decoder 1 x 400, embedding
encoder 4 x 400, mask prior 0.01, lr 3e-4, batch 512, 30,000 steps, gradient clipping at
100, 5 particles; five split seeds per setting.
"""

import pathlib
import runpy

from sams_jax.config import base_config


def get_config():
    """The data, model and training settings of ``configs/norman_ood.py``; only the task differs."""
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("norman_ood.py")))["get_config"]()
    defaults = base_config().data
    config.data.update(task="norman_data_efficiency", frac_combination_cells_train=0.5,
                       frac_combinations_train=defaults.frac_combinations_train,
                       frac_combinations_test=defaults.frac_combinations_test)
    return config
