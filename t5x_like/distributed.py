"""Joining a multi-process run (one process per host, all running the same command), agreeing
across its processes on what each found by itself, and stopping together.

A process that decides alone from its own files (a checkpoint it cannot read, a tokenizer or
data file that differs on its host) and raises, or takes another branch, leaves the others
waiting in their next collective until a timeout. So such verdicts are gathered first, and
every process acts on all of them together. A failure no check foresaw (a broken record in one
host's data, a full disk) is posted to the others, and they stop with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from typing import Any, Callable, TypeVar

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from models.config import ConfigError, first_line

T = TypeVar("T")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Calls jax.distributed.initialize when flags or the environment describe a multi-process run.

  Flags win over the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID. With none of them set this is a single-process run, except on cluster
  schedulers jax detects by itself (TPU pods, SLURM), where `auto` asks it to.
  """
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address == "auto":
    if num_processes is not None or process_id is not None:
      raise ConfigError("--coordinator_address auto finds the process count and id itself (TPU pods, "
                        "SLURM); drop --num_processes and --process_id, or give an address")
    jax.distributed.initialize()
    return
  num_processes = num_processes if num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID")
  if address is None:
    alone = str(num_processes) == "1" and str(process_id) in ("0", "None")  # a launcher's single-host job
    if (num_processes is not None or process_id is not None) and not alone:
      raise ConfigError("--num_processes and --process_id (or JAX_NUM_PROCESSES and JAX_PROCESS_ID) need "
                        "--coordinator_address (or JAX_COORDINATOR_ADDRESS); without one every process "
                        "would train alone")
    return
  if num_processes is None or process_id is None:
    raise ConfigError(f"coordinator address {address} given without --num_processes and --process_id "
                      "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
  try:
    num_processes, process_id = int(num_processes), int(process_id)
  except ValueError:  # the environment's are strings
    raise ConfigError(f"the process count {num_processes!r} and id {process_id!r} (--num_processes and "
                      f"--process_id, or JAX_NUM_PROCESSES and JAX_PROCESS_ID) must be integers") from None
  if num_processes < 1:
    raise ConfigError(f"the process count must be at least 1, got {num_processes}")
  if not 0 <= process_id < num_processes:
    raise ConfigError(f"process id {process_id} is not in [0, {num_processes}) for {num_processes} processes")
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():  # jax indexes the split port and stops on an IndexError
    raise ConfigError(f"coordinator address {address!r} (--coordinator_address or JAX_COORDINATOR_ADDRESS) "
                      f"must be HOST:PORT, such as 10.0.0.1:1234")
  jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                             process_id=process_id)


def gather_json(value: Any) -> list:
  """`value` (anything JSON holds) from every process, in process order. One process's is its own."""
  if jax.process_count() == 1:
    return [json.loads(json.dumps(value))]
  encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([encoded.size]))).reshape(-1)
  # Padded to a power of two, so the gather compiles for a few sizes, not once per new JSON length.
  padded = np.zeros(max(256, 1 << (int(lengths.max()) - 1).bit_length()), np.uint8)
  padded[:encoded.size] = encoded
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [json.loads(bytes(row[:length]).decode()) for row, length in zip(rows, lengths)]


def process_0s(value: Any) -> Any:
  """Process 0's `value` as JSON gives it back, on every process: for what each process looks
  up by itself but all must act on alike (the steps in a directory another run saves into)."""
  return gather_json(value)[0]


def first_failure(error: str | None) -> tuple[int, str] | None:
  """(index, message) of the first process whose `error` is not None, from every process's; None
  when none failed."""
  return next(((index, message) for index, message in enumerate(gather_json(error)) if message is not None), None)


