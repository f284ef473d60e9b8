"""The `t5x-like` command (also `python -m t5x_like`): restart with huge pages, then run the job.

The restart comes before jax is imported, so it costs a bare interpreter; from inside
t5x_like.cli, whose imports bring in jax, each command paid for importing it twice.
"""

import sys

from t5x_like.host_memory import exec_with_huge_pages


def main() -> int:
  exec_with_huge_pages()
  from t5x_like.cli import main as run_command
  return run_command()


if __name__ == "__main__":
  sys.exit(main())
