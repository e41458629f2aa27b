"""The experiments of experiments/: grids, aggregation (relative IWELBO, mean and std over
seeds, markdown), worker sizing, and one experiment end to end (runs in their own
processes, skipping finished cells, aggregation, plots, a failing cell)."""

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import runner  # noqa: E402
from experiments.norman_data_efficiency import run as norman_data_efficiency  # noqa: E402
from experiments.norman_ood import run as norman_ood  # noqa: E402
from experiments.replogle import run as replogle  # noqa: E402
from experiments.mask_recovery import run as mask_recovery  # noqa: E402
from experiments.simulation import run as simulation  # noqa: E402


def _args(**kwargs):
    return argparse.Namespace(**{"data": "/data/norman.h5ad", "smoke": False, "out": pathlib.Path("/tmp/x"),
                                 **kwargs})


# ------------------------------------------------------------------------------ grids


def test_paper_grids_models_seeds_fractions_and_config_fields():
    grid = norman_ood.make_grid(_args())
    cells = grid.cells()
    assert len(cells) == 4 * 5 * 5 and len({c.id for c in cells}) == len(cells)
    assert [v.name for v in grid.variants] == ["sams_vae", "cpa_vae", "conditional_vae", "svae_plus"]
    by_id = {c.id: c for c in cells}
    sams = by_id["sams_vae-f0.25-s3"].config
    assert (sams["model"]["name"], sams["model"]["guide"]) == ("sams_vae", "correlated")
    assert (sams["data"]["frac_combinations_train"], sams["data"]["split_seed"], sams["seed"]) == (0.25, 3, 3)
    assert sams["data"]["path"] == "/data/norman.h5ad" and sams["train"]["max_steps"] == 30_000
    assert sams["model"]["n_latent"] == 200 and not sams["train"]["progress"]
    assert by_id["cpa_vae-f1-s0"].config["model"]["guide"] == "mean_field"
    assert by_id["svae_plus-f0-s0"].config["data"]["encode_combinations"] == "unique"
    assert cells[0].evaluation == runner.Evaluation(iwelbo_particles=100, ate_particles=2_500)

    efficiency = norman_data_efficiency.make_grid(_args()).cells()
    assert len(efficiency) == 100
    config = {c.id: c for c in efficiency}["conditional_vae-f0.5-s1"].config
    assert (config["data"]["task"], config["data"]["frac_combination_cells_train"]) == ("norman_data_efficiency", 0.5)

    sim = simulation.make_grid(_args(data=None)).cells()
    assert len(sim) == 6 * 5 and all(c.fraction is None for c in sim)
    assert {c.id: c for c in sim}["sams_vae_mean_field-s2"].config["model"]["guide"] == "mean_field"
    assert {c.config["data"]["seed"] for c in sim} == {0}  # one data set, five model seeds

    rep = {c.id: c for c in replogle.make_grid(_args(data="/data/replogle.h5ad")).cells()}
    assert len(rep) == 7 * 5
    assert rep["sams_vae_K200-s4"].config["model"]["n_latent"] == 200
    assert rep["sams_vae_mask0.001-s0"].config["model"]["mask_prior_prob"] == 0.001
    assert rep["svae_plus-s1"].config["data"]["split_seed"] == 0 and rep["svae_plus-s1"].config["seed"] == 1


def test_subset_and_overrides_errors():
    grid = norman_ood.make_grid(_args())
    small = grid.subset(["svae_plus", "sams_vae"], [2], [0.5])
    assert [c.id for c in small.cells()] == ["svae_plus-f0.5-s2", "sams_vae-f0.5-s2"]
    with pytest.raises(ValueError, match=r"unknown model\(s\) \['foo'\].*sams_vae"):
        grid.subset(["foo"])
    with pytest.raises(ValueError, match="no fraction axis"):
        simulation.make_grid(_args(data=None)).subset(fractions=[0.5])
    config = runner.load_config("simulation")
    runner.set_fields(config, {"train.max_steps": 7, "model.guide": "mean_field"})
    assert (config.train.max_steps, config.model.guide) == (7, "mean_field")
    with pytest.raises(ValueError, match=r"unknown config field 'train.max_step'; did you mean 'train.max_steps'"):
        runner.set_fields(config, {"train.max_step": 7})
    with pytest.raises(ValueError, match=r"train.max_steps='abc'"):
        runner.set_fields(config, {"train.max_steps": "abc"})
    with pytest.raises(FileNotFoundError, match="no config .*nope.py; known configs: .*norman_ood"):
        runner.load_config("nope")
    assert runner.parse_assignment("train.learning_rate=1e-3") == ("train.learning_rate", 1e-3)
    assert runner.parse_assignment("model.guide=mean_field") == ("model.guide", "mean_field")


