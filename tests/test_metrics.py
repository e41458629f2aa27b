import numpy as np
import pytest

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


def test_write_json_is_strict_json_with_null_for_undefined_scores(tmp_path):
    import json

    from sams_jax.metrics import write_json

    path = tmp_path / "metrics.json"
    write_json(str(path), {"b": np.float32(0.5), "a": float("nan"), "c": np.int64(3), "d": -np.inf, "e": 1.25})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict constant {name}"))
    assert json.loads(text) == {"a": None, "b": 0.5, "c": 3, "d": None, "e": 1.25}
    assert list(json.loads(text)) == ["a", "b", "c", "d", "e"]
