"""The straight-line Threefry hash (sams_jax/prng.py)."""

import numpy as np


def test_threefry_known_answer():
    """Random123's published known-answer vector for Threefry-2x32-20 (the equality of the
    bits built on it with jax.random's is tested in tests/test_samplers.py)."""
    from sams_jax.prng import threefry2x32

    u32 = np.uint32
    out = threefry2x32(u32(0x13198A2E), u32(0x03707344), np.array([0x243F6A88], u32), np.array([0x85A308D3], u32))
    assert [int(w[0]) for w in out] == [0xC4923A9C, 0x483DF7A0]
