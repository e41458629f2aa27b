import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Full float32 matrix products on every backend (inherited by the tests' subprocesses). On
# GPUs, JAX's default precision admits TF32 (10-bit mantissas), under which the comparisons
# of two float32 computations of one quantity (closed forms, a reported loss recomputed
# from its checkpoint) missed their tolerances by up to 8e-4 on an H200. The CPU
# computes float32 products in full either way.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# Most of the suite's time is XLA compiling the same small programs again: many tests (and
# the end-to-end subprocesses, which inherit this environment) train the tiny config. A
# persistent compilation cache that starts empty in every session lets them share the
# compiled programs; it cut tests/test_train.py + tests/test_evaluate.py from 204 s to
# 124 s on the 2-core CI machine class. The cache only stores XLA's output for identical
# programs, so no number changes.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="sams_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_config():
    """The tiny test configuration (configs/test.py), fresh for each test."""
    sys.path.insert(0, str(ROOT))
    try:
        from configs import test as test_config
    finally:
        sys.path.pop(0)
    return test_config.get_config()
