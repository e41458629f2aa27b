"""The paper's simulation (SPEC 6) and the PerturbationData interface."""

import numpy as np
import pytest
import scipy.sparse as sp

from sams_jax.data import DataError, normalization_stats, plate_scale, simulate
from sams_jax.data.anndata_io import write_h5ad


def test_simulation_structure_and_ground_truth():
    data = simulate(n_latent=5, n_perturbations=7, n_genes=9, cells_per_perturbation=(30, 6, 4), seed=3)
    n = 7 * (30 + 6 + 4)
    assert data.x.shape == (n, 9) and data.dosages.shape == (n, 7)
    np.testing.assert_array_equal(data.dosages.sum(1), 1.0)  # every cell perturbed, one-hot
    for split, per in (("train", 30), ("val", 6), ("test", 4)):
        np.testing.assert_array_equal(data.cells_per_perturbation(split), per)
    truth = data.truth
    np.testing.assert_allclose(truth["z"], truth["z_basal"] + data.dosages @ (truth["mask"] * truth["embeddings"]),
                               rtol=1e-5, atol=1e-5)
    magnitudes = np.abs(truth["embeddings"])
    assert 4.0 < magnitudes.mean() < 6.0 and set(np.unique(truth["mask"]).tolist()) <= {0.0, 1.0}
    assert data.control == "0" and data.perturbation_names[0] == "0"


