"""A command's process: it restarts once with glibc's huge-page tunable, before importing jax, and the
tunable removes XLA:CPU's page faults; its compiles go to a size-capped cache; memory freed in
malloc's heap returns to the system when the trainer asks."""

import os
import pathlib
import subprocess
import sys

import pytest

from t5x_like import __main__ as command
from t5x_like import host_memory

ROOT = pathlib.Path(__file__).resolve().parents[2]
needs_huge_pages = pytest.mark.skipif(not host_memory.huge_pages_available(),
                                      reason="needs glibc >= 2.35 and transparent huge pages")


def run_python(code: str, **env: str) -> list[str]:
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, timeout=300, check=True)
  return result.stdout.split()


RESTART = """
import os
from t5x_like.host_memory import exec_with_huge_pages
print(os.getpid())
exec_with_huge_pages()
print(os.environ.get("GLIBC_TUNABLES"))
"""


@needs_huge_pages
def test_a_command_restarts_once_in_the_same_process_with_the_tunable_added():
  first_pid, second_pid, tunables = run_python(RESTART, GLIBC_TUNABLES="glibc.malloc.tcache_count=7")
  assert first_pid == second_pid  # execve: the same process, started over
  assert tunables == "glibc.malloc.tcache_count=7:glibc.malloc.hugetlb=1"


# The command's entry point, its restart replaced by a report of what the restart would have had.
LAUNCH = """
import os
import sys
from t5x_like.__main__ import main
def execve(path, args, env):
  print("jax" in sys.modules, env["GLIBC_TUNABLES"])
  sys.exit(0)
os.execve = execve
main()
"""


@needs_huge_pages
def test_the_command_restarts_before_importing_jax():
  assert run_python(LAUNCH, GLIBC_TUNABLES="", T5X_LIKE_HUGE_PAGES="1") == ["False", "glibc.malloc.hugetlb=1"]


@pytest.mark.parametrize("module", ["t5x_like", "t5x_like.cli"])  # the second: as an older console script enters
def test_python_m_runs_the_job(module):
  result = subprocess.run([sys.executable, "-m", module, "info", "--config", "experiments/decoder_tiny.py"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "GLIBC_TUNABLES": ""},
                          timeout=300)
  assert result.returncode == 0 and "parameters:" in result.stdout, result.stderr


def test_commands_keep_their_compiles_in_a_bounded_cache_unless_told_where(tmp_path):
  environ = {"XDG_CACHE_HOME": str(tmp_path)}
  command.use_compilation_cache(environ)
  cache = tmp_path / "t5x_like" / "jax_compilation_cache"
  assert environ["JAX_COMPILATION_CACHE_DIR"] == str(cache)
  run_python("import jax; print(jax.jit(lambda x: x + 1)(1.0))", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             **environ)
  assert len(list(cache.glob("*-cache"))) == 1
  assert len(list(cache.glob("*-atime"))) == 1  # the size cap's eviction keeps access times (and needs filelock)
  for given in ({"JAX_COMPILATION_CACHE_DIR": ""}, {"JAX_COMPILATION_CACHE_DIR": "/elsewhere"}):
    environ = dict(given)
    command.use_compilation_cache(environ)
    assert environ == given  # an empty one turns the cache off


def test_opting_out_or_choosing_a_value_runs_the_command_once_unchanged():
  _, tunables = run_python(RESTART, T5X_LIKE_HUGE_PAGES="0", GLIBC_TUNABLES="glibc.malloc.tcache_count=7")
  assert tunables == "glibc.malloc.tcache_count=7"
  _, tunables = run_python(RESTART, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
  assert tunables == "glibc.malloc.hugetlb=0"


# A jitted call whose 64 MiB output is a fresh malloc each time: glibc maps it anew (it is above
# the largest mmap threshold glibc adapts to, 32 MiB) and unmaps it when the last result dies.
FAULTS_PER_CALL = """
import resource
import jax, jax.numpy as jnp
double = jax.jit(lambda x: x * 2.0)
x = jnp.ones((16 * 2**20,), jnp.float32)
y = double(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  del y
  y = double(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


@needs_huge_pages
def test_huge_pages_fault_a_large_buffer_in_a_few_pages_where_4k_pages_fault_each():
  pages_4k = 64 * 2**20 / 4096
  with_tunable = float(run_python(FAULTS_PER_CALL, **host_memory.with_huge_pages({}))[0])
  assert with_tunable < 0.1 * pages_4k  # 32 huge pages, and 4 KiB ones at the unaligned ends
  if "[always]" not in host_memory.THP_SETTING.read_text():  # else the kernel uses huge pages anyway
    without = float(run_python(FAULTS_PER_CALL, GLIBC_TUNABLES="")[0])
    assert without > 0.9 * pages_4k


# 256 MiB freed below the heap's top: glibc keeps its pages until told to return them.
HEAP_FREED = """
import numpy as np
from t5x_like.host_memory import return_freed_memory
def resident_mib():
  return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
np.ones(2 << 20).sum()  # 16 MiB mapped and unmapped: glibc's mmap threshold rises past 4 MiB
held = [np.ones(1 << 19) for _ in range(64)]  # 64 x 4 MiB, now from the heap
pin = np.ones(1 << 19)  # above them, so that free alone cannot trim the heap's top
holding = resident_mib()
del held
freed = resident_mib()
return_freed_memory()
print(holding, freed, resident_mib())
"""


@pytest.mark.skipif(host_memory.glibc_version() is None, reason="malloc_trim is glibc's")
def test_memory_freed_in_the_heap_returns_to_the_system_when_asked():
  holding, freed, returned = map(float, run_python(HEAP_FREED, GLIBC_TUNABLES=""))
  assert freed > holding - 32  # free keeps the pages
  assert returned < freed - 200  # malloc_trim hands them back


# Two objects whose finalisers raise, as tensorstore's late callbacks do onto the loop orbax closed.
UNRAISABLE = """
import asyncio
from t5x_like.__main__ import start_command_process
start_command_process()
loop = asyncio.new_event_loop()
loop.close()
class LateCallback:
  def __del__(self):
    loop.call_soon_threadsafe(print)
class Broken:
  def __del__(self):
    raise ValueError("a finaliser's own error")
LateCallback()
Broken()
"""


def test_a_command_keeps_quiet_about_callbacks_onto_a_closed_loop_only():
  result = subprocess.run([sys.executable, "-c", UNRAISABLE], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "JAX_COMPILATION_CACHE_DIR": ""}, check=True)
  assert "Event loop is closed" not in result.stderr
  assert "ValueError: a finaliser's own error" in result.stderr
