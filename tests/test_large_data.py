"""Large data: sparse and backed counts, host-streamed training, the prefetch thread.

Small ``.h5ad`` files are written in ``tmp_path``; ``BLOCK_BYTES`` is shrunk so that every
block-wise pass (checks, statistics, evaluation) really runs over several blocks.
"""

import pickle
import shutil
import threading
import time

import anndata
import jax
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sams_jax.config import ConfigError, validate_against_data, validate_config
from sams_jax.data import DataError, load_data
from sams_jax.data import matrix as matrix_lib
from sams_jax.data.anndata_io import from_anndata, write_h5ad
from sams_jax.data.matrix import BackedMatrix
from sams_jax import streaming, train as train_lib
from sams_jax.streaming import THREAD_NAME, Prefetcher, resolve_placement
from sams_jax.train import TrainingDiverged, train_and_evaluate

# screen() has a gene that is 0 in every cell on purpose (a constant gene's normalisation)
pytestmark = pytest.mark.filterwarnings("ignore:1 of .* genes are zero in every cell")
LABELS = ["control"] * 30 + [p for p in ["A", "B", "C", "A+B", "B+C"] for _ in range(12)]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(matrix_lib, "BLOCK_BYTES", 4 * 12 * 7)  # 7 cells of 12 genes per block