def test_simulation_is_seeded():
    a, b, c = (simulate(n_perturbations=5, n_genes=8, cells_per_perturbation=(10, 2, 2), seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.x, c.x)


def test_noise_is_twenty_percent_of_variance():
    """Per gene, noise variance / total variance = noise_fraction (SPEC 6)."""
    data = simulate(n_latent=4, n_perturbations=20, n_genes=30, cells_per_perturbation=(200, 1, 1), seed=0)
    noise_free = simulate(n_latent=4, n_perturbations=20, n_genes=30, cells_per_perturbation=(200, 1, 1), seed=0,
                          noise_fraction=0.0)
    noise = data.x - noise_free.x
    fraction = noise.var(0) / data.x.var(0)
    np.testing.assert_allclose(fraction.mean(), 0.2, atol=0.02)
    np.testing.assert_allclose(noise_free.x.std(0), 1.0, rtol=1e-4)  # genes scaled to unit sd


def test_mask_density_follows_mask_prob():
    data = simulate(n_latent=15, n_perturbations=400, n_genes=5, cells_per_perturbation=(1, 1, 1), seed=0)
    np.testing.assert_allclose(data.truth["mask"].mean(), 2 / 15, atol=0.01)


def test_count_simulation_is_integer_with_library_sizes():
    data = simulate(n_perturbations=5, n_genes=20, cells_per_perturbation=(40, 5, 5), observation="library_nb")
    assert np.all(data.x >= 0) and np.array_equal(data.x, np.round(data.x))
    np.testing.assert_allclose(data.library_size, data.x.sum(1))
    assert 3000 < np.median(data.library_size) < 8000
    data.validate("library_nb")


def test_validate_rejects_bad_data():
    data = simulate(n_perturbations=3, n_genes=4, cells_per_perturbation=(5, 2, 2))
    data.x[3, 1] = np.nan
    with pytest.raises(DataError, match="non-finite.*cells \\[3\\]"):
        data.validate("normal")
    data = simulate(n_perturbations=3, n_genes=4, cells_per_perturbation=(5, 2, 2))
    with pytest.raises(DataError, match="non-negative counts"):
        data.validate("library_nb")  # Normal simulation has negative values
    data.x = np.abs(data.x)
    with pytest.raises(DataError, match="integer counts"):
        data.validate("poisson")
    data.split = np.where(data.split == "val", "valid", data.split)
    with pytest.raises(DataError, match="unknown split labels \\['valid'\\]"):
        data.validate("normal")


def test_normalization_statistics():
    x = np.array([[0.0, 1.0, 5.0], [2.0, 1.0, 7.0], [4.0, 1.0, 9.0]], np.float32)
    stats = normalization_stats(x, "standardize")
    np.testing.assert_allclose(stats["mean"], [2.0, 1.0, 7.0])
    np.testing.assert_allclose(stats["scale"], [np.std([0, 2, 4]), 1.0, np.std([5, 7, 9])], rtol=1e-6)
    log_stats = normalization_stats(x, "log_standardize")
    np.testing.assert_allclose(log_stats["mean"], np.log1p(x).mean(0), rtol=1e-6)
    none = normalization_stats(x, "none")
    np.testing.assert_array_equal(none["mean"], 0.0)
    np.testing.assert_array_equal(none["scale"], 1.0)
    scaled = x - 3.0  # centred data: log(1 + x) is undefined below -1, in dense, CSR and row-selected form
    for matrix, rows in ((scaled, None), (sp.csr_matrix(scaled), None), (scaled, np.arange(3))):
        with pytest.raises(DataError, match="log_standardize' feeds the encoder log\\(1 \\+ x\\)"
                                            ".*normalization=standardize"):
            normalization_stats(matrix, "log_standardize", rows=rows)
        np.testing.assert_allclose(normalization_stats(matrix, "standardize", rows=rows)["mean"], [-1.0, -2.0, 4.0])


def test_metadata_records_vocabulary_and_counts():
    data = simulate(n_perturbations=3, n_genes=4, cells_per_perturbation=(5, 2, 1))
    meta = data.metadata("standardize")
    assert meta["perturbation_names"] == ["0", "1", "2"] and len(meta["feature_names"]) == 4
    assert meta["cells_per_perturbation"] == {"train": [5, 5, 5], "val": [2, 2, 2], "test": [1, 1, 1]}
    assert len(meta["normalization_stats"]["scale"]) == 4
    np.testing.assert_allclose(plate_scale(meta["cells_per_perturbation"]["val"]), 0.5)


@pytest.mark.parametrize("storage", ["dense", "sparse", "backed"])
def test_normalization_statistics_come_from_the_training_cells_only(tmp_path, monkeypatch, storage):
    """SPEC 2: the encoder-input statistics are the training split's. With the val and
    test cells shifted by +100, ``PerturbationData.normalization_stats`` equals the mean
    and standard deviation of ``x[train]`` (of ``log(1 + x[train])`` for
    ``log_standardize``) for dense, CSR and backed (on-disk) ``x``, read in blocks of 7
    cells."""
    import anndata

    from sams_jax.data import PerturbationData
    from sams_jax.data import matrix as matrix_lib
    from sams_jax.data.matrix import BackedMatrix

    monkeypatch.setattr(matrix_lib, "BLOCK_BYTES", 4 * 5 * 7)  # 7 cells of 5 genes per block

    rng = np.random.default_rng(0)
    n, g = 40, 5
    split = np.array(["train", "val", "train", "test", "train"] * (n // 5))
    x = rng.poisson(2.0, (n, g)).astype(np.float32)
    x[:, 1] = 0.0  # sparse entries in every storage
    x[split != "train"] += 100.0
    train = x[split == "train"].astype(np.float64)
    if storage == "sparse":
        matrix = sp.csr_matrix(x)
    elif storage == "backed":
        path = tmp_path / "x.h5ad"
        write_h5ad(anndata.AnnData(X=sp.csr_matrix(x)), path)
        matrix = BackedMatrix(path, "X")
    else:
        matrix = x
    data = PerturbationData(x=matrix, dosages=np.eye(2, dtype=np.float32)[np.arange(n) % 2], split=split,
                            feature_names=[f"g{i}" for i in range(g)], perturbation_names=["a", "b"],
                            library_size=x.sum(1))
    assert data.storage == storage
    stats = data.normalization_stats("standardize")
    np.testing.assert_allclose(stats["mean"], train.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["scale"], np.where(train.std(0) > 0, train.std(0), 1.0), rtol=1e-5)
    log_stats = data.normalization_stats("log_standardize")
    np.testing.assert_allclose(log_stats["mean"], np.log1p(train).mean(0), rtol=1e-5)
    np.testing.assert_allclose(log_stats["scale"], np.where(train.std(0) > 0, np.log1p(train).std(0), 1.0),
                               rtol=1e-5)
    assert data.metadata("standardize")["normalization_stats"]["mean"] == pytest.approx(train.mean(0), rel=1e-5)


@pytest.mark.parametrize("block", [2, 1_000])
def test_conditions_are_the_distinct_sets_of_perturbations_per_split(monkeypatch, block):
    """``PerturbationData.conditions``: the distinct sets of perturbations per split (the
    control as ``[]``; dosage values, cell order and blocks do not matter; more than 8
    perturbations span several packed bytes); the training split's are in the metadata,
    and data whose training cells got other sets differ from it."""
    from sams_jax.data import PerturbationData, metadata_differences
    from sams_jax.data import matrix as matrix_lib

    monkeypatch.setattr(matrix_lib, "block_rows", lambda n_columns: block)
    dosages = np.zeros((8, 10), np.float32)
    for cell, members in enumerate([[], [0, 1], [2], [0, 1], [1, 2, 9], [0, 9], [0, 1], [2]]):
        dosages[cell, members] = [2.0, 0.5, 1.0][:len(members)] if len(members) <= 3 else 1.0
    split = np.asarray(["train", "train", "train", "train", "train", "val", "train", "train"])

    def make(dosages):
        return PerturbationData(x=np.ones((8, 3), np.float32), dosages=dosages, split=split,
                                feature_names=["g0", "g1", "g2"], perturbation_names=list("abcdefghij"),
                                library_size=np.full(8, 3.0, np.float32))

    data = make(dosages)
    assert data.conditions("train") == [[], [0, 1], [1, 2, 9], [2]]
    assert data.conditions("val") == [[0, 9]] and data.conditions("test") == []
    saved = data.metadata("none")
    assert saved["training_conditions"] == [[], [0, 1], [1, 2, 9], [2]]
    regrouped = dosages.copy()  # cell 1 gets a+c instead of a+b, cell 2 b instead of c: the same counts
    regrouped[1], regrouped[2] = np.eye(10)[0] + np.eye(10)[2], np.eye(10)[1]
    assert metadata_differences(saved, make(regrouped).metadata("none")) == ["training_conditions"]
