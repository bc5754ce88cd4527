"""Orbax checkpoints of a training run: train state, data-iterator position and the config.

Saves are asynchronous (training goes on while the previous step's arrays are written). Orbax writes each
step to a temporary folder and renames it when every process has finished, so an interrupted save is never
listed as a checkpoint; `latest_step` only sees complete ones. Restoring takes abstract target arrays with
shardings, so a run can resume on a different mesh shape or device count.

A complete checkpoint can still be damaged later (a lost file, a disk error). `restore_latest` then falls back
to the newest one that restores, and sets the damaged newer ones aside as STEP.damaged: kept for inspection,
but no longer a step to orbax, so a new save of that step does not collide with it and keep-the-last-N
counts only checkpoints that restore.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)
DAMAGED = ".damaged"


class CheckpointRestoreError(RuntimeError):
    """No checkpoint of a run restores."""


class Checkpointer:
    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
        self.save_every = save_every
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator, config: dict, *, force: bool = False) -> bool:
        """Saves if `step` is a multiple of `save_every` (or `force`); returns whether a save started."""
        if not (force or step % self.save_every == 0):
            return False
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
        """The train state (laid out as `abstract_state`'s shardings say) and, in place, the data position."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def restore_latest(self, abstract_state: Any, data_iterator=None) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores (the data position restored in place), or None
        when there is no checkpoint. Each newer one that fails is logged as a warning with the reason and, once
        an older one has restored, set aside (never deleted). When none restores, nothing is moved and
        CheckpointRestoreError lists every step with its reason."""
        failed = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self.restore(step, abstract_state, data_iterator)
            except Exception as err:  # orbax and tensorstore raise many types for missing or damaged files
                reason = f"{type(err).__name__}: {_first_line(err)}"
                log.warning("checkpoint step %d in %s cannot be restored (%s); trying the one before it", step,
                            self.manager.directory, reason)
                failed.append((step, reason))
                continue
            if failed:
                self._set_aside([s for s, _ in failed])
            return step, state
        if failed:
            raise CheckpointRestoreError(
                f"no checkpoint of {self.manager.directory} restores: "
                + "; ".join(f"step {s} ({r})" for s, r in failed)
                + ". They are left as they are: move the damaged step folders elsewhere to start from the newest "
                  "good one (or from scratch), or train in another --workdir.")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        directory = str(self.manager.directory)
        if jax.process_index() == 0:
            for step in steps:
                target, n = os.path.join(directory, f"{step}{DAMAGED}"), 1
                while os.path.exists(target):  # damaged before: keep both
                    target, n = os.path.join(directory, f"{step}{DAMAGED}.{n}"), n + 1
                os.rename(os.path.join(directory, str(step)), target)
                log.warning("checkpoint step %d set aside as %s; training goes on from an older step", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoint: damaged steps set aside")
        self.manager.reload()

    def config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _first_line(err: Exception, limit: int = 300) -> str:
    line = (str(err).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit] + " ..."


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with target shardings: what `restore` lays the checkpoint out as."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
