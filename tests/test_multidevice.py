"""Data-parallel training on 2 fake CPU devices equals single-device training, with the
training data on the devices and streamed from the host.

Runs in a subprocess because ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` must
be set before JAX is imported.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, pandas as pd
    sys.path.insert(0, {root!r})
    from configs import test as test_config
    from sams_jax.checkpoint import Checkpointer
    from sams_jax.config import ConfigError
    from sams_jax.train import train_and_evaluate

    assert jax.local_device_count() == 2, jax.devices()
    out = {{}}
    params = {{}}
    for n, placement in ((1, "device"), (2, "device"), (2, "host")):
        config = test_config.get_config()
        config.train.update(num_devices=n, max_steps=30, eval_every=10, steps_per_dispatch=10,
                            data_placement=placement)
        workdir = f"{{sys.argv[1]}}/devices_{{n}}_{{placement}}"
        n = n if placement == "device" else "host"
        out[n] = train_and_evaluate(config, workdir)
        out[f"history_{{n}}"] = pd.read_csv(f"{{workdir}}/history.csv")[["train_loss", "val_loss"]].to_numpy().tolist()
        ckpt = Checkpointer(workdir, read_only=True)
        _, _ = ckpt.restore_json(ckpt.latest_step())
        import orbax.checkpoint as ocp
        restored = ckpt.manager.restore(ckpt.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        params[n] = jax.tree.leaves(restored["state"]["params"])
        ckpt.close()
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(params[1], params[2])]
    host_diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(params[1], params["host"])]
    # a checkpoint of the 2-device run loads onto one device: the first, or jax.default_device's
    import sams_jax
    loaded = sams_jax.load(f"{{sys.argv[1]}}/devices_2_device", checkpoint="latest")
    loaded_devices = sorted({{d.id for leaf in jax.tree.leaves(loaded.variables) for d in leaf.devices()}})
    loaded_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                      for a, b in zip(jax.tree.leaves(loaded.variables["params"]), params[2]))
    with jax.default_device(jax.devices()[1]):
        moved = sams_jax.load(f"{{sys.argv[1]}}/devices_2_device", checkpoint="latest")
    moved_devices = sorted({{d.id for leaf in jax.tree.leaves(moved.variables) for d in leaf.devices()}})
    config = test_config.get_config()
    config.train.update(num_devices=2, batch_size=31)
    try:
        train_and_evaluate(config, sys.argv[1] + "/bad")
        error = ""
    except ConfigError as e:
        error = str(e)
    print(json.dumps({{"metrics_1": out[1], "metrics_2": out[2], "history_1": out["history_1"],
                       "history_2": out["history_2"], "max_param_diff": max(diffs), "error": error,
                       "metrics_host": out["host"], "history_host": out["history_host"],
                       "max_host_param_diff": max(host_diffs), "loaded_devices": loaded_devices,
                       "loaded_diff": loaded_diff, "moved_devices": moved_devices}}))
""")


def test_two_devices_match_one_device(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT)), str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["max_param_diff"] < 1e-4
    for a, b in zip(out["history_1"], out["history_2"]):
        assert abs(a[0] - b[0]) < 1e-3 * abs(a[0]) and abs(a[1] - b[1]) < 1e-3 * abs(a[1])
    assert abs(out["metrics_1"]["test/IWELBO"] - out["metrics_2"]["test/IWELBO"]) < 1e-3 * abs(
        out["metrics_1"]["test/IWELBO"])
    assert "train.batch_size=31 must be divisible by the number of devices (2)" in out["error"]
    assert out["loaded_devices"] == [0] and out["moved_devices"] == [1] and out["loaded_diff"] == 0.0
    # batches densified on the host and split over the 2 devices: the same training
    assert out["max_host_param_diff"] < 1e-4
    for a, b in zip(out["history_1"], out["history_host"]):
        assert abs(a[0] - b[0]) < 1e-3 * abs(a[0]) and abs(a[1] - b[1]) < 1e-3 * abs(a[1])
    assert abs(out["metrics_1"]["test/IWELBO"] - out["metrics_host"]["test/IWELBO"]) < 1e-3 * abs(
        out["metrics_1"]["test/IWELBO"])
