"""Joining a multi-process run (one process per host, all running the same command), and
agreeing across its processes on what each found by itself.

A process that decides alone from its own files (a checkpoint it cannot read, a tokenizer or
data file that differs on its host) and raises, or takes another branch, leaves the others
waiting in their next collective until a timeout. So such verdicts are gathered first, and
every process acts on all of them together.
"""

from __future__ import annotations

import json
import os
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
  if address is None:
    if num_processes is not None or process_id is not None:
      raise ConfigError("--num_processes and --process_id need --coordinator_address (or "
                        "JAX_COORDINATOR_ADDRESS); without one every process would train alone")
    return
  num_processes = num_processes if num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID")
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
    first_failure(str(error) if isinstance(error, ConfigError) else first_line(error))  # tells the others
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
