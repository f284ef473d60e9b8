"""The `t5x-like` command (also `python -m t5x_like`): set up the process, then run the job.

A command restarts itself with glibc's huge pages (t5x_like/host_memory.py). The restart comes
before jax is imported, so it costs a bare interpreter: from inside t5x_like.cli, whose imports
bring in jax, a command imported it twice.
"""

import sys

from t5x_like.host_memory import exec_with_huge_pages


def start_command_process() -> None:
  """Sets up this process for a command line, before jax is imported where it can be."""
  exec_with_huge_pages()


def main() -> int:
  start_command_process()
  from t5x_like.cli import main as run_command
  return run_command(sys.argv[1:])


if __name__ == "__main__":
  sys.exit(main())
