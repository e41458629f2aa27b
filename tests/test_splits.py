"""The paper's splits (SPEC 6) as compositions of seeded shuffles: the seed reaches every
shuffle, the outer (train+val / test) and the inner (train / val) one, and the cell-level
split of the Norman tasks as well as the choice of pairs."""

import numpy as np

from sams_jax.data import splits as splits_lib
from sams_jax.data.splits import NO_SPLIT, norman_ood_split, random_split, shuffle_split


def _norman_like(n_pairs=8, cells_per_pair=10, n_singles=5, cells_per_single=12, n_controls=20):
    """Condition labels and member counts: controls, singles and pairs."""
    conditions = (["control"] * n_controls
                  + [f"S{i}" for i in range(n_singles) for _ in range(cells_per_single)]
                  + [f"P{i}a+P{i}b" for i in range(n_pairs) for _ in range(cells_per_pair)])
    n_members = np.array([0] * n_controls + [1] * (n_singles * cells_per_single) + [2] * (n_pairs * cells_per_pair))
    order = np.random.default_rng(0).permutation(len(conditions))  # cells interleaved, as in a file
    return np.asarray(conditions)[order], n_members[order]


def test_random_split_is_the_documented_composition_of_seeded_shuffles():
    """random_split(n, seed): 80 / 20 train+val / test by ``shuffle_split(n, seed)``, then
    80 / 20 train / val of those by ``shuffle_split(n_train_val, seed)``: the same seed
    in both, rebuilt here by hand for seeds 0, 3 and 11."""
    n = 103
    for seed in (0, 3, 11):
        labels = random_split(n, seed)
        permutation = np.random.RandomState(seed).permutation(n)  # sklearn's train_test_split
        n_train_val = int(np.floor(0.8 * n))
        train_val, test = permutation[n - n_train_val:], permutation[:n - n_train_val]
        inner = np.random.RandomState(seed).permutation(n_train_val)
        n_train = int(np.floor(0.8 * n_train_val))
        expected = np.full(n, NO_SPLIT, dtype=object)
        expected[test] = "test"
        expected[train_val[inner[n_train_val - n_train:]]] = "train"
        expected[train_val[inner[:n_train_val - n_train]]] = "val"
        np.testing.assert_array_equal(labels, expected)
        outer_train_val, _ = shuffle_split(n, seed, train_size=0.8)
        inner_train, inner_val = shuffle_split(len(outer_train_val), seed, train_size=0.8)
        assert set(np.flatnonzero(labels == "val")) == set(outer_train_val[inner_val])
        assert (labels == "train").sum() == n_train and (labels == "val").sum() == n_train_val - n_train


def test_random_split_seed_changes_val_and_test_cells():
    """Different seeds select different validation cells (inner split) and test cells
    (outer split); every cell is labelled and the sizes do not change."""
    a, b = random_split(200, 0), random_split(200, 1)
    for labels in (a, b):
        assert not np.any(labels == NO_SPLIT)
        assert [(labels == s).sum() for s in ("train", "val", "test")] == [128, 32, 40]
    assert set(np.flatnonzero(a == "val")) != set(np.flatnonzero(b == "val"))
    assert set(np.flatnonzero(a == "test")) != set(np.flatnonzero(b == "test"))


def test_norman_ood_cell_split_follows_the_seed():
    """With frac_combinations_train = 1 every pair is a training pair whatever the seed,
    yet the controls and singles are split 80 / 20 into train / val by the seed: two seeds
    give different such splits of the same size, and the training pairs' cells are split
    into train / val differently too."""
    conditions, n_members = _norman_like()
    labels = {seed: norman_ood_split(conditions, n_members, 1.0, 0.25, seed=seed) for seed in (0, 1, 2)}
    others = n_members < 2
    for seed in (1, 2):
        a, b = labels[0], labels[seed]
        assert (a[others] == "val").sum() == (b[others] == "val").sum() == int(np.ceil(0.2 * others.sum()))
        assert set(np.flatnonzero(others & (a == "val"))) != set(np.flatnonzero(others & (b == "val")))
        pairs_in_both = ~others & np.isin(a, ["train", "val"]) & np.isin(b, ["train", "val"])
        assert np.any(a[pairs_in_both] != b[pairs_in_both])


def test_held_out_pairs_are_the_papers_choice():
    """The pairs of the Norman OOD task as the paper's code picks them (SPEC 6): the
    distinct pair labels sorted, shuffled in place by ``np.random.default_rng(seed)``; the
    last ceil(0.25 n) are test pairs, the first floor(f n) training pairs (nested in f)."""
    conditions, n_members = _norman_like(n_pairs=13)
    pairs = sorted({c for c, m in zip(conditions, n_members) if m >= 2})
    for seed in (0, 1, 7):
        shuffled = np.array(pairs)
        np.random.default_rng(seed).shuffle(shuffled)
        earlier = []
        for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
            train, test = splits_lib.split_combinations(conditions, n_members, fraction, 0.25, seed)
            assert test == shuffled[13 - 4:].tolist()  # ceil(0.25 * 13) = 4
            assert train == shuffled[:int(fraction * 13)].tolist()  # 0, 3, 6, 9, 13
            assert train[:len(earlier)] == earlier
            earlier = train
        assert not set(splits_lib.split_combinations(conditions, n_members, 0.75, 0.25, seed)[0]) & set(test)


def test_norman_ood_split_is_the_documented_composition():
    """norman_ood_split by hand for seed 5: pairs chosen by ``split_combinations(seed)``;
    the pair cells split 80 / 20 and again 80 / 20 by ``shuffle_split(., seed)``, the
    other cells 80 / 20 by ``shuffle_split(., seed)``; pair cells keep a split only if
    their pair belongs to it."""
    conditions, n_members = _norman_like()
    seed = 5
    labels = norman_ood_split(conditions, n_members, 0.5, 0.25, seed=seed)
    train_pairs, test_pairs = splits_lib.split_combinations(conditions, n_members, 0.5, 0.25, seed)
    combos, others = np.flatnonzero(n_members >= 2), np.flatnonzero(n_members < 2)
    train_val, test = shuffle_split(len(combos), seed, test_size=0.2)
    train, val = shuffle_split(len(train_val), seed, test_size=0.2)
    other_train, other_val = shuffle_split(len(others), seed, test_size=0.2)
    expected = np.full(len(conditions), NO_SPLIT, dtype=object)
    expected[others[other_train]], expected[others[other_val]] = "train", "val"
    for cells, split, pairs in ((combos[train_val[train]], "train", train_pairs),
                                (combos[train_val[val]], "val", train_pairs), (combos[test], "test", test_pairs)):
        expected[cells[np.isin(conditions[cells], pairs)]] = split
    np.testing.assert_array_equal(labels, expected)
    assert {"train", "val", "test", NO_SPLIT} == set(labels.tolist())
