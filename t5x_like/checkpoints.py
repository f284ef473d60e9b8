"""Orbax checkpoints of the train state plus the data loader's position.

Saves are asynchronous (training continues while arrays are written). On restore
the newest checkpoint is tried first; one that fails to read (a crash mid-write, a
truncated file) is moved aside into `corrupt/`, never deleted, and the previous one is
used with a warning naming both.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import time

import jax
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)


class Checkpointer:

  def __init__(self, directory: pathlib.Path, *, max_to_keep: int):
    self.directory = pathlib.Path(directory).absolute()
    self.max_to_keep = max_to_keep
    self.manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=self.max_to_keep, create=True, enable_async_checkpointing=True))

  def save(self, step: int, state, data_state: dict | None) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})))

  def restore_latest(self, abstract_state):
    """(step, state, data_state) from the newest readable checkpoint, or None if none."""
    unreadable = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as error:  # orbax raises many types for unreadable files
        moved = self._move_aside(step)
        logger.warning("checkpoint %s is unreadable (%s: %s); moved it to %s and falling back to "
                       "an earlier checkpoint", self.directory / str(step), type(error).__name__,
                       str(error).splitlines()[0][:200], moved)
        unreadable.append(step)
        continue
      if unreadable:
        logger.warning("resuming from checkpoint %s, the newest readable one (unreadable: steps %s)",
                       self.directory / str(step), unreadable)
      return step, restored["state"], restored["data"]
    return None

  def _move_aside(self, step: int) -> pathlib.Path:
    target = self.directory.parent / "corrupt" / f"{step}-{int(time.time())}"
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), str(target))
    self.manager = self._new_manager()  # forget the moved step
    return target

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
