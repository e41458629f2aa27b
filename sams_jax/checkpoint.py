"""Orbax checkpoints: the latest and the best-by-validation-loss training state, each
saved together with the config and the data metadata, so evaluation needs nothing else.

Layout: ``<workdir>/checkpoints/<step>/{state,config,metadata}``.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

METRIC = "val_loss"


class CheckpointError(FileNotFoundError):
    """No usable checkpoint where one was expected."""


class _ReadOnlyNotes(logging.Filter):
    """Drops Orbax's notes that a read-only manager saves nothing (logged at WARNING by
    every read-only ``CheckpointManager``, i.e. on every ``sams_jax.load``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "read_only=True" not in message and "directory is read only" not in message


@contextlib.contextmanager
def _quiet_read_only_notes(read_only: bool):
    if not read_only:
        yield
        return
    logger, notes = logging.getLogger("absl"), _ReadOnlyNotes()
    logger.addFilter(notes)
    try:
        yield
    finally:
        logger.removeFilter(notes)


class Checkpointer:
    """Keeps the latest checkpoint (to resume) and the best one by validation loss."""

    def __init__(self, workdir: str, read_only: bool = False):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        policy = checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=1),
            checkpoint_managers.BestN(get_metric_fn=lambda metrics: metrics[METRIC], reverse=True, n=1),
        ])
        with _quiet_read_only_notes(read_only):
            options = ocp.CheckpointManagerOptions(
                preservation_policy=policy,
                best_fn=lambda metrics: metrics[METRIC],
                best_mode="min",
                create=not read_only,
                read_only=read_only,
                enable_async_checkpointing=False,
            )
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, val_loss: float, config: dict, metadata: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(config),
                metadata=ocp.args.JsonSave(metadata),
            ),
            metrics={METRIC: float(val_loss)},
        )
        self.manager.wait_until_finished()

    def resolve(self, which: str | int = "best") -> int:
        """``"best"``, ``"latest"`` or a step number -> an existing step."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}; train first with "
                                  "python -m sams_jax.train --config ... --workdir <workdir>")
        if which == "best":
            return self.best_step()
        if which == "latest":
            return self.latest_step()
        try:  # a whole number or its digits; not a float or a bool, which int() would truncate
            if isinstance(which, bool):
                raise TypeError(which)
            if not (isinstance(which, str) and which.strip().isdigit()):
                which = operator.index(which)
            step = int(which)
        except (TypeError, ValueError):
            raise CheckpointError(f"checkpoint={which!r} is not 'best', 'latest' or a step number; available steps: "
                                  f"{sorted(steps)}") from None
        if step not in steps:
            raise CheckpointError(f"no checkpoint at step {step} in {self.directory}; available: {sorted(steps)}")
        return step

    def restore_json(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(config, metadata)`` saved with ``step``."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore(), metadata=ocp.args.JsonRestore()))
        return restored["config"], restored["metadata"]

    def restore_state(self, step: int, target):
        """The state saved at ``step``, with the structure and dtypes of ``target``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