def check_on_every_process(check: Callable[[], T]) -> T:
  """check(), which reads this process's own files and raises when they are wrong, made to fail
  on every process when it fails on any, so that none goes on alone into a collective the
  others never reach. A process whose check failed raises its own error; the others raise a
  ConfigError naming the first process that failed and its message."""
  if jax.process_count() == 1:
    return check()
  try:
    result = check()
  except Exception as error:
    first_failure(_described(error))  # tells the others
    raise
  failed = first_failure(None)
  if failed:
    raise ConfigError(f"on process {failed[0]}: {failed[1]}")
  return result


def check_same_run(run: dict) -> None:
  """Raises ConfigError on every process unless all describe the same run (`run`: the config as
  JSON holds it, data paths made absolute, and what else must match). A host with another
  checkout, flag or working directory would stop at another step and leave the others waiting,
  or train apart with another seed, rate or tokenizer."""
  if jax.process_count() == 1:
    return
  # Compared as JSON text: a NaN equals itself, and a field one process lacks differs from None.
  flat = [{key: json.dumps(value, sort_keys=True) for key, value in traverse_util.flatten_dict(each, sep=".").items()}
          for each in gather_json(run)]
  for index, other in enumerate(flat[1:], start=1):
    differences = [f"{key}: {flat[0].get(key, 'nothing')} on process 0, {other.get(key, 'nothing')} on process {index}"
                   for key in sorted(flat[0].keys() | other.keys()) if flat[0].get(key) != other.get(key)]
    if differences:
      raise ConfigError(f"the processes run different configs ({'; '.join(differences[:5])}); start every "
                        f"process with the same config file, flags, working directory and files")


def _described(error: BaseException) -> str:
  """A ConfigError's whole message (it says what to change), or any other error's first line."""
  return str(error) if isinstance(error, ConfigError) else first_line(error)


# Stopping together -----------------------------------------------------------------
#
# Through jax's coordination service (process 0 serves it), under KEYS: `first` holds the first
# failure; `outcome/I` what became of process I ("failed", "finished", or "leaving": it stops
# because another failed); `left/I` is set as process I exits without jax's shutdown barrier.
# The keys live as long as the service, so a process enters stop_together once.

KEYS = "t5x_like/stop/"
# How long a process that sees another fail waits to fail by itself (a failure all share: a NaN
# loss, SIGTERM, a failed check) before it takes itself for stuck in a collective and stops.
GRACE_SECONDS = 10.0
POLL_SECONDS = 0.2


