"""The `t5x-like` command (also `python -m t5x_like`): set up the process, then run the job.

A command keeps what it compiles in jax's persistent compilation cache, so that a rerun, a
resume, or an evaluation after training loads its programs instead of compiling them again; and
it restarts itself with glibc's huge pages (t5x_like/host_memory.py). The restart comes before
jax is imported, so it costs a bare interpreter: from inside t5x_like.cli, whose imports bring
in jax, a command imported it twice.
"""

import os
import pathlib
import sys
from typing import Any, Callable, MutableMapping

from t5x_like.host_memory import exec_with_huge_pages

# Past this size jax evicts the least recently used programs (its eviction needs filelock).
COMPILATION_CACHE_BYTES = 2 << 30


def use_compilation_cache(environ: MutableMapping[str, str]) -> None:
  """jax's persistent compilation cache under $XDG_CACHE_HOME/t5x_like (~/.cache by default),
  unless JAX_COMPILATION_CACHE_DIR is set already (set empty, it turns the cache off)."""
  if "JAX_COMPILATION_CACHE_DIR" in environ:
    return
  cache_home = pathlib.Path(environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
  environ["JAX_COMPILATION_CACHE_DIR"] = str(cache_home / "t5x_like" / "jax_compilation_cache")
  environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(COMPILATION_CACHE_BYTES))


def ignore_closed_loop_callbacks(hook: Callable[[Any], None]) -> Callable[[Any], None]:
  """sys.unraisablehook `hook`, less the tracebacks of callbacks onto an asyncio loop already
  closed: after a failed checkpoint write (a full disk) tensorstore's outstanding writes
  report back to the loop orbax closed on the first error, dozens of them after the one line
  that names the failure, and nothing is left to hear them."""
  def unraisable(info) -> None:
    if isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed":
      return
    hook(info)
  return unraisable


def start_command_process() -> None:
  """Sets up this process for a command line, before jax is imported where it can be."""
  use_compilation_cache(os.environ)
  exec_with_huge_pages()  # the restarted process inherits the cache's settings
  sys.unraisablehook = ignore_closed_loop_callbacks(sys.unraisablehook)


def main() -> int:
  start_command_process()
  from t5x_like.cli import main as run_command
  return run_command(sys.argv[1:])


if __name__ == "__main__":
  sys.exit(main())
