"""Training end to end: CLI, history, checkpoints, resume, determinism, bad input."""

import json
import os
import re
import pathlib
import subprocess
import sys
import warnings

import jax
import numpy as np
import pandas as pd
import pytest

from sams_jax.checkpoint import Checkpointer
from sams_jax.config import ConfigError, validate_config
from sams_jax.data import DataError, load_data
from sams_jax.models import create_model
from sams_jax.objective import ObjectiveConfig, check_objective_variables
from sams_jax.train import (BatchSchedule, config_changes, ResumeWarning, TrainingDiverged, create_optimizer, create_train_state,
                            train_and_evaluate, unknown_field_message)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_cli(*args, cwd=ROOT):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "sams_jax.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _latest_params(workdir, config):
    data = load_data(config.data)
    model = create_model(config.model, data.n_genes, data.n_perturbations)
    target = create_train_state(model, create_optimizer(config.train), data.normalization_stats(
        config.model.normalization), jax.random.key(0))
    ckpt = Checkpointer(str(workdir), read_only=True)
    try:
        return ckpt.restore_state(ckpt.latest_step(), target)
    finally:
        ckpt.close()


def _split_loss(workdir, step, split, scale_of=None):
    """The training objective's loss on ``split`` at checkpoint ``step``, recomputed by hand
    (plate weights from the cells per perturbation of ``scale_of``, default ``split``)."""
    import ml_collections

    from sams_jax.data import plate_scale
    from sams_jax.objective import split_objective

    ckpt = Checkpointer(str(workdir), read_only=True)
    try:
        config = ml_collections.ConfigDict(ckpt.restore_json(step)[0])
        data = load_data(config.data)
        model = create_model(config.model, data.n_genes, data.n_perturbations)
        target = create_train_state(model, create_optimizer(config.train), data.normalization_stats(
            config.model.normalization), jax.random.key(0))
        state = ckpt.restore_state(step, target)
    finally:
        ckpt.close()
    eval_key = jax.random.split(jax.random.key(config.seed), 3)[2]
    scale = plate_scale(data.cells_per_perturbation(scale_of or split))
    objective = ObjectiveConfig.from_config(config.objective)
    return -float(split_objective(model.apply, objective, state.variables, eval_key, data.arrays(split), scale,
                                  config.train.eval_batch_size).mean())


def test_cli_end_to_end(tmp_path):
    workdir = tmp_path / "run"
    result = _run_cli("--config", "configs/test.py", "--workdir", str(workdir), "--config.train.max_steps=40",
                      "--config.train.progress=True")
    assert result.returncode == 0, result.stderr[-3000:]
    # stderr is a pipe here, not a terminal: one progress line per evaluation instead of a bar's redraws
    progress = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in progress] == ["step 20/40", "step 40/40"] and "\r" not in result.stderr
    history = pd.read_csv(workdir / "history.csv")
    assert list(history.columns) == ["step", "train_loss", "val_loss", "cells_per_s", "elapsed_s", "mask_density",
                                     "mask_f1"]
    assert history["mask_f1"].between(0, 1).all() and history["mask_density"].between(0, 1).all()
    assert history["step"].tolist() == [20, 40]
    assert np.all(np.isfinite(history[["train_loss", "val_loss"]].to_numpy()))
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert np.isfinite(metrics["test/IWELBO"]) and metrics["test/IWELBO"] < 0
    assert {"mask_precision", "mask_recall", "mask_f1", "val/IWELBO"} <= set(metrics)
    assert metrics == json.loads(result.stdout[result.stdout.index("{"):])
    # the best checkpoint's losses (SPEC 3): validation as in the history, test with the test split's own N_t
    best = history.set_index("step").loc[metrics["best_step"], "val_loss"]
    np.testing.assert_allclose(metrics["val/loss"], best, rtol=1e-6)
    np.testing.assert_allclose(metrics["test/loss"], _split_loss(workdir, metrics["best_step"], "test"), rtol=1e-5)
    assert metrics["test/loss"] != pytest.approx(_split_loss(workdir, metrics["best_step"], "test", scale_of="train"))
    # ... and validation (the history's and the best checkpoint's) with the validation split's own N_t
    np.testing.assert_allclose(metrics["val/loss"], _split_loss(workdir, metrics["best_step"], "val"), rtol=1e-5)
    assert metrics["val/loss"] != pytest.approx(_split_loss(workdir, metrics["best_step"], "val", scale_of="train"))
    # running the same command again resumes from the latest checkpoint: nothing to do
    again = _run_cli("--config", "configs/test.py", "--workdir", str(workdir), "--config.train.max_steps=40")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((workdir / "metrics.json").read_text()) == metrics
    assert pd.read_csv(workdir / "history.csv")["step"].tolist() == [20, 40]


