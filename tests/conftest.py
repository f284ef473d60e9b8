"""Test-wide setup, done before jax is first imported: eight simulated CPU devices, quick
compiles, and one compilation cache for the whole run, so that the many tests building the
same tiny trainer compile its steps once: their subprocesses and the pytest-xdist workers inherit
the environment of the process that ran this file first. The cache starts empty and is removed
at exit."""

import atexit
import concurrent.futures
import faulthandler
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile

import pytest

# LLVM's optimisation of the compiled code is much of a tiny program's compile time, and the tests'
# programs run for milliseconds and check results, not speed: at level 0 a tiny trainer's first run
# compiled in 0.63 of the time (4.7 s against 7.4).
for flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if flag not in os.environ.get("XLA_FLAGS", "").split():  # an xdist worker inherits them already set
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# OpenBLAS's threads spin while they wait, and next to the other xdist worker they spin on a busy
# core: the bootstrap test's scipy fits took 38 s beside a busy loop, 12 s on one thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="t5x_like_tests_compiled_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
# Programs that compile in 0.1 to 0.5 s recur across tests too (each new Trainer compiles its steps):
# with them cached the trainer's file took 292 s on two workers, against 315 and 320 s at 0.5 s
# (one run each).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
# The xdist workers and their subprocesses share the cache. Without a size cap jax reads and writes
# its files without a lock, so one process could load a program another was still writing: a
# clean-clone CI aborted once (SIGABRT) dispatching a jnp.add. With a cap it takes a file lock.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))


# A subprocess that hangs is sent SIGABRT (outputs_of below), on which Python prints every thread's stack.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

# An xdist worker that dies in native code (a SIGABRT during `eval`, three times so far, each beside
# another worker, never in a run alone) is taken down before its stderr shows the stack that
# aborted. Each worker writes Python's dump of its threads to a file of its own instead, and the
# run prints the non-empty ones at its end.
if "T5X_LIKE_TESTS_FAULTS" not in os.environ:
  os.environ["T5X_LIKE_TESTS_FAULTS"] = tempfile.mkdtemp(prefix="t5x_like_tests_faults_")
  atexit.register(shutil.rmtree, os.environ["T5X_LIKE_TESTS_FAULTS"], ignore_errors=True)
_fault_file = None


def pytest_sessionstart(session):
  """In an xdist worker, after pytest's own faulthandler plugin has pointed the dump at stderr (a
  run without workers keeps it there); the file stays open."""
  global _fault_file
  if "PYTEST_XDIST_WORKER" not in os.environ:
    return
  _fault_file = open(os.path.join(os.environ["T5X_LIKE_TESTS_FAULTS"], f"{os.getpid()}.log"), "w")
  faulthandler.enable(_fault_file, all_threads=True)


def pytest_sessionfinish(session):
  if "PYTEST_XDIST_WORKER" in os.environ:
    return
  for dump in sorted(pathlib.Path(os.environ["T5X_LIKE_TESTS_FAULTS"]).glob("*.log")):
    if dump.read_text().strip():
      print(f"\npytest worker process {dump.stem} died in native code; its threads then:\n{dump.read_text()}")


@pytest.fixture
def outputs_of():
  """outputs_of(workers, timeout): each subprocess's output once all have ended. After a hang (the
  timeout) the test fails with each worker's output ending in where its threads stood, and every
  worker is killed, so a stuck process never outlives its test."""
  def wait(workers, timeout):
    try:
      # Every pipe drained at once: read one after another, a process whose output filled its pipe
      # blocked writing, and held the others at their next collective until the timeout.
      with concurrent.futures.ThreadPoolExecutor(len(workers)) as pool:
        reads = [pool.submit(worker.communicate, timeout=timeout) for worker in workers]
      if not any(isinstance(read.exception(), subprocess.TimeoutExpired) for read in reads):
        return [read.result()[0] for read in reads]
      for worker in workers:
        worker.send_signal(signal.SIGABRT)  # a finished process ignores it
      outputs = [worker.communicate(timeout=60)[0] for worker in workers]
      pytest.fail(f"the subprocesses were still running after {timeout} s; their outputs' ends:\n" + "\n".join(
          f"--- subprocess {index} (exit status {worker.returncode}):\n{output[-8000:]}"
          for index, (worker, output) in enumerate(zip(workers, outputs))))
    finally:
      for worker in workers:
        worker.kill()  # a finished process ignores it
  return wait
