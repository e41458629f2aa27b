"""The paper's experiments: ``experiments/<name>/run.py`` on the shared machinery of
:mod:`experiments.runner` (see ``experiments/README.md``)."""
