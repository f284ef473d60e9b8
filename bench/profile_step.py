"""Where a training step's time goes: XLA ops ranked by time, with their shapes and source.

    python bench/profile_step.py [--shape tiny] [--dtype float32] [--arch default] [--top 30] [--steps 3]
                                 [--bf16-matmul-inputs] [--loss-kernel xla] [--attention-kernel xla]
                                 [--init-on-host]

Traces a few compiled train steps with jax.profiler, sums each XLA op's time over the
trace (both CPU threads), and names it with its output shape and the jax op it came from,
read from the compiled HLO. docs/performance.md was worked out with this. On CPU, Eigen's
matmuls run outside the traced thunks: the untraced remainder of the step is matmul time. On a
GPU it sums the kernels of the trace's streams, named as the GPU runs them (cuBLAS and cuDNN
kernels by their own names).
It restarts itself with glibc's huge-page tunable, as `t5x-like` and bench/run.py's runners do
(t5x_like/host_memory.py; T5X_LIKE_HUGE_PAGES=0 opts out): with 4 KiB pages the fusions that
touch the step's freshly mapped buffers first take many times longer (docs/performance.md, item 34).
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import tempfile
import time

import jax

import train_throughput
from t5x_like.host_memory import exec_with_huge_pages


def op_seconds_per_step(profile, steps: int) -> collections.Counter:
  """Each XLA op's traced seconds per step: XLA:CPU's worker threads, or a GPU's kernels by name."""
  op_seconds = collections.Counter()
  for plane in profile.planes:
    on_gpu = plane.name.startswith("/device:GPU")
    for line in plane.lines:
      if line.name.startswith("Stream") if on_gpu else ("Eigen" in line.name):  # other lines are bookkeeping
        for event in line.events:
          if not event.name.startswith(("ThunkExecutor", "SlinkyThreadPool", "end:")):
            op_seconds[event.name] += event.duration_ns / 1e9 / steps
  return op_seconds


def main() -> None:
  exec_with_huge_pages()
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", default="tiny", choices=sorted(train_throughput.SHAPES))
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--arch", default="default", choices=sorted(train_throughput.ARCHS))
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=30)
  parser.add_argument("--bf16-matmul-inputs", action="store_true")
  parser.add_argument("--loss-kernel", choices=("xla", "chunked"), default=None)
  parser.add_argument("--attention-kernel", choices=("xla", "blocked", "cudnn"), default=None)
  parser.add_argument("--init-on-host", action="store_true")
  args = parser.parse_args()

  trainer, batch = train_throughput.build(args.shape, args.dtype, args.arch, args.init_on_host,
                                          attention_kernel=args.attention_kernel,
                                          bf16_matmul_inputs=args.bf16_matmul_inputs or None,
                                          loss_kernel=args.loss_kernel)
  state, arguments = trainer.state, train_throughput.step_arguments(trainer, batch)
  with jax.set_mesh(trainer.mesh), tempfile.TemporaryDirectory() as trace_dir:
    step = trainer.train_step.lower(state, *arguments).compile()  # compiled once, here
    hlo = step.as_text()
    for _ in range(train_throughput.WARMUP_STEPS):
      state, metrics = step(state, *arguments)
      jax.block_until_ready(metrics)
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
      for _ in range(args.steps):
        state, metrics = step(state, *arguments)
        jax.block_until_ready(metrics)
    wall = (time.perf_counter() - start) / args.steps
    profile = jax.profiler.ProfileData.from_file(str(next(pathlib.Path(trace_dir).rglob("*.xplane.pb"))))

  op_seconds = op_seconds_per_step(profile, args.steps)
  if not op_seconds:
    raise SystemExit("no XLA op events in the trace; its lines: " + "; ".join(
        f"{plane.name}: {[line.name for line in plane.lines]}" for plane in profile.planes))
  described = {}
  for line in hlo.splitlines():
    match = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
    if match:
      source = re.search(r'op_name="([^"]*)"', line)
      described[match.group(1)] = f"{match.group(2):32s} {source.group(1)[-70:] if source else ''}"
  by_kind = collections.Counter()
  for name, seconds in op_seconds.items():
    by_kind[re.sub(r"\.\d+$", "", name)] += seconds
  print(f"{args.shape} {args.arch} {args.dtype}: {wall * 1e3:.0f} ms/step wall, "
        f"{sum(op_seconds.values()) * 1e3:.0f} ms traced in XLA ops (summed over threads)")
  print("\nby kind (ms/step):")
  for kind, seconds in by_kind.most_common(12):
    print(f"  {seconds * 1e3:8.1f}  {kind}")
  print(f"\ntop {args.top} ops (ms/step):")
  for name, seconds in op_seconds.most_common(args.top):
    print(f"  {seconds * 1e3:8.1f}  {name:30s} {described.get(name, '')}")


if __name__ == "__main__":
  main()