class _StopWatch:
  """Posts this process's failure, and ends this process when another fails and this one does
  not within GRACE_SECONDS: its next collective would wait for the failed one forever."""

  def __init__(self, client, index: int, count: int):
    self.client, self.index, self.count = client, index, count  # jax's distributed client; this process
    self.lock = threading.Lock()  # the watch's verdict against this process's own
    self.settled = threading.Event()  # this process is failing, finished or leaving: the watch stands down
    self.alone = False  # it failed, and another did not: none will meet it at jax's shutdown barrier
    self.thread = threading.Thread(target=self._watch, name="t5x_like stop watch", daemon=True)
    self.thread.start()

  def _set(self, key: str, value: str) -> None:
    try:
      self.client.key_value_set(KEYS + key, value)
    except jax.errors.JaxRuntimeError:  # `first` when another process failed first; the store gone
      pass

  def _processes_under(self, key: str) -> dict[int, str]:
    return {int(name.rsplit("/", 1)[1]): value for name, value in self.client.key_value_dir_get(KEYS + key)}

  def failing(self) -> None:
    with self.lock:  # after the watch decided to leave, its "leaving" stands and it exits the process
      self.settled.set()

  def failed(self, error: BaseException) -> None:
    self.failing()
    self._set("first", f"process {self.index} failed: {_described(error)}")
    self._set(f"outcome/{self.index}", "failed")

  def finished(self) -> None:
    with self.lock:
      self.settled.set()
    self._set(f"outcome/{self.index}", "finished")

  def wait_for_the_others(self) -> None:
    """After this process failed: whether every other failed or finished too (all then meet at
    jax's shutdown barrier), or one leaves, or says nothing (then this process leaves alone)."""
    # Twice the grace: a stuck process leaves one grace after the post. Past it (a process whose
    # own saves outlast it), every process leaves rather than wait at the barrier for one gone.
    deadline = time.monotonic() + 2 * GRACE_SECONDS
    while time.monotonic() < deadline:
      try:
        outcomes, left = self._processes_under("outcome/"), self._processes_under("left/")
      except jax.errors.JaxRuntimeError:  # process 0 is gone, and the store with it
        break
      if "leaving" in outcomes.values() or left:
        break
      if len(outcomes) == self.count:
        return
      time.sleep(POLL_SECONDS)
    self.alone = True

  def _watch(self) -> None:
    while not self.settled.is_set():
      try:
        failure = self.client.blocking_key_value_get(KEYS + "first", 1000)
      except jax.errors.JaxRuntimeError as error:
        if "DEADLINE_EXCEEDED" in str(error):  # a second without news
          continue
        return  # process 0 is gone, and the store with it: jax's own watch ends this process
      if self.settled.wait(GRACE_SECONDS):
        return
      with self.lock:
        if self.settled.is_set():  # failing or finished at the last moment
          return
        self.settled.set()
        self._set(f"outcome/{self.index}", "leaving")  # before this process could post another
      print(f"t5x-like: error: {failure}; process {self.index} stops too, as its next collective would wait "
            f"for it forever", file=sys.stderr, flush=True)
      self.leave(1)

  def leave(self, status: int) -> None:
    """Exits now, past jax's shutdown barrier, which waits for every process. Process 0 serves
    the key-value store, so it goes last (or after GRACE_SECONDS)."""
    sys.stdout.flush()
    sys.stderr.flush()
    self._set(f"left/{self.index}", "")
    if self.index == 0:
      deadline = time.monotonic() + GRACE_SECONDS
      while time.monotonic() < deadline:
        # A finished process waits at jax's shutdown barrier, which this exit ends (three or more processes).
        finished = {index for index, outcome in self._processes_under("outcome/").items() if outcome == "finished"}
        if self._processes_under("left/").keys() | finished >= set(range(self.count)):
          break
        time.sleep(POLL_SECONDS)
    os._exit(status)

  def stop(self) -> None:
    self.settled.set()
    self.thread.join(timeout=5)


_watch: _StopWatch | None = None


@contextlib.contextmanager
def stop_together():
  """Runs the body so that a failure in it on one process stops every process seconds after the
  failed one has finished its saves, each naming it, instead of leaving the others in a collective
  until jax's coordination service ends them minutes later without the cause. Call exit_if_alone
  with the exit status afterwards."""
  global _watch
  if jax.process_count() == 1:
    yield
    return
  import orbax.checkpoint as ocp  # its public handle on jax's distributed client
  _watch = _StopWatch(ocp.multihost.get_jax_distributed_client(), jax.process_index(), jax.process_count())
  try:
    yield
  except BaseException as error:
    _watch.failed(error)
    _watch.wait_for_the_others()
    raise
  else:
    _watch.finished()
  finally:
    _watch.stop()


def mark_this_process_failing() -> None:
  """Says this process is failing but has cleanup to do first: finishing a checkpoint's save
  needs every process, so they are not told (and do not stop) until it is done, and meanwhile
  its own watch must not take it for stuck when a failure all processes share is posted first."""
  if _watch is not None:
    _watch.failing()


def alone() -> bool:
  """Whether this process failed inside stop_together and another did not, so that none will
  meet it at jax's shutdown barrier at exit (it would wait there until its timeout, then abort)."""
  return _watch is not None and _watch.alone


def exit_if_alone(status: int) -> None:
  """Exits with `status` now, past jax's shutdown barrier, if alone()."""
  if alone():
    _watch.leave(status)
