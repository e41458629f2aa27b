"""Norman et al. 2019, data efficiency (SPEC 6, 7; the paper's data-efficiency table).

    python experiments/norman_data_efficiency/run.py --data norman.h5ad [--workers N] [--out DIR]
    python experiments/norman_data_efficiency/run.py --smoke   # synthetic Norman-like file, minutes on a CPU

Grid: SAMS-VAE (correlated), CPA-VAE, conditional VAE, SVAE+ (pairs as unique
perturbations) x split seeds 0-4 x ``frac_combination_cells_train`` 0 / 0.25 / 0.5 / 0.75 / 1
(100 runs of 30,000 steps). Every pair is seen in training; the fraction sub-samples the
training cells of pairs. Metrics on the test split (pair cells): test IWELBO, relative
IWELBO (minus SAMS-VAE correlated at fraction 0 on the same split seed), ATE Pearson.
"""

import functools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from experiments import norman, runner  # noqa: E402

make_grid = functools.partial(norman.make_grid, "norman_data_efficiency", "norman_data_efficiency",
                              "data.frac_combination_cells_train")


def main(argv=None) -> int:
    return runner.main("norman_data_efficiency", make_grid, __doc__.split("\n\n")[0], data_help=norman.DATA_HELP,
                       argv=argv, add_arguments=norman.add_layers)


if __name__ == "__main__":
    sys.exit(main())
