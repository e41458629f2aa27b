"""Two processes on localhost (CPU, Gloo collectives) train like one process.

Each process is a subprocess that joins the run with ``jax.distributed.initialize``
(through ``sams_jax.distributed.initialize`` and the config), holds one of the two shards
of the training cells and builds its half of every batch. A single process with
``train.data_shards=2`` draws the same batches, so it must reach the same parameters and
metrics up to float rounding (the gradient sum runs in a different order).
"""

import json
import os
import re
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from ml_collections import ConfigDict

from sams_jax import distributed
from sams_jax.config import ConfigError, validate_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    from configs import test as test_config
    from sams_jax import distributed
    from sams_jax.checkpoint import Checkpointer
    from sams_jax.data import load_data
    from sams_jax.models import create_model
    from sams_jax.train import create_optimizer, create_train_state, train_and_evaluate

    workdir, address, process_id = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = test_config.get_config()
    config.train.update(max_steps=20, eval_every=10, steps_per_dispatch=10, data_shards=2)
    if address:
        config.train.distributed.update(coordinator_address=address, num_processes=2, process_id=process_id)
    assert distributed.initialize(config) == bool(address)
    results = train_and_evaluate(config, workdir)

    # this process's copy of the final parameters, from the checkpoint all processes wrote
    data = load_data(config.data)
    model = create_model(config.model, data.n_genes, data.n_perturbations)
    target = create_train_state(model, create_optimizer(config.train),
                                data.normalization_stats(config.model.normalization), jax.random.key(0))
    parallel = distributed.DataParallel()
    checkpointer = Checkpointer(workdir)
    state = checkpointer.restore_state(checkpointer.latest_step(), parallel.replicate(target))
    checkpointer.close()
    params = np.concatenate([np.ravel(p) for p in jax.tree.leaves(parallel.local(state.params))])
    print("RESULT " + json.dumps({{"process": jax.process_index(), "processes": jax.process_count(),
                                   "devices": jax.device_count(), "metrics": results,
                                   "params": params.tolist()}}))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _result(proc) -> dict:
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_two_processes_match_one_process(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    env.pop(distributed.ENV_FLAG, None)
    script = DRIVER.format(root=str(ROOT))
    address = f"localhost:{_free_port()}"

    def launch(workdir, address, process_id):
        return subprocess.Popen([sys.executable, "-c", script, str(workdir), address, str(process_id)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [launch(tmp_path / "two", address, i) for i in range(2)] + [launch(tmp_path / "one", "", -1)]
    *two, one = [_result(p) for p in procs]

    assert [r["process"] for r in two] == [0, 1] and two[0]["processes"] == 2 and two[0]["devices"] == 2
    assert one["processes"] == 1
    # the processes agree exactly: replicated parameters, metrics computed by each
    assert two[0]["params"] == two[1]["params"]
    assert two[0]["metrics"] == two[1]["metrics"]
    # and match one process drawing the same batches
    np.testing.assert_allclose(two[0]["params"], one["params"], atol=1e-5)
    for key in ("val/IWELBO", "test/IWELBO"):
        assert abs(two[0]["metrics"][key] - one["metrics"][key]) < 1e-4 * abs(one["metrics"][key])
    # process 0 wrote the files, once
    assert (tmp_path / "two" / "metrics.json").exists() and (tmp_path / "two" / "history.csv").exists()
    assert json.loads((tmp_path / "two" / "metrics.json").read_text()) == two[0]["metrics"]


@pytest.mark.parametrize("fields, message", [
    ({"coordinator_address": "localhost:1234"}, "train.distributed.num_processes (>= 1) and"),
    ({"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 2}, "0 <= id < num_processes"),
    ({"coordinator_address": "localhost"}, "must be 'host:port'"),
    ({"num_processes": 2}, "needs train.distributed.coordinator_address"),
    ({"local_device_ids": "0;1"}, "comma-separated device numbers"),
    # decided by the process count alone: refused before joining (a lone process waited for the timeout)
    ({"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 0, "data_shards": 3},
     "train.data_shards=3 must be a multiple of the number of processes (2)"),
    ({"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 0, "data_placement": "host"},
     "supports a single process only; this run has 2 processes"),
    ({"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 0, "batch_size": 31},
     "train.batch_size=31 must be a multiple of the data shards (2: train.data_shards, or one per process) and of "
     "the devices of all processes; e.g. train.batch_size=30"),
    ({"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 0, "backed": True},
     "data.backed=True with train.data_placement='auto' streams the training cells from the host"),
])
def test_bad_distributed_settings_are_clear_errors(tiny_config, monkeypatch, fields, message):
    monkeypatch.delenv(distributed.ENV_FLAG, raising=False)
    train_fields = {key: fields.pop(key) for key in ("data_shards", "data_placement", "batch_size") if key in fields}
    if fields.pop("backed", False):
        tiny_config.data.update(backed=True, source="anndata", path="screen.h5ad")
    tiny_config.train.update(train_fields)
    tiny_config.train.distributed.update(fields)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(tiny_config)


def test_num_processes_with_the_cluster_flag_needs_no_coordinator_in_the_config(tiny_config, monkeypatch):
    """JAX_COORDINATOR_ADDRESS (or SLURM) gives the coordinator under SAMS_JAX_DISTRIBUTED=1."""
    monkeypatch.setenv(distributed.ENV_FLAG, "1")
    tiny_config.train.distributed.update(num_processes=2, process_id=0)
    validate_config(tiny_config)


def test_coordinator_port_in_use_is_a_config_error(tiny_config, monkeypatch):
    """Process 0 checks its coordinator port before joining (JAX's runtime segfaulted)."""
    monkeypatch.delenv(distributed.ENV_FLAG, raising=False)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        tiny_config.train.distributed.update(coordinator_address=f"localhost:{port}", num_processes=2, process_id=0)
        with pytest.raises(ConfigError, match=rf"port {port} is in use on this host"):
            distributed.initialize(tiny_config)
        joined = []  # process 1 runs no coordinator: no probe, it joins
        monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kwargs: joined.append(kwargs))
        tiny_config.train.distributed.process_id = 1
        assert distributed.initialize(tiny_config) and joined[-1]["process_id"] == 1
    tiny_config.train.distributed.process_id = 0  # the port is free now: process 0 joins too
    assert distributed.initialize(tiny_config) and joined[-1]["coordinator_address"] == f"localhost:{port}"


def test_single_process_is_a_no_op(tiny_config, monkeypatch):
    monkeypatch.delenv(distributed.ENV_FLAG, raising=False)
    assert not distributed.requested(tiny_config)
    assert distributed.initialize(tiny_config) is False
    monkeypatch.setenv(distributed.ENV_FLAG, "1")
    assert distributed.requested(tiny_config)


def test_shard_rows_and_schedule_agree():
    from sams_jax.train import BatchSchedule

    n, shards = 103, 4
    schedule = BatchSchedule(n, 32, seed=5, n_shards=shards)
    batches = schedule.indices(0, 30)  # several epochs of every shard
    assert batches.shape == (30, 32)
    first_epoch = batches[:3].ravel()  # 3 x 8 < 25 cells of every shard: no cell twice
    assert len(set(first_epoch.tolist())) == first_epoch.size
    assert sorted(set((batches % shards).ravel().tolist())) == [0, 1, 2, 3]
    np.testing.assert_array_equal(batches[:, 8:16] % shards, 1)  # columns 8-15 come from shard 1
    for held in ([0, 1, 2, 3], [0, 1], [2, 3], [3]):
        rows = distributed.shard_rows(n, shards, held)
        assert len(rows) == 26 * len(held) and (rows[rows < 0] == -1).all()  # shards padded to ceil(103 / 4)
        local = schedule.local_indices(0, 30, held)
        np.testing.assert_array_equal(rows[local], batches[:, held[0] * 8:(held[-1] + 1) * 8])  # no padding drawn
    # one shard: the single-process schedule, every cell in order
    one = BatchSchedule(n, 32, seed=5)
    np.testing.assert_array_equal(one.local_indices(3, 4, [0]), one.indices(3, 4))
    np.testing.assert_array_equal(distributed.shard_rows(n, 1, [0]), np.arange(n))


MISMATCH_DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from configs import test as test_config
    from sams_jax import distributed
    from sams_jax.config import ConfigError
    from sams_jax.train import train_and_evaluate

    workdir, address, process_id, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    config = test_config.get_config()
    if mode == "mismatch":
        config.seed = process_id  # a mistake: the processes disagree
        config.train.progress = process_id == 0  # allowed: only process 0 shows progress
    config.train.distributed.update(coordinator_address=address, num_processes=2, process_id=process_id)
    try:
        distributed.initialize(config)
        train_and_evaluate(config, workdir)
    except ConfigError as error:
        print("CONFIG ERROR:", error)
""")


def _two_processes_stopping(workdir, mode: str) -> list[str]:
    """The stdout of two processes of MISMATCH_DRIVER (``mode``) that each stopped cleanly."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    env.pop(distributed.ENV_FLAG, None)
    script = MISMATCH_DRIVER.format(root=str(ROOT))
    address = f"localhost:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(workdir), address, str(i), mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
        outputs.append(stdout)
    return outputs


def test_processes_with_different_configs_stop_with_a_config_error(tmp_path):
    """Another seed in one process (other data, other parameters) is found before any work:
    every process stops with a ConfigError, nothing is written."""
    for stdout in _two_processes_stopping(tmp_path / "run", "mismatch"):
        assert "CONFIG ERROR: the processes of this run have different configs: processes [1] differ from " \
            "process 0 in seed (this process, " in stdout
    assert not (tmp_path / "run").exists()


def test_processes_of_a_run_into_a_work_directory_in_use_all_stop(tmp_path):
    """Only the main process locks the work directory, but every process learns that another
    run holds it and stops (process 1 used to wait in the collectives for ever)."""
    from sams_jax.train import _claim_workdir

    workdir = tmp_path / "run"
    with _claim_workdir(str(workdir)):  # another run (this test's process) holds it
        first, second = _two_processes_stopping(workdir, "same")
    assert f"CONFIG ERROR: --workdir '{workdir}' is in use by another run (process {os.getpid()}" in first
    assert f"CONFIG ERROR: the main process could not use --workdir '{workdir}'" in second


def _start_two_training_processes(workdir, *flags) -> list[subprocess.Popen]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    env.pop(distributed.ENV_FLAG, None)
    address, prefix = f"localhost:{_free_port()}", "--config.train.distributed"
    return [subprocess.Popen([sys.executable, "-m", "sams_jax.train", "--config", "configs/test.py", "--workdir",
                              str(workdir), f"{prefix}.coordinator_address={address}", f"{prefix}.num_processes=2",
                              f"{prefix}.process_id={i}", "--config.train.max_steps=1000000",
                              "--config.train.eval_every=100", *flags],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_default_sigint)
            for i in range(2)]


def _default_sigint() -> None:
    """Ctrl-C acts in the children even where pytest runs as a background job of a script
    (which inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_history(workdir, procs, seconds: float = 240) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not (workdir / "history.csv").exists():
        assert time.monotonic() < deadline and all(proc.poll() is None for proc in procs), \
            [proc.communicate()[1][-2000:] for proc in procs if proc.poll() is not None]
        time.sleep(0.5)


def test_sigterm_to_one_process_saves_a_checkpoint_and_stops_every_process(tmp_path):
    """A preemption notice (SIGTERM, as SLURM sends) to one process of a multi-process run:
    the processes agree on a step, save a checkpoint there and stop (exit code 143), and
    the same command resumes from it; Ctrl-C on one process stops it at once with its
    message (the others stop on JAX's heartbeat), not in a collective for ever."""
    import signal

    workdir = tmp_path / "run"
    procs = _start_two_training_processes(workdir)
    try:
        _wait_for_history(workdir, procs)
        procs[1].send_signal(signal.SIGTERM)
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    steps = []
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 143, stderr[-3000:]
        found = re.search(r"stopped on a preemption notice \(SIGTERM\) at step (\d+), after saving a checkpoint "
                          r"there; run the same command again to resume from it", stderr)
        assert found, stderr[-3000:]
        steps.append(int(found.group(1)))
    assert steps[0] == steps[1] and (workdir / "checkpoints" / str(steps[0])).is_dir()
    # the same run resumes from it (here on one process); the best checkpoint stays an evaluation step's
    resume_to = (steps[0] // 100 + 1) * 100
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    env.pop(distributed.ENV_FLAG, None)
    resumed = subprocess.run([sys.executable, "-m", "sams_jax.train", "--config", "configs/test.py", "--workdir",
                              str(workdir), f"--config.train.max_steps={resume_to}", "--config.train.eval_every=100"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["steps"] == resume_to and metrics["best_step"] % 100 == 0

    interrupted = tmp_path / "interrupted"
    procs = _start_two_training_processes(interrupted)
    try:
        _wait_for_history(interrupted, procs)
        procs[1].send_signal(signal.SIGINT)
        _, stderr = procs[1].communicate(timeout=30)  # at once, not after the others
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    assert procs[1].returncode == 130, stderr[-3000:]
    assert "interrupted: its checkpoints (last: step" in stderr and "the other processes of this run stop" in stderr


def test_cluster_flag_outside_a_cluster_is_a_config_error():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), distributed.ENV_FLAG: "1"}
    for name in [n for n in env if n.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR"))]:
        env.pop(name)
    result = subprocess.run([sys.executable, "-m", "sams_jax.train", "--config", "configs/test.py", "--workdir",
                             "unused"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "jax.distributed.initialize failed" in result.stderr and "unset SAMS_JAX_DISTRIBUTED" in result.stderr
    assert "Traceback" not in result.stderr


def test_processes_with_different_device_counts_are_a_config_error(monkeypatch):
    class Device:
        def __init__(self, process_index, id):
            self.process_index, self.id = process_index, id

    monkeypatch.setattr(distributed.jax, "devices", lambda: [Device(0, 0), Device(0, 1), Device(1, 2)])
    with pytest.raises(ConfigError, match=r"different numbers of devices: \[2, 1\] \(by process\).*local_device_ids"):
        distributed.process_devices(1)  # train.num_devices cannot even them out: gathers use every device
    # checked before the config digests are gathered across processes (that gather failed with a reshape error)
    monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
    gathered = []
    monkeypatch.setattr("jax.experimental.multihost_utils.process_allgather", lambda *a: gathered.append(a))
    with pytest.raises(ConfigError, match=r"different numbers of devices: \[2, 1\]"):
        distributed.check_same_config(ConfigDict({"seed": 0}))
    assert not gathered
    monkeypatch.setattr(distributed.jax, "devices", lambda: [Device(0, 0), Device(0, 1), Device(1, 2), Device(1, 3)])
    assert [[d.id for d in row] for row in distributed.process_devices(1)] == [[0], [2]]  # train.num_devices=1
