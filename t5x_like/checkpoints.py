"""Orbax checkpoints of the train state plus every process's data-loader position.

Saves are asynchronous (training continues while arrays are written). On restore
the newest checkpoint is tried first; one that fails to read (a crash mid-write, a
truncated file) is skipped for the previous one, with a warning naming both, and once an
earlier step has restored it is moved aside into `corrupt/`, never deleted. A step that
any one process cannot read is set aside by all of them. Where no step reads, none moves.
A checkpoint whose arrays differ from what the config builds (another model size, another
optimizer) is a config error, not a corrupt file: restoring stops with the differences
named and nothing is moved. Inference (Trainer.from_workdir) reads the parameters
alone, so for it another optimizer's moments are no difference. A save that finds no space left
on the device stops the run with one error naming the steps saved before it, which stay intact.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import shutil
import time
from typing import Any, Callable, Sequence

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import type_handler_registry

from models.config import ConfigError, first_line
from t5x_like.distributed import gather_json, process_0s

logger = logging.getLogger(__name__)

# Orbax writes an array replicated over n devices as n slices, one per device (its default unless
# JAX_PLATFORMS names a GPU), and blocks training while it dispatches them: for a model's many small
# arrays a dispatch per device per array costs more than it saves. With this floor a save on 8 CPU
# devices blocked for 0.11 s against 0.40 s (decoder_tiny), 0.39 s against 1.95 s (GPT-2 small):
# bench/checkpoint_save.py, docs/performance.md item 56.
MIN_REPLICA_SLICE_BYTES = 1 << 20
_ARRAY_METADATA = array_metadata_store.Store()  # as orbax's default handler has


def write_replicated_arrays_in_slices_of_at_least(min_bytes: int) -> None:
  """Orbax's default jax.Array handler, with replica-parallel writes only for slices of `min_bytes`
  or more (0: orbax's default). Set in orbax's global registry, which its public setter warns
  about; the `_src` modules are those of the pinned orbax-checkpoint 0.12.8."""
  type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, ocp.type_handlers.ArrayHandler(
      array_metadata_store=_ARRAY_METADATA, min_slice_bytes_for_replica_parallel=min_bytes),
      override=True, ignore_warnings=True)


write_replicated_arrays_in_slices_of_at_least(MIN_REPLICA_SLICE_BYTES)


# The parameters a checkpoint's state holds: those trained, and those the run's mode froze.
SAVED_PARAMS = ("params", "frozen")


def state_differences(saved_metadata, abstract_state, limit: int = 5, *, partial: bool = False) -> list[str]:
  """What differs between a checkpoint's arrays and the state the config builds (the first `limit`).
  With `partial` (an inference reader), saved arrays other than parameters that the state leaves
  out, the optimizer's moments, are no difference; a saved parameter it does not build still is."""
  saved = {leaf.name: tuple(leaf.shape) for leaf in jax.tree.leaves(saved_metadata)}
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract_state)
  wanted = {".".join(ocp.tree.str_keypath(path)): tuple(leaf.shape) for path, leaf in flat}  # orbax's names
  differences = [f"{name}: saved {saved[name]}, the config builds {wanted[name]}"
                 for name in sorted(saved.keys() & wanted.keys()) if saved[name] != wanted[name]]
  differences += [f"{name}: not in the checkpoint" for name in sorted(wanted.keys() - saved.keys())]
  differences += [f"{name}: saved, but the config does not build it" for name in sorted(saved.keys() - wanted.keys())
                  if not partial or name.split(".")[0] in SAVED_PARAMS]
  if len(differences) > limit:
    differences = differences[:limit] + [f"and {len(differences) - limit} more"]
  return differences


def gather_data_positions(data_state: dict | None) -> dict[str, dict]:
  """{process index: its data loader state}, from every process: orbax writes a JSON item from
  process 0 alone, and each process reads its own share of the data."""
  return {str(index): state for index, state in enumerate(gather_json(data_state or {}))}


