"""sams_jax: SAMS-VAE (Sparse Additive Mechanism Shift VAE) in JAX/Flax.

Entry points: ``python -m sams_jax.train``, ``python -m sams_jax.evaluate`` and
:func:`load` (a trained model's :class:`~sams_jax.predictor.Predictor`).
"""

__version__ = "0.1.0"


def load(workdir: str, checkpoint="best"):
    """A trained model from ``workdir`` (see :func:`sams_jax.predictor.load`)."""
    from sams_jax.predictor import load as _load

    return _load(workdir, checkpoint)


__all__ = ["load", "__version__"]
