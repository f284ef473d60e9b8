"""Joining a multi-process run: one process per host, all running the same command."""

from __future__ import annotations

import os

import jax

from models.config import ConfigError


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
