"""This machine's matmul peak, float32 and bf16 inputs with float32 accumulation, as one JSON line.

    python bench/matmul_peak.py [--size 2048]

Before every round, `bench/run.py` runs it twice, with t5x_like's XLA:CPU defaults and with XLA's own
(T5X_LIKE_XLA_DEFAULTS=0), and divides model FLOP/s by the better of the two: the peak is
what the hardware can do, not what one flag setting gets. A GPU needs larger products to
reach its peak (bench/gpu.sh uses 8192).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax.numpy as jnp  # noqa: E402

from t5x_like.hardware import measured_matmul_flops  # noqa: E402

if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=2048)
  size = parser.parse_args().size
  print(json.dumps({"size": size,
                    "float32": measured_matmul_flops(size, repeats=9, dtype=jnp.float32),
                    "bfloat16": measured_matmul_flops(size, repeats=9, dtype=jnp.bfloat16)}))
