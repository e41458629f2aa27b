"""The Threefry-2x32 hash as straight-line ``jnp`` code: JAX's random bits, faster on the CPU.

On the CPU, JAX lowers its Threefry hash (the default PRNG behind every ``jax.random``
call) as a loop of five rounds that XLA does not fuse: every round reads and writes the
whole array, and ``jax.random.uniform`` runs at about 60-100 M numbers/s on the 2-core
AMD EPYC of ``benchmarks/RESULTS.md``. :func:`threefry2x32` is the same hash (Salmon et
al. 2011, 20 rounds) written out, which XLA fuses into its consumer: about 400 M
numbers/s. :mod:`sams_jax.samplers` builds ``uniform`` and ``normal`` on it that equal
``jax.random``'s bit for bit (tested), for the hot loops that generate cells.

It is not installed as JAX's own CPU lowering: XLA then copies the hash into every
consumer of a random array, which made the held-out IWELBO 25% slower in a trial.
"""

from __future__ import annotations

import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x, bits: int):
    return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry2x32(key_hi, key_lo, count_hi, count_lo):
    """Threefry-2x32 (20 rounds) of the counter pairs ``(count_hi, count_lo)`` (uint32
    arrays of one shape) under the key ``(key_hi, key_lo)`` (uint32 scalars) -> the two
    output words, each of the counters' shape."""
    schedule = (key_hi, key_lo, key_hi ^ key_lo ^ _KEY_PARITY)
    x0 = count_hi + schedule[0]
    x1 = count_lo + schedule[1]
    for block in range(5):
        for bits in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = x0 ^ _rotate_left(x1, bits)
        x0 = x0 + schedule[(block + 1) % 3]
        x1 = x1 + schedule[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1
