"""Train / val / test splits of the paper's tasks (SPEC 6), as split labels per cell.

Every function returns a ``[n_cells]`` array of ``"train"``, ``"val"``, ``"test"`` or
:data:`NO_SPLIT` (``""``: the cell belongs to no split of the task: no training or scoring
uses it; registration keeps it for the data ATEs, which average all cells of an intervention).

The random splits reproduce ``sklearn.model_selection.train_test_split(...,
random_state=seed)`` of the authors' code exactly (see :func:`shuffle_split`), so the same
``split_seed`` selects the same cells as their code on the same file, without depending on
scikit-learn.
"""

from __future__ import annotations

import math

import numpy as np

TASKS = ("none", "norman_ood", "norman_data_efficiency", "replogle")
NO_SPLIT = ""  # the split label of a cell in no split; registration keeps such cells, for the data ATEs only


def shuffle_split(n: int, seed: int, *, test_size: float | None = None,
                  train_size: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` positions in ``range(n)``, in shuffled order, exactly as
    ``train_test_split(np.arange(n), test_size=..., train_size=..., random_state=seed)``:
    ``n_test = ceil(test_size * n)`` or ``n_train = floor(train_size * n)`` (the other is
    the rest); one ``RandomState(seed).permutation(n)``, test first, then train."""
    if (test_size is None) == (train_size is None):
        raise ValueError("give exactly one of test_size and train_size")
    if test_size is not None:
        n_test = math.ceil(test_size * n)
        n_train = n - n_test
    else:
        n_train = math.floor(train_size * n)
        n_test = n - n_train
    permutation = np.random.RandomState(seed).permutation(n)
    return permutation[n_test:n_test + n_train], permutation[:n_test]


def random_split(n_cells: int, seed: int) -> np.ndarray:  # [n_cells] str
    """64 / 16 / 20: 80 / 20 train+val / test, then 80 / 20 train / val (the Replogle task
    of the authors' code, and the default for a file without a split column)."""
    labels = np.full(n_cells, NO_SPLIT, dtype=object)
    train_val, test = shuffle_split(n_cells, seed, train_size=0.8)
    train, val = shuffle_split(len(train_val), seed, train_size=0.8)
    labels[train_val[train]] = "train"
    labels[train_val[val]] = "val"
    labels[test] = "test"
    return labels


def combination_cells(n_members: np.ndarray) -> np.ndarray:  # [n_cells] bool
    """Cells that received a combination (two or more perturbations)."""
    return np.asarray(n_members) >= 2


def split_combinations(conditions: np.ndarray, n_members: np.ndarray, frac_combinations_train: float,
                       frac_combinations_test: float, seed: int) -> tuple[list[str], list[str]]:
    """``(train_pairs, test_pairs)`` of the Norman OOD task: the distinct combination
    labels, sorted, shuffled by ``default_rng(seed)``; the first
    ``floor(frac_combinations_train * n)`` are training pairs, the last
    ``ceil(frac_combinations_test * n)`` test pairs. Training pairs are nested as the
    fraction grows; they are disjoint from the test pairs while
    ``frac_combinations_train + frac_combinations_test <= 1``."""
    pairs = np.sort(np.unique(np.asarray(conditions, dtype=str)[combination_cells(n_members)]))
    np.random.default_rng(seed).shuffle(pairs)
    n_train = int(frac_combinations_train * len(pairs))
    n_test = int(math.ceil(frac_combinations_test * len(pairs)))
    return pairs[:n_train].tolist(), pairs[len(pairs) - n_test:].tolist()


def _split_combination_cells(n_members: np.ndarray, seed: int):
    """Positions of the combination cells split 80 / 20 into train+val / test, then
    80 / 20 into train / val (``(train, val, test)``, shuffled order), and of the other
    cells (controls, singles) split 80 / 20 into train / val."""
    combos = np.flatnonzero(combination_cells(n_members))
    others = np.flatnonzero(~combination_cells(n_members))
    if len(combos) == 0:
        raise ValueError("no cells received a combination of perturbations")
    train_val, test = shuffle_split(len(combos), seed, test_size=0.2)
    train, val = shuffle_split(len(train_val), seed, test_size=0.2)
    other_train, other_val = shuffle_split(len(others), seed, test_size=0.2)
    return (combos[train_val[train]], combos[train_val[val]], combos[test]), (others[other_train], others[other_val])


def norman_ood_split(conditions: np.ndarray, n_members: np.ndarray, frac_combinations_train: float,
                     frac_combinations_test: float = 0.25, seed: int = 0) -> np.ndarray:  # [n_cells] str
    """Out-of-distribution combinations (SPEC 6). ``conditions`` ``[n_cells]`` names each
    cell's condition (the pair label for combinations); ``n_members`` ``[n_cells]`` counts
    its perturbations (0 control, 1 single, 2 pair). Combination cells are split before the
    pairs are chosen, so cells accumulate across ``frac_combinations_train`` values; train
    and val keep the cells of training pairs, test the cells of test pairs; other
    combination cells are in no split (:data:`NO_SPLIT`). Controls and singles go 80 / 20
    to train / val."""
    conditions = np.asarray(conditions, dtype=str)
    train_pairs, test_pairs = split_combinations(conditions, n_members, frac_combinations_train,
                                                 frac_combinations_test, seed)
    (train, val, test), (other_train, other_val) = _split_combination_cells(n_members, seed)
    labels = np.full(len(conditions), NO_SPLIT, dtype=object)
    labels[other_train], labels[other_val] = "train", "val"
    labels[train[np.isin(conditions[train], train_pairs)]] = "train"
    labels[val[np.isin(conditions[val], train_pairs)]] = "val"
    labels[test[np.isin(conditions[test], test_pairs)]] = "test"
    return labels


def norman_data_efficiency_split(n_members: np.ndarray, frac_combination_cells_train: float,
                                 seed: int = 0) -> np.ndarray:  # [n_cells] str
    """Data efficiency (SPEC 6): all pairs; combination cells split as in the OOD task,
    then only the first ``floor(frac_combination_cells_train * n)`` training combination
    cells (in shuffled order) are kept in it (the rest: :data:`NO_SPLIT`). Val and test keep
    all their combination cells."""
    (train, val, test), (other_train, other_val) = _split_combination_cells(n_members, seed)
    labels = np.full(len(n_members), NO_SPLIT, dtype=object)
    labels[other_train], labels[other_val] = "train", "val"
    labels[train[:int(frac_combination_cells_train * len(train))]] = "train"
    labels[val] = "val"
    labels[test] = "test"
    return labels
