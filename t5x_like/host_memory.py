"""Restart a command with glibc's huge-page tunable, so XLA:CPU's per-step buffers stop page-faulting.

XLA:CPU mallocs each call's temporaries as one buffer (1.9 GB for the medium benchmark step,
300 MB for the tiny one) and frees it on return. glibc maps an allocation that large freshly
and unmaps it on free, so every step faults all of its 4 KB pages in again and the kernel
zeroes each: about 490,000 faults and a second of kernel time per medium step. With
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, glibc asks for transparent huge pages on such
mappings and a step faults about a thousand 2 MB pages instead (docs/performance.md, item 24).

glibc reads tunables only when a process starts, so the command entry points call
`exec_with_huge_pages()` to restart themselves once with it set; notebooks and other Python
callers export it themselves. T5X_LIKE_HUGE_PAGES=0 opts out.

Allocations below 32 MB (most parameters) come from malloc's heaps once glibc has raised its
mmap threshold, and pages freed there stay with the process: where a whole train state is freed
and read again (a resume, a fine-tune's start), the reads landed beside them.
`return_freed_memory()` hands such pages back (docs/performance.md, item 67).
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import sys

TUNABLE = "glibc.malloc.hugetlb=1"  # glibc >= 2.35: madvise(MADV_HUGEPAGE) on malloc's mappings
THP_SETTING = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def glibc_version() -> tuple[int, int] | None:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
  except (ValueError, OSError, AttributeError):  # not glibc: macOS, Windows, musl
    return None
  return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else None


def huge_pages_available() -> bool:
  """glibc has the tunable and the kernel grants transparent huge pages on request."""
  version = glibc_version()
  try:
    kernel_setting = THP_SETTING.read_text()
  except OSError:
    return False
  return version is not None and version >= (2, 35) and "[never]" not in kernel_setting


def with_huge_pages(environ: dict[str, str]) -> dict[str, str]:
  """environ with TUNABLE added to GLIBC_TUNABLES, unless opted out, already set or of no use."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if (environ.get("T5X_LIKE_HUGE_PAGES", "1") == "0" or "glibc.malloc.hugetlb" in tunables
      or not huge_pages_available()):
    return dict(environ)
  return dict(environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, TUNABLE))))


def exec_with_huge_pages() -> None:
  """Restarts this command with `with_huge_pages(os.environ)`, if that differs from it.

  Call it early in a command's entry point, never from library code: the restart replaces
  the process.
  """
  env = with_huge_pages(dict(os.environ))
  if env.get("GLIBC_TUNABLES") != os.environ.get("GLIBC_TUNABLES"):
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def return_freed_memory() -> None:
  """Returns the free pages of glibc's heaps to the system (malloc_trim), after a big free and
  before the memory is needed again; elsewhere than glibc it does nothing.

  A fixed mmap threshold (the `glibc.malloc.mmap_threshold` tunable) would return them at every
  free, but made the tiny step 1.3x slower, mapping its buffers afresh on each call."""
  if glibc_version() is not None:
    ctypes.CDLL(None).malloc_trim(0)