def _by_process(positions: dict) -> dict[str, dict]:
  """gather_data_positions' {process index: loader state}. A checkpoint from before positions were
  kept per process holds one loader state itself, which a single process takes as its own."""
  return positions if all(key.isdigit() for key in positions) else {"0": positions}


def this_process_position(positions: dict, directory: pathlib.Path) -> dict:
  """This process's entry of a checkpoint's data positions."""
  positions = _by_process(positions)
  if str(jax.process_index()) not in positions:
    raise ConfigError(f"the newest checkpoint in {directory} holds the data positions of processes "
                      f"{sorted(positions)}, not of process {jax.process_index()} of {jax.process_count()}; "
                      f"resume training with the process count it was saved with")
  return positions[str(jax.process_index())]


def saved_tokenizer_digest(positions: dict) -> str | None:
  """The tokenizer file's sha256 that the saved data positions hold (None from before they did)."""
  entries = _by_process(positions or {}).values()
  return next((entry["tokenizer_sha256"] for entry in entries if "tokenizer_sha256" in entry), None)


def read_params(source: pathlib.Path, targets: dict[tuple, jax.ShapeDtypeStruct]
                ) -> tuple[dict[tuple, jax.Array], dict | None]:
  """(parameters, data positions) saved in another run's newest readable checkpoint (`source`: its
  workdir or its checkpoints/ directory), the parameters restored into the shapes and shardings of
  `targets` (keyed by their path in the saved params tree). Only this run reads the source and
  nothing there is moved. A saved parameter that targets lack or hold in another shape is a
  ConfigError; targets the source did not save are left out of the result."""
  source = pathlib.Path(source).expanduser().absolute()
  # Process 0's view, on every process: all look in one place, and try the same steps.
  looked_in = source / "checkpoints" if (source / "checkpoints").is_dir() else source
  directory, found = process_0s([str(looked_in), looked_in.is_dir()])
  directory = pathlib.Path(directory)
  if not found:
    raise ConfigError(f"train.init_from={str(source)!r} holds no checkpoint (looked in {directory})")
  manager = ocp.CheckpointManager(directory, item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                            "data": ocp.JsonCheckpointHandler()})
  try:
    # A run still saving there can add or delete a step between two processes' listings.
    steps = process_0s(sorted(manager.all_steps(), reverse=True))
    if not steps:
      raise ConfigError(f"train.init_from={str(source)!r} holds no checkpoint (looked in {directory})")
    # A run whose mode froze parameters saved them under `frozen`: they load by name as well.
    names = {f"{group}.{'.'.join(map(str, path))}": path for path in targets for group in SAVED_PARAMS}
    for step in steps:
      saved, error = _read_on_every_process(lambda: _saved_params(manager, step))
      if error:
        _warn_unreadable(directory / str(step), error)
        continue
      problems = [f"{name}: saved, but this config does not build it" for name in sorted(saved.keys() - names.keys())]
      problems += [f"{name}: saved {shape}, this config builds {targets[names[name]].shape}"
                   for name, shape in sorted(saved.items()) if name in names and targets[names[name]].shape != shape]
      if problems:
        raise ConfigError(f"train.init_from checkpoint {directory / str(step)} holds other parameters than this "
                          f"config builds ({'; '.join(problems[:5])}{'; ...' if len(problems) > 5 else ''})")
      item = {group: _nested({names[name]: targets[names[name]] for name in saved if name.startswith(group + ".")})
              for group in SAVED_PARAMS}
      item = {group: tree for group, tree in item.items() if tree}
      state = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                     partial_restore=True)
      restored, error = _read_on_every_process(lambda: _restore_here(directory / str(step), state=state))
      if error:
        _warn_unreadable(directory / str(step), error)
        continue
      flat, _ = jax.tree_util.tree_flatten_with_path({group: restored["state"][group] for group in item})
      logger.info("initialised %d parameters from %s", len(flat), directory / str(step))
      return {tuple(key.key for key in path[1:]): value for path, value in flat}, _data_positions(manager, step)
    raise ConfigError(f"train.init_from={str(source)!r}: no checkpoint in {directory} is readable (steps {steps})")
  finally:
    manager.close()