def screen(n_genes=12, seed=0) -> anndata.AnnData:
    """Counts (with zeros, a gene that is always 0 and one always 4) in layers["counts"],
    log1p in X, a split column and var["highly_variable"]."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(1.0, (len(LABELS), n_genes)).astype(np.float32)
    counts[:, 3], counts[:, 5] = 0.0, 4.0
    obs = pd.DataFrame({"perturbation": LABELS, "split": np.array(["train", "train", "val", "test"])[
        np.arange(len(LABELS)) % 4]}, index=[f"cell{i}" for i in range(len(LABELS))])
    var = pd.DataFrame({"highly_variable": np.arange(n_genes) % 4 != 1}, index=[f"gene{g}" for g in range(n_genes)])
    return anndata.AnnData(X=np.log1p(counts), obs=obs, var=var, layers={"counts": counts})


def write(adata, path, sparse=True):
    adata = adata.copy()
    if sparse:
        adata.layers["counts"] = sp.csr_matrix(adata.layers["counts"])
        adata.X = sp.csr_matrix(adata.X)
    write_h5ad(adata, path)
    return str(path)


def dense_x(data) -> np.ndarray:
    return matrix_lib.dense_rows(data.x, np.arange(data.x.shape[0]))


# ------------------------------------------------------------------------ loading


@pytest.mark.parametrize("storage", ["sparse", "backed", "backed_dense_file"])
@pytest.mark.parametrize("genes", ["all", "highly_variable_reordered"])
def test_sparse_and_backed_loads_equal_the_dense_load(tmp_path, storage, genes):
    adata = screen()
    kwargs = dict(split_key="split")
    if genes != "all":
        kept = [g for g, hv in zip(adata.var_names, adata.var["highly_variable"]) if hv]
        kwargs.update(use_highly_variable=True, feature_names=kept[::-1])
    dense = from_anndata(write(adata, tmp_path / "dense.h5ad", sparse=False), **kwargs)
    path = write(adata, tmp_path / "x.h5ad", sparse=storage != "backed_dense_file")
    data = from_anndata(path, backed=storage != "sparse", **kwargs)
    assert data.storage == ("sparse" if storage == "sparse" else "backed") and dense.storage == "dense"
    assert data.feature_names == dense.feature_names
    np.testing.assert_array_equal(dense_x(data), dense.x)
    np.testing.assert_array_equal(data.library_size, dense.library_size)
    np.testing.assert_array_equal(data.dosages, dense.dosages)
    for method in ("log_standardize", "standardize", "none"):
        ours, reference = data.normalization_stats(method), dense.normalization_stats(method)
        for key in ours:
            np.testing.assert_allclose(ours[key], reference[key], rtol=1e-6, atol=1e-7, err_msg=f"{method} {key}")
    if genes == "all":  # the constant genes get scale 1, as in the dense computation
        assert data.normalization_stats("log_standardize")["scale"][[3, 5]].tolist() == [1.0, 1.0]
    metadata, reference = data.metadata("log_standardize"), dense.metadata("log_standardize")
    assert metadata.pop("name") == "x" and reference.pop("name") == "dense" and metadata == reference
    for split in ("train", "val", "test"):
        for key, value in data.arrays(split).items():
            np.testing.assert_array_equal(value, dense.arrays(split)[key])
    data.validate("library_nb")
    counts_x = from_anndata(path, counts_layer=None, likelihood="normal", backed=storage != "sparse", **kwargs)
    np.testing.assert_allclose(dense_x(counts_x), np.log1p(dense.x), rtol=1e-6)  # X = log1p(counts)


def test_config_loads_backed_and_checks_placement(tmp_path):
    path = write(screen(), tmp_path / "screen.h5ad")
    config = _anndata_config(path)
    config.data.backed = True
    assert load_data(config.data, "library_nb").storage == "backed"
    config.data.backed = False
    data = load_data(config.data, "library_nb")
    assert data.storage == "sparse"
    assert resolve_placement("auto", data) == "device"  # small: the dense training split goes to the device
    assert resolve_placement("host", data) == "host"
    config.train.data_placement = "disk"
    with pytest.raises(ConfigError, match="train.data_placement='disk' is not allowed"):
        validate_config(config)
    config.train.data_placement = "auto"
    config.data.update(source="simulation", backed=True)
    with pytest.raises(ConfigError, match="data.backed=True .* needs data.source='anndata'"):
        validate_config(config)


def test_auto_placement_streams_backed_or_large_data(tmp_path, monkeypatch):
    path = write(screen(), tmp_path / "screen.h5ad")
    assert resolve_placement("auto", from_anndata(path, split_key="split", backed=True)) == "host"
    monkeypatch.setattr(streaming, "AUTO_DEVICE_MAX_BYTES", 100)
    assert resolve_placement("auto", from_anndata(path, split_key="split")) == "host"


def test_backed_rows_in_any_order_subsets_and_pickling(tmp_path):
    counts = screen().layers["counts"]
    path = write(screen(), tmp_path / "screen.h5ad")
    matrix = BackedMatrix(path, "layers/counts")
    assert matrix.shape == counts.shape
    rows = np.array([7, 2, 2, 40, 0, 41, 39])  # unsorted, repeated, a run
    np.testing.assert_array_equal(matrix[rows].toarray(), counts[rows])
    np.testing.assert_array_equal(matrix[10:20].toarray(), counts[10:20])
    mask = np.arange(len(counts)) % 3 == 0
    np.testing.assert_array_equal(matrix[mask].toarray(), counts[mask])
    view = matrix.subset(rows=np.arange(5, 50), columns=[4, 0, 2]).subset(rows=[3, 1], columns=[2, 0])
    np.testing.assert_array_equal(view[[0, 1]].toarray(), counts[[8, 6]][:, [2, 4]])
    copy = pickle.loads(pickle.dumps(view))
    np.testing.assert_array_equal(copy[[1, 0]].toarray(), counts[[6, 8]][:, [2, 4]])
    assert matrix[np.zeros(0, int)].shape == (0, counts.shape[1])
    with pytest.raises(TypeError, match="rows only"):
        matrix[0, 1]


def test_backed_csc_is_a_clear_error(tmp_path):
    adata = screen()
    adata.layers["counts"] = sp.csc_matrix(adata.layers["counts"])
    write_h5ad(adata, tmp_path / "csc.h5ad")
    with pytest.raises(DataError, match="stored as csc_matrix; backed reading needs cells as rows of a CSR"):
        from_anndata(tmp_path / "csc.h5ad", split_key="split", backed=True)


@pytest.mark.parametrize("storage", ["sparse", "backed"])
@pytest.mark.parametrize("value, kind", [(np.nan, "NaN or infinite"), (-1.0, "negative"), (0.5, "non-integer")])
def test_bad_values_are_found_in_every_block(tmp_path, storage, value, kind):
    adata = screen()
    adata.layers["counts"][[20, 75], 1] = value  # in the third and the eleventh block of 7 cells
    adata.layers["counts"][75, 2] = value
    path = write(adata, tmp_path / "bad.h5ad")
    with pytest.raises(DataError, match=rf"layers\['counts'\] has 3 {kind} values .* in 2 cells, "
                                        rf"e.g. \['cell20', 'cell75'\]"):
        from_anndata(path, split_key="split", likelihood="library_nb", backed=storage == "backed")


def test_validate_and_training_reject_bad_sparse_values_before_writing(tiny_config, tmp_path):
    data = load_data(tiny_config.data)
    data.x = sp.csr_matrix(data.x)
    data.x.data[-1] = np.inf
    with pytest.raises(DataError, match=rf"x contains 1 non-finite values .* e.g. in cells \[{data.x.shape[0] - 1}\]"):
        train_and_evaluate(tiny_config, str(tmp_path / "w"), data=data)
    assert not (tmp_path / "w").exists()
    data.x = sp.csr_matrix(np.round(np.abs(load_data(tiny_config.data).x)))
    data.validate("poisson")
    data.x.data[-1] = 0.5
    with pytest.raises(DataError, match="needs integer counts"):
        data.validate("poisson")
    data.x.data[-1] = -1.0
    with pytest.raises(DataError, match="needs non-negative counts"):
        data.validate("poisson")
    # library_nb: each cell's expected counts sum to its library size, so it must not be negative (dense, sparse)
    data.x.data[-1] = 1.0
    data.library_size = np.ones(data.x.shape[0], np.float32)  # the normal simulation's row sums are no counts
    data.library_size[3] = -5.0
    data.validate("poisson")
    for x in (data.x, data.x.toarray()):
        data.x = x
        with pytest.raises(DataError, match=r"'library_nb' needs non-negative library sizes, but library_size has "
                                            r"1 negative value\(s\) \(cells at rows \[3\], e.g. -5.0\)"):
            data.validate("library_nb")


# ------------------------------------------------------------------------ training


def _anndata_config(path):
    from sams_jax.config import base_config

    config = base_config()
    config.data.update(source="anndata", path=path, split_key="split")
    config.model.update(n_latent=3, likelihood="library_nb", decoder_n_hidden=8, basal_encoder_n_hidden=8,
                        embedding_encoder_n_hidden=8)
    config.objective.n_particles = 2
    config.train.update(batch_size=16, max_steps=20, eval_every=10, steps_per_dispatch=5, eval_batch_size=8,
                        progress=False)
    config.eval.iwelbo_n_particles = 4
    return config


def _params(workdir, config, data):
    from sams_jax.checkpoint import Checkpointer
    from sams_jax.models import create_model

    model = create_model(config.model, data.n_genes, data.n_perturbations)
    target = train_lib.create_train_state(model, train_lib.create_optimizer(config.train),
                                          data.normalization_stats(config.model.normalization), jax.random.key(0))
    ckpt = Checkpointer(str(workdir), read_only=True)
    try:
        return jax.tree.leaves(ckpt.restore_state(ckpt.latest_step(), target))
    finally:
        ckpt.close()


def test_host_streaming_equals_device_training_and_resumes(tiny_config, tmp_path, monkeypatch):
    """The same losses, parameters and scores on the device (dense x) and streamed from
    the host (CSR x), the host run interrupted and resumed half-way; validation and the
    final IWELBO of CSR x are scored in several blocks of 2 chunks of 16 cells."""
    tiny_config.train.update(eval_batch_size=16, data_placement="device")
    monkeypatch.setattr(train_lib, "iwelbo_chunk_size", lambda n_particles, n_genes: 16)  # several chunks
    dense = load_data(tiny_config.data)
    reference = train_and_evaluate(tiny_config, str(tmp_path / "device"), data=dense)
    sparse = load_data(tiny_config.data)
    sparse.x = sp.csr_matrix(sparse.x)
    tiny_config.train.data_placement = "host"
    tiny_config.train.max_steps = 20
    train_and_evaluate(tiny_config, str(tmp_path / "host"), data=sparse)
    tiny_config.train.max_steps = 40
    streamed = train_and_evaluate(tiny_config, str(tmp_path / "host"), data=sparse)
    assert streamed.keys() == reference.keys()
    for key in reference:
        np.testing.assert_allclose(streamed[key], reference[key], rtol=1e-5, err_msg=key)
    history = {name: pd.read_csv(tmp_path / name / "history.csv") for name in ("device", "host")}
    assert history["host"]["step"].tolist() == history["device"]["step"].tolist() == [20, 40]
    for column in ("train_loss", "val_loss"):
        np.testing.assert_allclose(history["host"][column], history["device"][column], rtol=1e-5)
    for a, b in zip(_params(tmp_path / "device", tiny_config, dense), _params(tmp_path / "host", tiny_config, dense)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_host_streaming_draws_the_batches_of_data_shards(tiny_config, tmp_path):
    """With train.data_shards=2 (the batches of a two-process run) on one process, the host
    path streams the same batches the device path gathers from its shard rows."""
    tiny_config.train.update(max_steps=10, eval_every=10, data_shards=2, data_placement="device")
    data = load_data(tiny_config.data)
    device = train_and_evaluate(tiny_config, str(tmp_path / "device"), data=data)
    tiny_config.train.data_placement = "host"
    host = train_and_evaluate(tiny_config, str(tmp_path / "host"), data=data)
    for key in device:
        np.testing.assert_allclose(host[key], device[key], rtol=1e-5, err_msg=key)
    for a, b in zip(_params(tmp_path / "device", tiny_config, data), _params(tmp_path / "host", tiny_config, data)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_host_streaming_with_several_processes_is_a_config_error(tiny_config, tmp_path, monkeypatch):
    data = load_data(tiny_config.data)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    tiny_config.train.update(data_placement="host", batch_size=32)
    with pytest.raises(ConfigError, match="train.data_placement='host' .* single process only; this run has 2"):
        validate_against_data(tiny_config, data)
    backed = from_anndata(write(screen(), tmp_path / "screen.h5ad"), split_key="split", backed=True)
    tiny_config.train.update(data_placement="auto", batch_size=4)
    with pytest.raises(ConfigError, match="train.data_placement='auto' .* Set train.data_placement='device'"):
        validate_against_data(tiny_config, backed)
    tiny_config.train.update(data_placement="device", batch_size=32)
    validate_against_data(tiny_config, data)  # the device path shards the cells by process


def test_training_from_a_backed_file_then_evaluation(tmp_path):
    """Auto placement streams a backed file from the host; the final IWELBO equals the
    predictor's on the dense cells, and so does the predictor's on the backed file
    (scored in many blocks); evaluation re-reads the file backed (the saved config) and
    its data ATEs equal those of the dense data."""
    import sams_jax
    from sams_jax.ate import data_expectations
    from sams_jax.evaluate import evaluate

    path = write(screen(), tmp_path / "screen.h5ad")
    config = _anndata_config(path)
    config.data.backed = True
    metrics = train_and_evaluate(config, str(tmp_path / "run"))
    assert metrics["steps"] == 20
    backed = load_data(config.data, "library_nb")
    dense = from_anndata(write(screen(), tmp_path / "dense.h5ad", sparse=False), split_key="split")
    predictor = sams_jax.load(str(tmp_path / "run"))
    for split in ("val", "test"):
        per_cell = predictor.iwelbo(dense.arrays(split), 4, seed=config.seed)  # the default chunks, as training's
        np.testing.assert_allclose(per_cell.mean(), metrics[f"{split}/IWELBO"], rtol=1e-5)
        np.testing.assert_allclose(predictor.iwelbo(backed, 4, seed=config.seed, chunk_size=8, split=split),
                                   predictor.iwelbo(dense.arrays(split), 4, seed=config.seed, chunk_size=8),
                                   rtol=1e-5)  # many blocks of one chunk of 8 cells
    np.testing.assert_allclose(predictor.latent(backed, split="test"), predictor.latent(dense.arrays("test")),
                               rtol=1e-5, atol=1e-6)
    interventions = np.unique(dense.dosages, axis=0)
    for scale in ("mean", "perturbseq"):
        np.testing.assert_allclose(data_expectations(backed.x, backed.dosages, interventions, scale, cell_chunk=5),
                                   data_expectations(dense.x, dense.dosages, interventions, scale), rtol=1e-6)
    results = evaluate(str(tmp_path / "run"), ate_particles=20, iwelbo_particles=4, plots=False)
    assert np.isfinite(results["IWELBO-test"]) and np.isfinite(results["ATE_pearsonr-all"])


# ------------------------------------------------------------------------ prefetching


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def test_prefetch_thread_stops_when_training_diverges(tiny_config, tmp_path):
    tiny_config.train.update(data_placement="host", learning_rate=1e30, max_steps=200, steps_per_dispatch=5,
                             prefetch=2)
    with pytest.raises(TrainingDiverged, match="non-finite training loss"):
        train_and_evaluate(tiny_config, str(tmp_path))
    assert not _prefetch_threads()


def test_prefetcher_passes_errors_on_and_closes_without_hanging():
    def produce(item):
        if item == 3:
            raise OSError("disk gone")
        return item * 10

    with pytest.raises(OSError, match="disk gone"):
        with Prefetcher(produce, range(10), depth=2) as prefetcher:
            assert [prefetcher.get() for _ in range(3)] == [(0, 0), (1, 10), (2, 20)]
            prefetcher.get()
    assert not _prefetch_threads()
    # a consumer that stops early while the producer is blocked on a full queue
    start = time.perf_counter()
    prefetcher = Prefetcher(lambda item: item, iter(int, 1), depth=2)  # endless work
    assert prefetcher.get() == (0, 0)
    time.sleep(0.3)
    prefetcher.close()
    assert not _prefetch_threads() and time.perf_counter() - start < 5
    with Prefetcher(lambda item: item, range(2)) as prefetcher:
        assert [prefetcher.get(), prefetcher.get()] == [(0, 0), (1, 1)]
        with pytest.raises(StopIteration):
            prefetcher.get()


def test_resume_after_the_file_moved_and_refused_when_its_data_changed(tmp_path):
    """``data.path`` may change on resume (a moved file or output folder) when the data
    match the checkpoint's metadata; other data at the saved path are refused."""
    from sams_jax.config import ConfigError

    path = write(screen(), tmp_path / "screen.h5ad")
    config = _anndata_config(path)
    config.train.max_steps = 10
    train_and_evaluate(config, str(tmp_path / "run"))
    moved = tmp_path / "moved.h5ad"
    shutil.move(path, moved)
    config.data.path, config.train.max_steps = str(moved), 20
    assert train_and_evaluate(config, str(tmp_path / "run"))["steps"] == 20
    write(screen(seed=1), moved)  # other counts at the same path
    config.train.max_steps = 30
    with pytest.raises(ConfigError, match=r"trained on other data \(median_library_size; normalization_stats"):
        train_and_evaluate(config, str(tmp_path / "run"))
