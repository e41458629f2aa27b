import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