@pytest.mark.parametrize("assignment, message", [
    ("model.likelihood=foo", "model.likelihood='foo' is not allowed"),
    ("bogus.x=1", "unknown config field 'bogus' (in --set bogus.x)"),
    ("train.max_steps=abc", "train.max_steps='abc'"),
])
def test_bad_set_values_are_one_error_before_any_cell_runs(tmp_path, capsys, assignment, message):
    with pytest.raises(SystemExit) as exit_info:
        simulation.main(["--smoke", "--models", "sams_vae", "--seeds", "0", "--out", str(tmp_path / "out"),
                         "--set", assignment])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # no cell started


def test_smoke_with_data_and_the_mask_recovery_counts_option(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        norman_ood.main(["--smoke", "--data", str(tmp_path / "norman.h5ad"), "--list"])
    assert exit_info.value.code == 2 and "drop --data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        mask_recovery.main(["--help"])
    assert exit_info.value.code == 0 and "--counts" in capsys.readouterr().out
    assert mask_recovery.main(["--counts", "--smoke", "--models", "paper", "--seeds", "0", "--out",
                               str(tmp_path / "mr"), "--list"]) == 0
    assert "todo  paper-s0" in capsys.readouterr().out


def test_missing_data_path_says_what_to_download(capsys):
    with pytest.raises(SystemExit) as exit_info:
        norman_ood.main([])
    assert exit_info.value.code == 2
    assert "--data is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        replogle.main(["--data", "/no/such/replogle.h5ad"])
    err = capsys.readouterr().err
    assert "no such file" in err and "prepare_replogle" in err and "35775507" in err


def test_data_in_another_layout_is_refused_before_any_cell_starts(capsys, tmp_path):
    """A file that is no .h5ad, or a Replogle-like file given to a Norman experiment, is one
    error up front (from obs and var alone), not a failure in every cell."""
    from experiments import synthetic

    (tmp_path / "notes.h5ad").write_text("not an AnnData")
    synthetic.replogle_like(tmp_path / "replogle.h5ad")
    synthetic.norman_like(tmp_path / "norman.h5ad")
    replogle_problems = (f"{tmp_path / 'replogle.h5ad'} is not in the layout that config.data registers (3 problems"
                         "; a file made for another experiment?):\n- use_highly_variable is set but var has no "
                         "'highly_variable' column")
    for path, message in [(tmp_path / "notes.h5ad", f"'{tmp_path / 'notes.h5ad'}' is not a readable .h5ad file"),
                          (tmp_path / "replogle.h5ad", replogle_problems),
                          (tmp_path / "replogle.h5ad", "(--set data.use_highly_variable=False)"),
                          (tmp_path / "replogle.h5ad", "- obs has no column 'guide_identity'"),
                          (tmp_path / "replogle.h5ad", "obs has the column 'sgID_AB' of the Replogle et al. 2022 "
                                                       "file, whose settings are in configs/replogle.py"),
                          (tmp_path / "replogle.h5ad", "- the AnnData has no layer 'counts'")]:
        with pytest.raises(SystemExit) as exit_info:
            norman_ood.main(["--data", str(path), "--out", str(tmp_path / "out"), "--workers", "1"])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in error and "--config." not in error  # the runner's flags
    with pytest.raises(SystemExit):  # and the other way round
        replogle.main(["--data", str(tmp_path / "norman.h5ad"), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert "obs has the column 'guide_identity' of the curated Norman et al. 2019 file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # no cell started
    assert norman_ood.main(["--data", str(tmp_path / "norman.h5ad"), "--out", str(tmp_path / "out"), "--list"]) == 0
    # normalised values under a count likelihood: found in the first cells, once, before any cell starts
    normalised = anndata.read_h5ad(tmp_path / "norman.h5ad")
    normalised.layers["counts"] = np.log1p(np.asarray(normalised.layers["counts"].todense()
                                                      if hasattr(normalised.layers["counts"], "todense")
                                                      else normalised.layers["counts"]))
    normalised.write_h5ad(tmp_path / "normalised.h5ad")
    with pytest.raises(SystemExit) as exit_info:
        norman_ood.main(["--data", str(tmp_path / "normalised.h5ad"), "--out", str(tmp_path / "out"), "--list"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "layer 'counts' (its first" in error and "non-integer values" in error
    assert "--set data.counts_layer=<layer>" in error


def test_default_workers_sized_by_cores_and_memory(monkeypatch):
    monkeypatch.setattr(runner, "usable_cores", lambda: list(range(16)))
    monkeypatch.setattr(runner, "available_memory_gb", lambda: 45.0)
    assert runner.default_workers(10.0) == 4  # memory-bound
    assert runner.default_workers(1.0) == 16  # core-bound
    assert runner.default_workers(100.0) == 1


# ------------------------------------------------------------------------ aggregation


def _fake_runs():
    rows = []
    for seed, base in [(0, -100.0), (1, -102.0)]:
        for variant, shift in [("sams_vae", 0.0), ("cpa_vae", -1.0)]:
            for fraction, gain in [(0.0, 0.0), (1.0, 5.0 + seed)]:
                rows.append({"variant": variant, "fraction": fraction, "seed": seed,
                             "IWELBO-test": base + shift + gain, "ATE_pearsonr-test": 0.5 + 0.1 * seed,
                             "ATE_pearsonr_top20-test": 0.8})
    return pd.DataFrame(rows)


def test_relative_iwelbo_mean_std_and_markdown():
    runs = runner.add_relative_iwelbo(_fake_runs(), "sams_vae", fraction=0.0)
    # minus SAMS-VAE at fraction 0 on the same seed
    sams0 = runs[(runs.variant == "sams_vae") & (runs.fraction == 0.0)]
    np.testing.assert_allclose(sams0[runner.RELATIVE], 0.0)
    cpa1 = runs[(runs.variant == "cpa_vae") & (runs.fraction == 1.0)].sort_values("seed")
    np.testing.assert_allclose(cpa1[runner.RELATIVE], [4.0, 5.0])
    table = runner.summarize(runs, runner.STANDARD_METRICS, ["sams_vae", "cpa_vae"])
    assert list(zip(table.variant, table.fraction)) == [("sams_vae", 0.0), ("sams_vae", 1.0), ("cpa_vae", 0.0),
                                                        ("cpa_vae", 1.0)]
    row = table.iloc[3]
    assert row.n_seeds == 2
    assert row[f"{runner.RELATIVE}_mean"] == pytest.approx(4.5)
    assert row[f"{runner.RELATIVE}_std"] == pytest.approx(np.std([4.0, 5.0], ddof=1))
    assert row["test_IWELBO_mean"] == pytest.approx(np.mean([-96.0, -97.0]))
    assert row["ATE_pearson_mean"] == pytest.approx(0.55)
    text = runner.markdown_table(table, runner.STANDARD_METRICS, has_fraction=True)
    lines = text.splitlines()
    assert lines[0] == ("| model | fraction | seeds | test_IWELBO | relative_IWELBO | ATE_pearson | "
                        "ATE_pearson_top20 |")
    assert lines[-1] == "| cpa_vae | 1 | 2 | -96.50 ± 0.71 | 4.50 ± 0.71 | 0.550 ± 0.071 | 0.800 ± 0.000 |"
    # a missing reference run gives NaN, a metric that does not apply "–"
    partial = runner.add_relative_iwelbo(_fake_runs().query("not (variant == 'sams_vae' and seed == 1)"), "sams_vae",
                                         fraction=0.0)
    assert partial.query("seed == 1")[runner.RELATIVE].isna().all()
    one = runner.summarize(partial.assign(mcc=np.nan), runner.STANDARD_METRICS + (("mcc", "MCC"),), ["cpa_vae"])
    assert "| – |" in runner.markdown_table(one, runner.STANDARD_METRICS + (("mcc", "MCC"),), True)
    # the reference is the grid's smallest fraction: without that run (not finished), NaN, not another fraction's
    no_zero = runner.add_relative_iwelbo(_fake_runs().query("not (variant == 'sams_vae' and fraction == 0.0)"),
                                         "sams_vae", fraction=0.0)
    assert no_zero[runner.RELATIVE].isna().all()
    # the relative IWELBO follows the test IWELBO wherever that column is (mask_recovery lists masks first)
    metrics = (("ATE_pearsonr-test", "ATE_pearson"), ("IWELBO-test", "test_IWELBO"))
    header = runner.markdown_table(runner.summarize(runs, metrics, ["sams_vae"]), metrics, True).splitlines()[0]
    assert header == "| model | fraction | seeds | ATE_pearson | test_IWELBO | relative_IWELBO |"


def test_set_may_not_name_what_the_grid_sets_itself():
    grid = runner.Grid("g", (runner.Variant("sams_vae", "simulation"),
                             runner.Variant("sams_vae_K200", "simulation", {"model.n_latent": 200})),
                       seeds=(0,), seed_fields=("seed", "data.split_seed"), fractions=(0.0, 1.0),
                       fraction_field="data.frac_combinations_train", overrides={"model.n_latent": 4})
    for field, message in [("seed", "use --seeds"), ("data.split_seed", "use --seeds"),
                           ("data.frac_combinations_train", "use --fractions"),
                           ("model.n_latent", r"the models differ in it \(\{'sams_vae': 15, 'sams_vae_K200': 200\}\)")]:
        with pytest.raises(ValueError, match=message):
            grid.check_settings({field: 1})
    grid.subset(["sams_vae"]).check_settings({"model.n_latent": 50})  # without the variant that sets it: fine
    cells = dataclasses.replace(grid, settings={"train.max_steps": 7}).cells()
    # a variant keeps its defining field over the grid's (smoke) overrides; --set settings reach every cell
    assert {c.variant: c.config["model"]["n_latent"] for c in cells} == {"sams_vae": 4, "sams_vae_K200": 200}
    assert {c.config["train"]["max_steps"] for c in cells} == {7}
    # set for a run of the other model, the setting leaves the variant it defines as it is (its rows stay)
    cells = dataclasses.replace(grid, settings={"model.n_latent": 50}).cells()
    assert {c.variant: c.config["model"]["n_latent"] for c in cells} == {"sams_vae": 50, "sams_vae_K200": 200}
    # a field that the config files make differ (the model's name) defines the models too
    two_models = runner.Grid("g", (runner.Variant("sams_vae", "simulation"),
                                   runner.Variant("cpa_vae", "cpa_vae_simulation")), seeds=(0,))
    with pytest.raises(ValueError, match="model.name: the models' names define them"):
        two_models.check_settings({"model.name": "svae_plus"})
    with pytest.raises(ValueError, match="model.name: the models' names define them"):  # also one model alone
        two_models.subset(["cpa_vae"]).check_settings({"model.name": "sams_vae"})
    two_models.subset(["cpa_vae"]).check_settings({"model.name": "cpa_vae"})  # its own name: a no-op


# ------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("experiment, fraction", [(norman_ood, 0.0), (norman_ood, 1.0),
                                                  (norman_data_efficiency, 0.0), (replogle, None)])
def test_smoke_data_registers_with_the_paper_configs(tmp_path, experiment, fraction):
    """The synthetic files of --smoke go through the real loaders and splits (no training)."""
    from sams_jax.data import load_data
    from sams_jax.data.anndata_io import DataWarning

    import ml_collections

    grid = experiment.make_grid(_args(smoke=True, out=tmp_path))
    cells = [c for c in grid.cells() if c.fraction == fraction]
    assert len(cells) == len(grid.variants) * 2  # two seeds
    assert cells[0].config["train"]["max_steps"] == 50 and cells[0].evaluation == runner.SMOKE_EVALUATION
    for cell in cells:
        config = ml_collections.ConfigDict(cell.config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)  # SVAE+: test pairs without training cells
            data = load_data(config.data, config.model.likelihood)
        n_members = (data.dosages != 0).sum(1)
        train = data.split == "train"
        assert (n_members[train] == 0).sum() > 0 and train.sum() >= config.train.batch_size
        assert (data.split == "test").sum() > 0
        if experiment is norman_ood and cell.variant == "sams_vae":
            assert ((n_members == 2) & train).any() == (fraction > 0)  # pairs in training only for f > 0
            assert (n_members[data.split == "test"] == 2).all()  # the test split holds held-out pairs


def test_simulation_smoke_end_to_end_skips_finished_cells_and_reports_failures(tmp_path, capsys):
    out = tmp_path / "sim"
    argv = ["--smoke", "--models", "sams_vae,cpa_vae", "--seeds", "0", "--workers", "2", "--out", str(out)]
    assert simulation.main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 cells, 0 already finished, 2 to run with 2 workers" in printed
    for cell in ("sams_vae-s0", "cpa_vae-s0"):
        done = json.loads((out / "runs" / cell / "done.json").read_text())
        assert math.isfinite(done["metrics"]["IWELBO-test"]) and done["config"]["train"]["max_steps"] == 50
        assert (out / "runs" / cell / "eval" / "metrics.json").is_file()
        assert "eval:" in (out / "runs" / cell / "log.txt").read_text()
    runs = pd.read_csv(out / "runs.csv").set_index("variant")
    assert runs.loc["sams_vae", runner.RELATIVE] == 0.0
    assert runs.loc["cpa_vae", runner.RELATIVE] == pytest.approx(
        runs.loc["cpa_vae", "IWELBO-test"] - runs.loc["sams_vae", "IWELBO-test"])
    table = pd.read_csv(out / "table.csv")
    assert list(table.variant) == ["sams_vae", "cpa_vae"] and list(table.n_seeds) == [1, 1]
    assert np.isfinite(table["ATE_pearson_mean"]).all()
    assert np.isfinite(table.loc[0, "mask_F1_mean"]) and np.isnan(table.loc[1, "mask_F1_mean"])  # CPA-VAE: no mask
    text = (out / "table.md").read_text()
    n_cells = len(simulation.make_grid(_args(data=None, smoke=True, out=out)).cells())  # the whole grid
    assert f"2 of {n_cells} runs finished" in text and "| sams_vae | 1 | " in text and "mask_F1" in text
    assert (out / "relative_iwelbo.png").stat().st_size > 0 and (out / "ate_pearson.png").stat().st_size > 0

    # finished cells are skipped
    start = time.perf_counter()
    assert simulation.main(argv) == 0
    assert "2 cells, 2 already finished, 0 to run" in capsys.readouterr().out
    assert time.perf_counter() - start < 15

    # a failing cell: non-zero exit, its log named, failures.txt; the finished cells stay in the table
    bad = ["--smoke", "--models", "sams_vae", "--seeds", "0", "--out", str(out), "--set", "train.batch_size=100000"]
    assert simulation.main(bad) == 1
    printed = capsys.readouterr().out
    assert "FAILED (exit code 1)" in printed and "1 cell(s) failed" in printed
    failures = (out / "failures.txt").read_text()
    assert "sams_vae-s0" in failures and "batch_size" in failures
    assert json.loads((out / "runs" / "sams_vae-s0" / "done.json").read_text())["config"]["train"]["batch_size"] == 32

    # running part of the grid keeps every finished cell of the whole grid in the tables, and a seed
    # outside the grid's own is added to them
    assert simulation.main(["--smoke", "--models", "sams_vae", "--seeds", "7", "--out", str(out)]) == 0
    table = pd.read_csv(out / "table.csv").set_index("variant")
    assert table.loc["sams_vae", "n_seeds"] == 2 and table.loc["cpa_vae", "n_seeds"] == 1


def test_mask_recovery_grid_is_valid():
    """Every variant of the mask-recovery grid is a valid config on the same data and
    training schedule as the paper's; ``--counts`` switches to the count simulation."""
    import ml_collections

    from sams_jax.config import validate_config

    grid = mask_recovery.make_grid(_args(data=None, counts=False))
    cells = grid.cells()
    assert len(cells) == len(mask_recovery.VARIANTS) * 5 and grid.reference == "paper"
    paper = next(c for c in cells if c.variant == "paper" and c.seed == 0).config
    for cell in cells:
        validate_config(ml_collections.ConfigDict(cell.config))
        assert cell.config["data"] == paper["data"] and cell.config["train"] == paper["train"]
    counts = mask_recovery.make_grid(_args(data=None, counts=True)).cells()[0].config
    assert counts["data"]["observation"] == "library_nb" and counts["model"]["likelihood"] == "library_nb"


@pytest.mark.parametrize("resume", [True, False])
def test_a_cell_suggests_a_new_out_only_when_its_folder_holds_another_run(tmp_path, monkeypatch, tiny_config, resume):
    """The runner's hint about --out follows errors about resuming the cell's folder, not
    other configuration errors (a batch larger than the training set, say)."""
    from sams_jax import train as train_lib
    from sams_jax.config import ConfigError

    error = train_lib.ResumeError("holds a run with a different configuration") if resume else \
        ConfigError("train.batch_size=100000 is larger than the training set")

    def fail(*args, **kwargs):
        raise error

    (tmp_path / "cell.json").write_text(json.dumps({"config": tiny_config.to_dict(), "evaluation": {}}))
    monkeypatch.setattr(train_lib, "train_and_evaluate", fail)
    with pytest.raises(SystemExit) as exit_info:
        runner.run_cell(str(tmp_path))
    assert str(exit_info.value.code).startswith(f"error: {error}")
    assert ("use a new --out" in str(exit_info.value.code)) == resume


def test_evaluation_options_reach_every_cell(tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(runner, "run_grid", lambda cells, out, workers: started.extend(cells) or [])
    assert simulation.main(["--smoke", "--models", "sams_vae", "--seeds", "0,1", "--out", str(tmp_path / "out"),
                            "--ate-particles", "64", "--ate-method", "crn", "--ate-metrics-over", "learned"]) == 0
    assert [cell.evaluation for cell in started] == [runner.Evaluation(
        iwelbo_particles=8, ate_particles=64, ate_method="crn", ate_metrics_over="learned", plots=False)] * 2
    assert started[0].spec()["evaluation"]["ate_particles"] == 64  # recorded in cell.json: changed, a cell re-runs
    with pytest.raises(SystemExit) as exit_info:
        simulation.main(["--smoke", "--out", str(tmp_path / "out"), "--iwelbo-particles", "0"])
    assert exit_info.value.code == 2 and "--iwelbo-particles must be at least 1" in capsys.readouterr().err


def test_norman_layers_option_adds_deeper_models(tmp_path, capsys):
    """--layers 1,2,4 (the paper's sweep, SPEC 7): each model again at 2 and 4 layers,
    encoder and decoder alike; the one-layer models keep their names and configs."""
    from experiments import norman

    variants = {v.name: v for v in norman.variants("norman_ood", [1, 2, 4])}
    assert len(variants) == 12 and variants["sams_vae"].overrides == {}
    assert variants["cpa_vae_L4"].config == "cpa_vae_norman_ood"
    assert variants["sams_vae_L2"].overrides == {"model.basal_encoder_n_layers": 2, "model.decoder_n_layers": 2}
    assert norman_data_efficiency.main(["--smoke", "--layers", "1,2", "--models", "sams_vae,sams_vae_L2",
                                        "--seeds", "0", "--out", str(tmp_path / "out"), "--list"]) == 0
    listed = capsys.readouterr().out
    assert "todo  sams_vae_L2-f0-s0" in listed and "cpa_vae" not in listed
    with pytest.raises(SystemExit) as exit_info:  # the depth defines these models: not a --set field
        norman_ood.main(["--smoke", "--layers", "1,2", "--out", str(tmp_path / "o2"), "--list",
                         "--set", "model.decoder_n_layers=3"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:  # one model run alone: its name still defines it
        norman_ood.main(["--smoke", "--models", "cpa_vae", "--out", str(tmp_path / "o2"), "--list",
                         "--set", "model.name=sams_vae"])
    assert exit_info.value.code == 2 and "the models' names define them" in capsys.readouterr().err
    capsys.readouterr()
    # deeper models added to a one-layer sweep: only they run; the tables keep the one-layer reference
    assert norman_ood.main(["--smoke", "--layers", "2", "--seeds", "0", "--out", str(tmp_path / "o3"), "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert {name for name in listed if name not in ("todo", "done")} == \
        {f"{model}_L2-f{f:g}-s0" for model in norman.MODELS for f in (0, 1)}
    # a model named plainly runs at every depth asked for
    assert norman_ood.main(["--smoke", "--layers", "1,2", "--models", "sams_vae", "--seeds", "0", "--fractions", "0",
                            "--out", str(tmp_path / "o3"), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["todo", "sams_vae-f0-s0", "todo", "sams_vae_L2-f0-s0"]
    assert norman_ood.main(["--smoke", "--layers", "2", "--models", "sams_vae", "--seeds", "0", "--fractions", "0",
                            "--out", str(tmp_path / "o3"), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["todo", "sams_vae_L2-f0-s0"]
    args = _args(layers=[2], models=None)
    grid = norman_ood.make_grid(args)
    assert [v.name for v in grid.variants][:4] == list(norman.MODELS) and grid.reference == "sams_vae"
    assert args.models == [f"{model}_L2" for model in norman.MODELS]


def test_tables_gather_runs_finished_with_other_evaluation_options(tmp_path):
    """A subset evaluated with other particle counts must not drop the other finished runs
    from the tables; each row records its own evaluation."""
    grid = runner.Grid("g", (runner.Variant("sams_vae", "simulation"),), seeds=(0,))
    (cell,) = grid.cells()
    directory = runner.cell_dir(tmp_path, cell)
    directory.mkdir(parents=True)
    (directory / "done.json").write_text(json.dumps(dict(cell.spec(), metrics={"IWELBO-test": -1.0}, seconds=1.0)))
    other = dataclasses.replace(grid, evaluation=runner.Evaluation(ate_particles=250))
    (asked,) = other.cells()
    assert not runner.is_done(tmp_path, asked) and runner.is_done(tmp_path, asked, evaluation=False)
    runs = runner.collect(other.cells(), tmp_path)
    assert runs["IWELBO-test"].tolist() == [-1.0] and runs["ate_particles"].tolist() == [2_500]
    # trained with other --set values than asked for now (a subset re-run, or a refused one): still gathered,
    # the difference named per run and in table.md
    changed = dataclasses.replace(grid, settings={"train.max_steps": 75})
    runs = runner.collect(changed.cells(), tmp_path)
    assert runs["IWELBO-test"].tolist() == [-1.0]
    assert json.loads(runs["settings"].iloc[0]) == {"train.max_steps": cell.config["train"]["max_steps"]}
    assert not runner.is_done(tmp_path, changed.cells()[0], evaluation=False)  # to run: the config differs
    runner.aggregate(changed, tmp_path, echo=lambda text: None)
    text = (tmp_path / "table.md").read_text()
    assert "1 of 1 runs finished" in text and "trained with other settings than asked for now (train.max_steps" in text
    assert json.loads(runner.collect(grid.cells(), tmp_path)["settings"].iloc[0]) == {}  # as asked: nothing noted
    assert "evaluated with" not in text  # the paper's evaluation
    spec = cell.spec()
    spec["evaluation"]["ate_particles"] = 32  # one evaluation for all runs, not the paper's: table.md says so
    (directory / "done.json").write_text(json.dumps(dict(spec, metrics={"IWELBO-test": -1.0}, seconds=1.0)))
    runner.aggregate(dataclasses.replace(grid, evaluation=runner.Evaluation(ate_particles=32)), tmp_path,
                     echo=lambda text: None)
    assert "the runs were evaluated with ate_particles=32 (the paper's: 2500)" in (tmp_path / "table.md").read_text()
    older = dict(cell.spec(), metrics={"IWELBO-test": -1.0}, seconds=1.0)  # written before a field existed
    del older["config"]["data"]["gene_symbols_key"]
    (directory / "done.json").write_text(json.dumps(older))
    assert json.loads(runner.collect(grid.cells(), tmp_path)["settings"].iloc[0]) == {}  # it ran with the default
    assert runner.is_done(tmp_path, cell)  # finished: not run again because a later version added a field
    # evaluated before evaluate() counted every observed intervention in the ATE metrics (no ate_metrics_over
    # recorded): where every observed intervention was learned, the metrics are the same (nothing to redo) ...
    del older["evaluation"]["ate_metrics_over"]
    (directory / "done.json").write_text(json.dumps(older))
    assert runner.is_done(tmp_path, cell)
    (directory / "eval").mkdir()
    ate = anndata.AnnData(np.zeros((2, 3), np.float32), obs=pd.DataFrame(
        {"observed": [True, False], "learned": [True, False]}, index=["A", "B+C"]))  # B+C: asked, not observed
    ate.write_h5ad(directory / "eval" / "ate.h5ad")
    assert runner.is_done(tmp_path, cell)
    # ... and where one was not, it was scored over the learned ones only: under the default it is evaluated again
    ate.obs["observed"] = True
    ate.write_h5ad(directory / "eval" / "ate.h5ad")
    assert not runner.is_done(tmp_path, cell) and runner.is_done(tmp_path, cell, evaluation=False)
    assert runner.is_done(tmp_path, dataclasses.replace(grid, evaluation=runner.Evaluation(
        ate_metrics_over="learned")).cells()[0])
    assert runner.collect(grid.cells(), tmp_path)["ate_metrics_over"].tolist() == ["learned"]
