import numpy as np

from sams_jax.metrics import mask_scores


def test_mask_scores_known_values_and_permutation_invariance():
    rng = np.random.default_rng(0)
    truth = rng.random((30, 6)) < 0.3
    learned = truth.copy()
    learned[:5] = ~learned[:5]  # some errors
    expected_tp = (truth & learned).sum()
    scores = mask_scores(truth, learned)
    np.testing.assert_allclose(scores["mask_precision"], expected_tp / learned.sum())
    np.testing.assert_allclose(scores["mask_recall"], expected_tp / truth.sum())
    p, r = scores["mask_precision"], scores["mask_recall"]
    np.testing.assert_allclose(scores["mask_f1"], 2 * p * r / (p + r))
    permuted = mask_scores(truth, learned[:, rng.permutation(6)])
    assert permuted == scores
    assert mask_scores(truth, truth[:, ::-1]) == {"mask_precision": 1.0, "mask_recall": 1.0, "mask_f1": 1.0}


def test_mask_scores_dense_and_extra_dimensions():
    truth = np.zeros((10, 3), bool)
    truth[:, 0] = True
    dense = mask_scores(truth, np.ones((10, 3), bool))
    np.testing.assert_allclose(dense["mask_precision"], 1 / 3)
    assert dense["mask_recall"] == 1.0
    # learned has more dimensions than the truth: unmatched ones are false positives
    wide = np.zeros((10, 5), bool)
    wide[:, 4] = True
    wide[:2, 1] = True
    scores = mask_scores(truth, wide)
    np.testing.assert_allclose(scores["mask_precision"], 10 / 12)
    assert mask_scores(truth, np.zeros((10, 3), bool))["mask_f1"] == 0.0