@pytest.mark.parametrize("override, message", [
    ("--config.model.likelihood=gaussian", "model.likelihood='gaussian' is not allowed; choose one of"),
    ("--config.model.guide=full", "model.guide='full' is not allowed"),
    ("--config.objective.n_particles=0", "objective.n_particles=0 is out of range"),
    ("--config.seed=-1", "seed=-1 is out of range"),
    ("--config.train.batch_size=100000", "train.batch_size=100000 is larger than the training set"),
    ("--config.objective.variable_weights=masks=2", "objective.variable_weights names 'masks', which this model "
                                                    "does not have; its variables: ['embedding', 'mask', 'z_basal']"),
])
def test_cli_bad_input_is_a_clear_error_without_traceback(tmp_path, override, message):
    workdir = tmp_path / "bad"
    result = _run_cli("--config", "configs/test.py", "--workdir", str(workdir), override)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()  # nothing written, nothing compiled


@pytest.mark.parametrize("override, message", [
    ("--config.train.lr=0.1", "error: unknown config field 'train.lr'; fields of train: ['batch_size', "),
    ("--config.model.likelihod=normal", "error: unknown config field 'model.likelihod'; did you mean "
                                        "'model.likelihood'?"),
    ("--config.trian.max_steps=1", "error: unknown config field 'trian' (in --config.trian.max_steps); did you "
                                   "mean 'train'?"),
])
def test_cli_unknown_field_is_rejected_on_one_line(tmp_path, override, message):
    result = _run_cli("--config", "configs/test.py", "--workdir", str(tmp_path / "x"), override)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message) and len(result.stderr.strip().splitlines()) == 1


def test_a_second_run_in_a_work_directory_in_use_is_refused(tiny_config, tmp_path, monkeypatch):
    """Two runs in one work directory would overwrite each other's checkpoints: while one
    holds it, another is a ConfigError naming the holder, before it reads its data; the
    lock goes with the run."""
    import sams_jax.train
    from sams_jax.train import LOCK_FILE, _claim_workdir

    def read_data(*args, **kwargs):
        raise AssertionError("the data were read")

    workdir = tmp_path / "w"
    workdir.mkdir()
    with _claim_workdir(str(workdir)):
        assert f"process {os.getpid()}" in (workdir / LOCK_FILE).read_text()
        with monkeypatch.context() as patch:
            patch.setattr(sams_jax.train, "load_data", read_data)
            with pytest.raises(ConfigError, match=rf"--workdir '{workdir}' is in use by another run \(process "
                                                  rf"{os.getpid()} on .*\); two runs in one work directory"):
                train_and_evaluate(tiny_config, str(workdir))
        assert f"process {os.getpid()}" in (workdir / LOCK_FILE).read_text()  # the holder's record is kept
    assert (workdir / LOCK_FILE).read_text() == ""  # released
    with _claim_workdir(str(workdir)):
        pass
    assert sorted(path.name for path in workdir.iterdir()) == [LOCK_FILE]  # the refused run wrote nothing
    from sams_jax.train import _refuse_busy_workdir

    other = tmp_path / "other"
    other.mkdir()
    _refuse_busy_workdir(str(other))  # no lock file: no run holds it, and none is created
    assert list(other.iterdir()) == []


