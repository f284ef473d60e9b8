"""Two variants of our training step in one process, their steps alternating: B's time over A's.

    python bench/paired_step.py [--shape tiny] [--dtype float32] [--arch default] [--pairs 40]
                                [--a '{}'] --b '{"mlp_activation": "gelu_tanh"}'

--a and --b are model-config overrides (JSON) on top of --arch. Both steps are compiled first;
then each pair times one step of each, A then B and B then A in turn, so a slow spell of a shared
VM lands on both sides of a ratio. The figure is the median of the per-pair ratios, with their
quartiles. Alternating processes could not resolve 5% on a noisy VM (docs/performance.md, item
29); 40 to 80 pairs resolve 1 to 2% (item 31). Only what a config field selects can be paired
this way. Both steps' buffers live in one process, which makes its steps slower than a lone
process's: a change that drops activation-sized buffers gained 3 to 5% in pairs and 0 to 2%
alone (item 31), so confirm a gain with `bench/run.py --baselines`. Like `t5x-like`, it
restarts itself with glibc's huge-page tunable (t5x_like/host_memory.py; T5X_LIKE_HUGE_PAGES=0
opts out).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

import train_throughput
from t5x_like.host_memory import exec_with_huge_pages


def stepper(shape: str, dtype: str, arch: str, overrides: dict):
  """A call that runs one training step, compiled before this returns; the state carries over."""
  trainer, batch = train_throughput.build(shape, dtype, arch, **overrides)
  arguments = train_throughput.step_arguments(trainer, batch)
  with jax.set_mesh(trainer.mesh):
    step = trainer.train_step.lower(trainer.state, *arguments).compile()
  state = trainer.state

  def call():
    nonlocal state
    with jax.set_mesh(trainer.mesh):
      state, metrics = step(state, *arguments)
      jax.block_until_ready(metrics)
  return call


def timed_pairs(step_a, step_b, pairs: int, clock=time.perf_counter) -> tuple[list[float], list[float]]:
  """Seconds of `pairs` calls of each step, in A-B and B-A order in turn."""
  seconds = {"a": [], "b": []}
  steps = {"a": step_a, "b": step_b}
  for pair in range(pairs):
    for side in ("a", "b") if pair % 2 == 0 else ("b", "a"):
      start = clock()
      steps[side]()
      seconds[side].append(clock() - start)
  return seconds["a"], seconds["b"]


def summary(seconds_a: list[float], seconds_b: list[float]) -> dict:
  """Each side's median and fastest step, and the median and quartiles of the pairs' B/A ratios."""
  ratios = np.asarray(seconds_b) / np.asarray(seconds_a)
  return {"a_median_ms": 1e3 * float(np.median(seconds_a)), "a_fastest_ms": 1e3 * min(seconds_a),
          "b_median_ms": 1e3 * float(np.median(seconds_b)), "b_fastest_ms": 1e3 * min(seconds_b),
          "b_over_a": float(np.median(ratios)),
          "quartiles": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))]}


def main() -> None:
  exec_with_huge_pages()
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", default="tiny", choices=sorted(train_throughput.SHAPES))
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--arch", default="default", choices=sorted(train_throughput.ARCHS))
  parser.add_argument("--pairs", type=int, default=40)
  parser.add_argument("--warmup", type=int, default=train_throughput.WARMUP_STEPS, help="untimed pairs first")
  parser.add_argument("--a", default="{}", help="model-config overrides of A, as JSON")
  parser.add_argument("--b", default="{}", help="model-config overrides of B, as JSON")
  args = parser.parse_args()

  overrides = {"a": json.loads(args.a), "b": json.loads(args.b)}
  if overrides["a"] == overrides["b"]:
    parser.error("--a and --b are the same config: give --b the change to time")
  step_a, step_b = (stepper(args.shape, args.dtype, args.arch, overrides[side]) for side in ("a", "b"))
  timed_pairs(step_a, step_b, args.warmup)
  result = summary(*timed_pairs(step_a, step_b, args.pairs))
  result.update(shape=args.shape, dtype=args.dtype, arch=args.arch, **overrides, pairs=args.pairs,
                huge_pages="glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", ""))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