def _data_positions(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """A step's data positions; None where it has none (older than they are) or they are unreadable,
  which leaves its parameters good."""
  step_directory = pathlib.Path(manager.directory) / str(step)
  if not process_0s((step_directory / "data").is_dir()):
    return None
  restored, error = _read_on_every_process(lambda: _restore_here(step_directory, data=ocp.args.JsonRestore()))
  if error:
    logger.warning("init_from: the data positions of checkpoint %s are unreadable (%s); its tokenizer "
                   "is not checked", step_directory, error)
    return None
  return restored["data"]


# Failures that say nothing about a checkpoint's files: memory too small for the restored arrays,
# or a storage service briefly away. Setting the step aside for them would throw good work away.
NOT_ABOUT_THE_FILES = ("MemoryError", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED")


def _not_about_the_files(error: str) -> bool:
  return any(sign in error for sign in NOT_ABOUT_THE_FILES) or "out of memory" in error.lower()


def _read_on_every_process(read: Callable[[], Any]) -> tuple[Any, str | None]:
  """(read(), None) where the read worked on every process, else (None, why it failed). A process
  whose own read worked fails too when another's did not: all then fall back to the same earlier
  step together (one alone would train on from another step, or wait at the next collective).
  A failure that says nothing about the files (NOT_ABOUT_THE_FILES) stops every process instead,
  with nothing set aside: the process that met it raises its own error, the others a ConfigError
  naming it."""
  caught = None
  try:
    result, error = read(), None
  except Exception as failure:  # orbax raises many types for unreadable files
    result, error, caught = None, first_line(failure), failure
  errors = gather_json(error)
  elsewhere = next(((index, message) for index, message in enumerate(errors)
                    if message is not None and _not_about_the_files(message)), None)
  if elsewhere:
    logger.error("reading a checkpoint failed for a reason other than its files (%s on process %d); it "
                 "stays where it is", elsewhere[1], elsewhere[0])
    if caught is not None and _not_about_the_files(error):
      raise caught
    raise ConfigError(f"on process {elsewhere[0]}: reading a checkpoint failed ({elsewhere[1]}), not for "
                      f"its files; nothing was set aside, rerun once that is resolved")
  failed = next(((index, message) for index, message in enumerate(errors) if message is not None), None)
  if failed and error is None:
    error = f"process {failed[0]} cannot read it: {failed[1]}"
  return (None, error) if error else (result, None)


def _restore_here(step_directory: pathlib.Path, **items) -> dict:
  """Restores a step's items on this process alone. A CheckpointManager's restore ends at a barrier
  of every process, which a process whose read failed never reaches; _read_on_every_process agrees
  on the outcome afterwards instead."""
  this = jax.process_index()
  alone = ocp.options.MultiprocessingOptions(primary_host=this, active_processes={this})
  reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler(), multiprocessing_options=alone)
  try:
    return reader.restore(step_directory, args=ocp.args.Composite(**items))
  finally:
    reader.close()


def _nested(leaves: dict[tuple, Any]) -> dict:
  """{path: leaf} as nested dicts, each key kept as it is (orbax's from_flat_dict makes them strings)."""
  tree = {}
  for (*parents, last), leaf in leaves.items():
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = leaf
  return tree


def _saved_params(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple[int, ...]]:
  """{orbax name: shape} of a step's saved parameters; raises if its metadata is gone (orbax then
  reads None, as if the step held nothing)."""
  metadata = manager.item_metadata(step)["state"]
  saved = {leaf.name: tuple(leaf.shape) for leaf in jax.tree.leaves(metadata or {})
           if leaf.name.split(".")[0] in SAVED_PARAMS}
  if not saved:
    raise ValueError("its state metadata lists no parameters")
  return saved


def _warn_unreadable(step_directory: pathlib.Path, error: str) -> None:
  logger.warning("init_from: checkpoint %s is unreadable (%s); trying an earlier one", step_directory, error)


class OutOfSpaceError(OSError):
  """A checkpoint could not be written for want of space on its device."""

  def __init__(self, message: str):
    super().__init__(errno.ENOSPC, message)

  def __str__(self) -> str:
    return self.strerror


NO_SPACE = "No space left on device"  # the OS's words, which orbax's errors about tensorstore's writes end in


def _out_of_space(error: BaseException | None) -> bool:
  """Whether the error, or one it came from, is a full device. Orbax reports tensorstore's failed
  writes as ValueErrors whose message ends in the OS's."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or NO_SPACE in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class _FullDeviceRecords(logging.Filter):
  """Drops what orbax's writer threads and asyncio log about a write that found the device full
  (hundreds of lines of tracebacks): the Checkpointer names it once, with the steps that are safe.
  Other libraries' records on these loggers pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    if f"{os.sep}orbax{os.sep}" not in record.pathname and record.name != "asyncio":
      return True
    error = record.exc_info[1] if record.exc_info else None
    return not (_out_of_space(error) or NO_SPACE in record.getMessage())


for _name in ("absl", "asyncio"):
  logging.getLogger(_name).addFilter(_FullDeviceRecords())


def _bytes_under(directory: pathlib.Path) -> int:
  return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


class Checkpointer:

  def __init__(self, directory: pathlib.Path, *, max_to_keep: int):
    self.directory = pathlib.Path(directory).absolute()
    self.max_to_keep = max_to_keep
    self.manager = self._new_manager()
    self._reported_out_of_space = False  # once: the run stops, and its waits and close meet it again

  def _new_manager(self) -> ocp.CheckpointManager:
    # Handlers named up front, so a checkpoint's metadata reads before any restore.
    return ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=self.max_to_keep, create=True, enable_async_checkpointing=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

  def save(self, step: int, state, data_state: dict | None) -> None:
    """Starts writing the step (the write goes on in the background), after the previous one has
    finished; either may find the device full (OutOfSpaceError)."""
    with self._out_of_space_named():
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(gather_data_positions(data_state))))

  @contextlib.contextmanager
  def _out_of_space_named(self):
    """A full device as one OutOfSpaceError naming the steps that are safe, in place of orbax's
    chain of errors from its writer threads."""
    try:
      yield
    except Exception as error:
      if not _out_of_space(error):
        raise
      if self._reported_out_of_space:  # orbax keeps the failed write's error and raises it at each wait
        return
      self._reported_out_of_space = True
      # Finished steps only: a write takes its step's name when it is complete.
      steps = sorted(int(path.name) for path in self.directory.iterdir() if path.name.isdigit())
      saved = "no step was saved before it"
      if steps:
        saved = (f"the steps saved before it ({', '.join(map(str, steps))}) are intact, and rerun with room the run "
                 f"resumes from step {steps[-1]}")
        try:
          saved += f" (a checkpoint takes {_bytes_under(self.directory / str(steps[-1])) / 2**20:.1f} MiB)"
        except OSError:  # a step max_to_keep deletes meanwhile
          pass
      raise OutOfSpaceError(f"no space left on the device of {self.directory} to write a checkpoint; "
                            f"{saved}") from error

  def restore_latest(self, abstract_state, *, set_aside: bool = True, partial: bool = False,
                     older_layouts: Sequence[tuple[Any, Callable]] = ()):
    """(step, state, every process's data position) from the newest readable checkpoint, or None if
    none. Unreadable steps newer than it are then moved into corrupt/ (the run saves their steps
    again), or with set_aside=False (a reader beside a run that may be saving there) only skipped.
    Where no step reads, nothing moves: a cause that fails every step is more likely the machine's
    (permissions, a lost mount, a library upgrade) than every checkpoint's. With `partial`, only
    the arrays `abstract_state` holds are read (inference reads the parameters, not the optimizer
    moments beside them). A checkpoint that matches one of `older_layouts`' (abstract state,
    conversion) pairs, the state as an older version saved it, is read in that layout and converted."""
    unreadable = {}  # step: why
    steps = process_0s(sorted(self.manager.all_steps(), reverse=True))
    corrupt = self.directory.parent / "corrupt"
    if not steps and process_0s(corrupt.is_dir() and any(corrupt.iterdir())):
      # Before 9bd73b8 a run whose every step was unreadable moved them all here; its reruns must
      # not begin again at step 0.
      raise ConfigError(f"no checkpoint in {self.directory}, and {corrupt} holds the steps set aside as "
                        f"unreadable; put a good copy back, or remove {corrupt} to train from step 0")
    for step in steps:
      metadata, error = _read_on_every_process(lambda: self._state_metadata(step))
      if not error:
        layouts = [(abstract_state, lambda state: state), *older_layouts]
        fitting = [layout for layout in layouts if not state_differences(metadata, layout[0], partial=partial)]
        if not fitting:
          differences = state_differences(metadata, abstract_state, partial=partial)
          raise ConfigError(f"checkpoint {self.directory / str(step)} holds another train state than this config "
                            f"builds ({'; '.join(differences)}); resume with the config it was saved with "
                            f"(the workdir's config.json) or train in a new workdir")
        target, convert = fitting[0]
        state = ocp.args.StandardRestore(target) if not partial else ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)
        restored, error = _read_on_every_process(lambda: _restore_here(
            self.directory / str(step), state=state, data=ocp.args.JsonRestore()))
      if error:
        logger.warning("checkpoint %s is unreadable (%s); trying an earlier one", self.directory / str(step), error)
        unreadable[step] = error
        continue
      if unreadable:
        for newer, why in unreadable.items() if set_aside else ():
          self._set_aside(newer, why)
        logger.warning("resuming from checkpoint %s, the newest readable one (unreadable: steps %s)",
                       self.directory / str(step), list(unreadable))
      return step, convert(restored["state"]), restored["data"]
    if unreadable:  # not a fresh start: the run would silently begin again at step 0
      newest, why = next(iter(unreadable.items()))
      raise ConfigError(f"no checkpoint in {self.directory} is readable (steps {list(unreadable)}; step {newest}: "
                        f"{why}); nothing was moved. Fix the cause and rerun, or if the files themselves are "
                        f"damaged, move {self.directory} aside to train from step 0")
    return None

  def _state_metadata(self, step: int):
    metadata = self.manager.item_metadata(step)["state"]
    if metadata is None:  # orbax reads a step whose metadata file is gone as holding nothing
      raise ValueError("its state metadata is missing")
    return metadata

  def _set_aside(self, step: int, error: str) -> None:
    """Moves an unreadable step into corrupt/ (never deletes it) and says so."""
    target = self.directory.parent / "corrupt" / f"{step}-{int(time.time())}"
    # Every process has listed the steps and agreed this one is unreadable (_read_on_every_process),
    # so process 0 moves it; the others list the steps again only once it is moved.
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), str(target))
    multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    self.manager.close()  # its metadata store and deleter would otherwise live on beside the new one's
    self.manager = self._new_manager()
    logger.warning("checkpoint %s is unreadable (%s); moved it to %s", self.directory / str(step), error, target)

  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def wait(self) -> None:
    with self._out_of_space_named():
      self.manager.wait_until_finished()

  def close(self) -> None:
    with self._out_of_space_named():
      self.manager.close()