def test_cli_config_file_that_fails_to_load_or_unusable_workdir_is_one_line(tmp_path):
    """A config file with a syntax error (or one that raises) and a --workdir that cannot
    be a directory are one-line errors, exit code 2, without a traceback."""
    from sams_jax.train import _config_file_failure, _make_workdir

    broken = tmp_path / "broken.py"
    broken.write_text("from sams_jax.config import base_config\n\ndef get_config(:\n    pass\n")
    result = _run_cli("--config", str(broken), "--workdir", str(tmp_path / "x"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: the config file {str(broken)!r} failed to load (SyntaxError: invalid "
                                     "syntax, line 3); it must define get_config() returning an "
                                     "ml_collections.ConfigDict, as configs/*.py do")
    misspelt = tmp_path / "misspelt.py"  # reads a field that does not exist: not an override's fault
    misspelt.write_text("from sams_jax.config import base_config\n\ndef get_config():\n    config = base_config()\n"
                        "    config.train.max_stepz += 1\n    return config\n")
    result = _run_cli("--config", str(misspelt), "--workdir", str(tmp_path / "x"))
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: the config file {str(misspelt)!r} failed to load (AttributeError: max_stepz; Did you mean "
        "\"max_steps\" instead of \"max_stepz\"?, line 5); it must define get_config() returning an "
        "ml_collections.ConfigDict, as configs/*.py do")
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config():\n    raise RuntimeError('no such screen')\n")
    try:
        exec(compile(raising.read_text(), str(raising), "exec"), namespace := {})
        namespace["get_config"]()
    except RuntimeError as error:
        assert _config_file_failure(error, str(raising)).startswith(
            f"the config file {str(raising)!r} failed to load (RuntimeError: no such screen, line 2)")
    (tmp_path / "afile").write_text("")
    for workdir, reason in ((tmp_path / "afile", "File exists"), (tmp_path / "afile" / "run", "Not a directory")):
        with pytest.raises(ConfigError, match=rf"cannot use --workdir '{workdir}' as the run's directory \({reason}"):
            _make_workdir(str(workdir))


@pytest.mark.parametrize("field, message", [
    ("model.likelihod", "unknown config field 'model.likelihod'; did you mean 'model.likelihood'?"),
    ("train.distributed.num_processs", "did you mean 'train.distributed.num_processes'?"),
    ("seeed", "unknown config field 'seeed'; did you mean 'seed'?"),
    ("model.zzz", "unknown config field 'model.zzz'; fields of model: ['basal_encoder_n_hidden', "),
    ("model.n_latent.x", "config field 'model.n_latent' is a value, not a section"),
    ("train.max_steps", None),
])
def test_unknown_field_message_names_the_field_and_a_suggestion(tiny_config, field, message):
    got = unknown_field_message(tiny_config, field)
    assert got is None if message is None else message in got


def test_a_config_file_setting_an_unknown_field_is_refused(tiny_config, tmp_path):
    """A misspelling in a config file (not locked like --config overrides) would add a field
    nothing reads; validation names it, with the closest known field."""
    tiny_config.model.likelihod = "poisson"  # what `config.model.likelihod = ...` in a config file does
    with pytest.raises(ConfigError, match=r"unknown config field 'model.likelihod'; did you mean "
                                          r"'model.likelihood'\?.*nothing would read them"):
        validate_config(tiny_config)
    with pytest.raises(ConfigError, match="model.likelihod"):
        train_and_evaluate(tiny_config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("field, value, message", [
    ("model.normalization", "log", "model.normalization='log' is not allowed"),
    ("model.name", "vae", "model.name='vae' is not allowed"),
    ("model.mask_prior_prob", 1.5, "model.mask_prior_prob=1.5"),
    ("train.learning_rate", 0.0, "train.learning_rate=0.0 is out of range"),
    ("model.decoder_n_layers", 0, "model.decoder_n_layers=0 is out of range"),
    ("objective.kind", "elbo2", "objective.kind='elbo2' is not allowed"),
    ("objective.variable_weights", "mask", "objective.variable_weights: cannot parse 'mask'"),
    ("model.mask_init_logits", float("nan"), "model.mask_init_logits=nan must be a number (finite)"),
    ("model.embedding_prior_scale", float("inf"), "model.embedding_prior_scale=inf must be a number (finite)"),
    ("objective.variable_weights", "mask=nan", "objective.variable_weights='mask=nan': multipliers must be finite"),
    ("objective.variable_weights", "mask=1,mask=2", "names ['mask'] more than once"),
    # annealing needs both fields: either alone would silently anneal nothing
    ("objective.initial_variable_weights", "mask=500", "objective.initial_variable_weights is set but "
                                                       "objective.weight_anneal_steps is not"),
    ("objective.weight_anneal_steps", 30, "objective.weight_anneal_steps is set but "
                                          "objective.initial_variable_weights is not"),
])
def test_validate_config_names_field_and_allowed_values(tiny_config, field, value, message):
    section, key = field.split(".")
    tiny_config[section][key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(tiny_config)


@pytest.mark.parametrize("field, value, message", [
    ("variable_weights", "masks=2", "objective.variable_weights names 'masks', which this model does not have"),
    ("initial_variable_weights", "foo=3", "objective.initial_variable_weights names 'foo', which this model does "
                                          "not have; its variables: ['embedding', 'mask', 'z_basal']"),
    ("per_cell_variables", "foo", "objective.per_cell_variables names 'foo', which this model does not have"),
    ("per_cell_variables", "z_basal", "objective.per_cell_variables names 'z_basal', which is not a "
                                      "perturbation-plated variable of this model.*plated variables: "
                                      "['embedding', 'mask']"),
])
def test_objective_options_naming_unknown_variables_are_config_errors(tiny_config, tmp_path, field, value,
                                                                      message):
    tiny_config.objective[field] = value
    if field == "initial_variable_weights":
        tiny_config.objective.weight_anneal_steps = 10
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace("[", "\\[")):
        train_and_evaluate(tiny_config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()  # nothing written


def test_objective_options_naming_the_models_variables_pass(tiny_config):
    data = load_data(tiny_config.data)
    model = create_model(tiny_config.model, data.n_genes, data.n_perturbations)
    state = create_train_state(model, create_optimizer(tiny_config.train), data.normalization_stats(
        tiny_config.model.normalization), jax.random.key(0))
    tiny_config.objective.update(variable_weights="mask=0.5,z_basal=2", initial_variable_weights="mask=10",
                                 weight_anneal_steps=10, per_cell_variables="mask,embedding", analytic_kl="mask")
    check_objective_variables(model.apply, state.variables, data.cell_arrays(data.rows("train")[:1]),
                              ObjectiveConfig.from_config(tiny_config.objective))


def test_non_finite_data_is_rejected_before_anything_is_written(tiny_config, tmp_path):
    data = load_data(tiny_config.data)
    data.x[0, 0] = np.inf
    with pytest.raises(DataError, match="non-finite"):
        train_and_evaluate(tiny_config, str(tmp_path / "w"), data=data)
    assert not (tmp_path / "w").exists()


def test_data_without_validation_cells_are_rejected_before_anything_is_written(tiny_config, tmp_path):
    """The best checkpoint is chosen by the validation loss: a split without 'val' cells is
    a DataError naming the split key and the fix, not a division by zero at step
    ``eval_every``."""
    data = load_data(tiny_config.data)
    data.split[data.split == "val"] = "train"
    tiny_config.data.split_key = "fold"
    with pytest.raises(DataError, match=r"obs\['fold'\] has no 'val' values.*label some cells 'val'"):
        train_and_evaluate(tiny_config, str(tmp_path / "w"), data=data)
    assert not (tmp_path / "w").exists()


def test_resumed_run_equals_uninterrupted_run_and_is_deterministic(tiny_config, tmp_path):
    tiny_config.train.max_steps = 40
    train_and_evaluate(tiny_config, str(tmp_path / "full"))
    tiny_config.train.max_steps = 20
    train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
    first_row = (tmp_path / "resumed" / "history.csv").read_text().splitlines()[1]
    tiny_config.train.max_steps = 40
    with pytest.warns(ResumeWarning, match=r"holds a finished run of 20 steps: continuing it to "
                                           r"train.max_steps=40 \(--config.train.max_steps=20 evaluates it again"):
        train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
    assert (tmp_path / "resumed" / "history.csv").read_text().splitlines()[1] == first_row  # rewritten as it was
    full = _latest_params(tmp_path / "full", tiny_config)
    resumed = _latest_params(tmp_path / "resumed", tiny_config)
    assert int(full.step) == int(resumed.step) == 40
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    history = pd.read_csv(tmp_path / "resumed" / "history.csv")
    assert history["step"].tolist() == [20, 40]
    # a different seed gives different parameters
    tiny_config.seed = 1
    tiny_config.train.max_steps = 20
    train_and_evaluate(tiny_config, str(tmp_path / "other_seed"))
    other = _latest_params(tmp_path / "other_seed", tiny_config)
    assert not np.array_equal(np.asarray(other.params["mask_logits"]), np.asarray(full.params["mask_logits"]))


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one(tiny_config, tmp_path):
    """A preemption notice (SIGTERM, as SLURM sends) to a single-process run: a checkpoint
    at the step reached (never the best: no validation there), exit code 143 and a line
    that says so; the same config resumes from it to the same parameters, bit for bit, as
    a run that was never stopped."""
    import signal
    import time

    workdir = tmp_path / "preempted"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "sams_jax.train", "--config", "configs/test.py", "--workdir",
                                str(workdir), "--config.train.max_steps=1000000", "--config.train.eval_every=100"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (workdir / "history.csv").exists():
            assert time.monotonic() < deadline and process.poll() is None, process.communicate()[1][-2000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stderr[-3000:]
    assert "sams_jax: SIGTERM received: saving a checkpoint after the current dispatch" in stderr
    found = re.search(r"stopped on a preemption notice \(SIGTERM\) at step (\d+), after saving a checkpoint there; "
                      r"run the same command again to resume from it", stderr)
    assert found and "Traceback" not in stderr, stderr[-3000:]
    stopped_at = int(found.group(1))
    assert stopped_at % 10 == 0 and stopped_at >= 100  # after a dispatch of train.steps_per_dispatch=10 steps
    checkpointer = Checkpointer(str(workdir), read_only=True)
    assert checkpointer.latest_step() == stopped_at and checkpointer.best_step() % 100 == 0
    checkpointer.close()

    tiny_config.train.update(max_steps=(stopped_at // 100 + 2) * 100, eval_every=100)
    resumed = train_and_evaluate(tiny_config, str(workdir))
    uninterrupted = train_and_evaluate(tiny_config, str(tmp_path / "uninterrupted"))
    assert resumed == uninterrupted
    a, b = _latest_params(workdir, tiny_config), _latest_params(tmp_path / "uninterrupted", tiny_config)
    assert int(a.step) == int(b.step) == tiny_config.train.max_steps
    for left, right in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right))


def test_checkpoint_round_trip_and_best_checkpoint(tiny_config, tmp_path):
    tiny_config.train.max_steps = 60
    train_and_evaluate(tiny_config, str(tmp_path))
    ckpt = Checkpointer(str(tmp_path), read_only=True)
    history = pd.read_csv(tmp_path / "history.csv")
    best_row = history.loc[history["val_loss"].idxmin()]
    assert ckpt.best_step() == int(best_row["step"])
    assert ckpt.latest_step() == 60
    config, metadata = ckpt.restore_json(ckpt.best_step())
    assert config["model"]["n_latent"] == tiny_config.model.n_latent
    assert metadata["perturbation_names"] == [str(i) for i in range(tiny_config.data.n_perturbations)]
    assert len(metadata["normalization_stats"]["mean"]) == tiny_config.data.n_genes
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 7"):
        ckpt.resolve(7)
    ckpt.close()


def test_resume_refuses_or_warns_about_changed_settings(tiny_config, tmp_path):
    tiny_config.train.update(max_steps=20, eval_every=10, steps_per_dispatch=10)
    train_and_evaluate(tiny_config, str(tmp_path))
    # cells_per_s leaves out dispatches that compiled: the first row has only such a dispatch
    history = pd.read_csv(tmp_path / "history.csv")
    assert np.isnan(history["cells_per_s"][0]) and history["cells_per_s"][1] > 0

    def changed(**fields):
        config = tiny_config.copy_and_resolve_references()
        for field, value in fields.items():
            section, key = field.split("__")
            config[section][key] = value
        return config

    for fields, message in [
        ({"model__n_latent": 4, "objective__n_particles": 3},
         r"model\.n_latent=3 in the saved run, 4 now; objective\.n_particles=2 in the saved run, 3 now"),
        ({"train__max_steps": 10}, r"already holds 20 training steps, more than train\.max_steps=10"),
        ({"train__max_steps": 30, "train__grad_clip_norm": 1.0},
         r"train\.grad_clip_norm=0\.0 in the saved run, 1\.0 now.*optimizer's state"),
    ]:
        with pytest.raises(ConfigError, match=message):
            train_and_evaluate(changed(**fields), str(tmp_path))
    # another learning rate is a warning naming both values; steps_per_dispatch changes silently; a larger
    # max_steps continues the finished run, which is said
    with pytest.warns(ResumeWarning) as record:
        results = train_and_evaluate(changed(train__max_steps=30, train__learning_rate=2e-3,
                                             train__steps_per_dispatch=5), str(tmp_path))
    resume_warnings = [str(w.message) for w in record if issubclass(w.category, ResumeWarning)]
    assert len(resume_warnings) == 2 and "resumes at step 20" in resume_warnings[0]
    assert "holds a finished run of 20 steps: continuing it to train.max_steps=30" in resume_warnings[1]
    assert "(train.learning_rate=0.001 in the saved run, 0.002 now)" in resume_warnings[0]
    assert results["steps"] == 30
    # the data shards in effect decide the batches (the saved run records them): data_shards=0 is one per
    # process (here 1), so 0 -> 2 and 2 -> 1 warn, and 2 -> 2 and 1 -> 0 do not
    with pytest.warns(ResumeWarning, match=r"train\.data_shards \(shards in effect\)=1 in the saved run, 2 now"):
        train_and_evaluate(changed(train__max_steps=40, train__learning_rate=2e-3, train__data_shards=2), str(tmp_path))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*data_shards", ResumeWarning)  # (continuing: said)
        train_and_evaluate(changed(train__max_steps=50, train__learning_rate=2e-3, train__data_shards=2), str(tmp_path))
    with pytest.warns(ResumeWarning, match=r"train\.data_shards \(shards in effect\)=2 in the saved run, 1 now"):
        train_and_evaluate(changed(train__max_steps=60, train__learning_rate=2e-3, train__data_shards=1), str(tmp_path))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*data_shards", ResumeWarning)  # (continuing: said)
        train_and_evaluate(changed(train__max_steps=70, train__learning_rate=2e-3, train__data_shards=0), str(tmp_path))
    elapsed = pd.read_csv(tmp_path / "history.csv")["elapsed_s"].to_numpy()  # across the six resumes
    assert len(elapsed) == 7 and np.all(np.diff(elapsed) > 0), elapsed


def test_runs_saved_with_an_annealing_that_did_nothing_resume_with_no_annealing(tiny_config):
    """Configs with weight_anneal_steps but no initial_variable_weights (an annealing that
    changed nothing) are refused now; runs saved with one resume with weight_anneal_steps=0,
    while a real annealing is still a change of objective."""
    saved = json.loads(tiny_config.to_json_best_effort())
    saved["objective"]["weight_anneal_steps"] = 30
    assert config_changes(saved, tiny_config) == []
    saved["objective"]["initial_variable_weights"] = "mask=10"
    assert [field for field, _, _ in config_changes(saved, tiny_config)] == [
        "objective.initial_variable_weights", "objective.weight_anneal_steps"]
    tiny_config.objective.weight_anneal_steps = 30
    with pytest.raises(ConfigError, match=r"resumes with weight_anneal_steps=0"):
        validate_config(tiny_config)


def test_resume_ignores_config_fields_the_model_does_not_use(tiny_config, tmp_path):
    """A field the model ignores (the Beta prior of SAMS-VAE's Bernoulli mask, or
    beta-Bernoulli's unused mask_prior_prob) may change on resume; one it uses may not."""
    from sams_jax.train import _check_resume

    def saved_with(**fields):
        saved = json.loads(tiny_config.to_json_best_effort())
        saved["model"].update(fields)
        return saved

    _check_resume(saved_with(mask_beta_a=3.0), tiny_config, "w", 0, None)  # sams_vae: no Beta prior
    with pytest.raises(ConfigError, match=r"model\.mask_prior_prob=0\.5 in the saved run"):
        _check_resume(saved_with(mask_prior_prob=0.5), tiny_config, "w", 0, None)
    tiny_config.model.name = "sams_vae_beta_bernoulli"
    _check_resume(saved_with(name="sams_vae_beta_bernoulli", mask_prior_prob=0.5), tiny_config, "w", 0, None)
    with pytest.raises(ConfigError, match=r"model\.mask_beta_a=3\.0 in the saved run, 1\.0 now"):
        _check_resume(saved_with(name="sams_vae_beta_bernoulli", mask_beta_a=3.0), tiny_config, "w", 0, None)
    with pytest.raises(ConfigError, match=r"model\.name='sams_vae' in the saved run"):  # another model: all count
        _check_resume(saved_with(name="sams_vae", mask_beta_a=3.0), tiny_config, "w", 0, None)


def test_non_finite_loss_stops_with_step_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
    tiny_config.train.max_steps = 20
    train_and_evaluate(tiny_config, str(tmp_path))
    tiny_config.train.update(max_steps=60, learning_rate=1e30)
    with pytest.raises(TrainingDiverged, match=r"non-finite training loss at step (2\d|3\d|4\d|5\d); "
                                               r"the last good checkpoint is step 20"), \
            pytest.warns(ResumeWarning, match=r"train\.learning_rate=0\.001 in the saved run, 1e\+30 now"):
        train_and_evaluate(tiny_config, str(tmp_path))
    tiny_config.train.learning_rate = 1e-3
    params = _latest_params(tmp_path, tiny_config)
    assert int(params.step) == 20
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(params.params))
    # diverging before the first checkpoint says that none was written
    tiny_config.train.learning_rate = 1e30
    with pytest.raises(TrainingDiverged, match=r"non-finite training loss at step \d+; no checkpoint was written "
                                               r"\(the first would have been at step 20\)"):
        train_and_evaluate(tiny_config, str(tmp_path / "fresh"))


def test_batch_schedule_is_a_pure_function_of_seed_and_step():
    schedule = BatchSchedule(n_train=10, batch_size=4, seed=0)
    whole = schedule.indices(0, 5)  # 20 positions = 2 epochs
    np.testing.assert_array_equal(np.sort(whole.reshape(-1)[:10]), np.arange(10))  # epoch 0 uses each cell once
    np.testing.assert_array_equal(np.sort(whole.reshape(-1)[10:]), np.arange(10))
    np.testing.assert_array_equal(BatchSchedule(10, 4, 0).indices(2, 3), whole[2:])
    assert not np.array_equal(BatchSchedule(10, 4, 1).indices(0, 5), whole)


def test_training_learns_the_simulation(tiny_config, tmp_path):
    """Recovery: held-out IWELBO improves substantially over the untrained model, and the
    learned embeddings reproduce the true effect sizes' scale."""
    tiny_config.train.update(max_steps=0)
    untrained = train_and_evaluate(tiny_config, str(tmp_path / "untrained"))
    tiny_config.train.update(max_steps=1500, eval_every=500, steps_per_dispatch=100)
    trained = train_and_evaluate(tiny_config, str(tmp_path / "trained"))
    assert trained["test/IWELBO"] > untrained["test/IWELBO"] + 5.0
    assert trained["best_step"] > 0


def test_mask_learning_rate_applies_to_mask_logits_only():
    """Adam's first step moves each parameter by about its learning rate (sign of the
    gradient): the mask logits by train.mask_learning_rate, the rest by learning_rate;
    with mask_learning_rate = 0 the optimizer is the plain one."""
    import jax.numpy as jnp
    import ml_collections
    import optax

    params = {"mask_logits": jnp.zeros((3, 2)), "decoder": {"kernel": jnp.zeros((2, 2))}}
    grads = jax.tree.map(lambda v: jnp.full_like(v, 0.3), params)
    base = dict(grad_clip_norm=0.0, weight_decay=0.0, learning_rate=1e-3)
    optimizer = create_optimizer(ml_collections.ConfigDict({**base, "mask_learning_rate": 5e-2}))
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    np.testing.assert_allclose(updates["mask_logits"], -5e-2, rtol=1e-4)
    np.testing.assert_allclose(updates["decoder"]["kernel"], -1e-3, rtol=1e-4)
    plain = create_optimizer(ml_collections.ConfigDict({**base, "mask_learning_rate": 0.0}))
    updates, _ = plain.update(grads, plain.init(params), params)
    np.testing.assert_allclose(updates["mask_logits"], -1e-3, rtol=1e-4)
    reference = optax.adam(1e-3)
    assert jax.tree.structure(plain.init(params)) == jax.tree.structure(optax.chain(reference).init(params))


def test_normal_likelihood_on_raw_counts_is_warned_about(tiny_config):
    """A normal likelihood asked of raw counts (it fits them poorly and can diverge) gets a
    DataWarning naming the count likelihoods, and log-normalised values under
    log_standardize one naming standardize; normal-valued data get none."""
    from sams_jax.config import validate_against_data
    from sams_jax.data.anndata_io import DataWarning

    data = load_data(tiny_config.data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_against_data(tiny_config, data)
    data.x = np.round(np.abs(data.x) * 30)  # whole numbers reaching 20 and beyond
    with pytest.warns(DataWarning, match=r"model.likelihood='normal', but x looks like raw counts.*"
                                         r"model.likelihood='library_nb'"):
        validate_against_data(tiny_config, data)
    tiny_config.model.likelihood = "poisson"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_against_data(tiny_config, data)
    # log-normalised values (log1p of CP10k) under log_standardize would be logged again
    tiny_config.model.update(likelihood="normal", normalization="log_standardize")
    data.x = np.log1p(data.x / np.maximum(data.x.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
    with pytest.warns(DataWarning, match=r"x looks log-transformed already \(values from 0 to [\d.]+, not whole "
                                         r"numbers.*--config.model.normalization=standardize"):
        validate_against_data(tiny_config, data)
    tiny_config.model.normalization = "standardize"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_against_data(tiny_config, data)


def test_weight_decay_is_l2_added_to_the_gradient_before_adam():
    """train.weight_decay is PyTorch-style L2: wd * p added to the gradient, then Adam.
    With zero gradients Adam's first step normalises wd * p to -lr * sign(p); over several
    steps the updates equal optax's add_decayed_weights followed by adam."""
    import jax.numpy as jnp
    import ml_collections
    import optax

    from sams_jax.config import base_config

    train = ml_collections.ConfigDict(base_config().train.to_dict())
    train.update(weight_decay=0.1, learning_rate=1e-3, grad_clip_norm=0.0)
    optimizer = create_optimizer(train)
    params = {"w": jnp.array([2.0, -2.0])}
    updates, _ = optimizer.update({"w": jnp.zeros(2)}, optimizer.init(params), params)
    np.testing.assert_allclose(updates["w"], [-1e-3, 1e-3], rtol=1e-4)

    reference = optax.chain(optax.add_decayed_weights(0.1), optax.adam(1e-3))
    state, ref_state = optimizer.init(params), reference.init(params)
    ours, ref = params, params
    for key in jax.random.split(jax.random.key(0), 3):
        grads = {"w": jax.random.normal(key, (2,))}
        updates, state = optimizer.update(grads, state, ours)
        ref_updates, ref_state = reference.update(grads, ref_state, ref)
        np.testing.assert_allclose(updates["w"], ref_updates["w"], rtol=1e-6)
        ours, ref = optax.apply_updates(ours, updates), optax.apply_updates(ref, ref_updates)


def test_checkpointer_keeps_latest_and_best_by_validation_loss(tmp_path):
    """Steps 1, 2, 3 saved with val losses 3, 1, 2: the best is step 2, the latest step 3,
    only those two are kept, and restoring the best gives step 2's state."""
    def state(step):
        return {"w": np.full((3,), float(step), np.float32), "step": np.asarray(step, np.int32)}

    ckpt = Checkpointer(str(tmp_path))
    try:
        for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0)]:
            ckpt.save(step, state(step), loss, {"step": step}, {"note": "x"})
        assert ckpt.best_step() == 2
        assert ckpt.latest_step() == 3
        assert sorted(ckpt.steps()) == [2, 3]
        restored = ckpt.restore_state(ckpt.best_step(), state(0))
        np.testing.assert_array_equal(restored["w"], state(2)["w"])
        assert int(restored["step"]) == 2
        assert ckpt.restore_json(2)[0] == {"step": 2}
    finally:
        ckpt.close()
