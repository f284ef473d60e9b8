"""How fast XLA multiplies a step's matmul shapes in each operand layout, on this machine.

    python bench/matmul_layouts.py [--shape tiny] [--repeats 20] [--bf16-matmul-inputs]

For each projection of a bench shape, x [n, in] times a kernel to [n, out], in float32:
- `forward`: x @ w, w stored [in, out] (Dense);
- `forward, [out, in]`: x against w stored [out, in] (the tied output projection);
- `weight gradient`: x and dy [n, out] contracted over the tokens, both operands' first dims;
- `same, x transposed first`: x.T materialised, then a plain matmul (`tokens_contracted`).
With --bf16-matmul-inputs every product rounds its inputs to bfloat16 (float32 accumulation)
and a fifth layout is timed, `same, transposed in blocks`: the weight gradient as
`tokens_contracted(..., bf16_inputs=True)` takes it.
XLA:CPU hands the weight-gradient layout to a different library than plain products, so
its speed differs by CPU; docs/performance.md (items 15 to 18) reads these figures.
Prints GFLOP/s per shape and layout, the fastest of --repeats calls each, as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import t5x_like  # noqa: E402,F401  (the package's XLA:CPU defaults, as in a training run)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from train_throughput import SHAPES, VOCAB  # noqa: E402

from models.layers import project, tokens_contracted  # noqa: E402
from t5x_like.hardware import call_seconds  # noqa: E402


def autodiff_weight_gradient(x, d_out):
  """What autodiff computes for x @ w's kernel: one product contracting both operands' first dims."""
  return jax.lax.dot_general(x, d_out.astype(x.dtype), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def layouts(bf16: bool) -> dict:
  """The model's own products (models.layers); with bf16, what autodiff and a plain transpose would do too."""
  rounded = (lambda a: a.astype(jnp.bfloat16)) if bf16 else (lambda a: a)  # noqa: E731
  timed = {
      "forward": lambda x, w, w_t, dy: project(x, w, kernel_in_dim=0, bf16_inputs=bf16),
      "forward, [out, in]": lambda x, w, w_t, dy: project(x, w_t, kernel_in_dim=1, bf16_inputs=bf16),
      "weight gradient": lambda x, w, w_t, dy: autodiff_weight_gradient(rounded(x), dy),
      "same, x transposed first": lambda x, w, w_t, dy: tokens_contracted(rounded(x), dy),
  }
  if bf16:
    timed["same, transposed in blocks"] = lambda x, w, w_t, dy: tokens_contracted(x, dy, bf16_inputs=True)
  return timed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--bf16-matmul-inputs", action="store_true", help="round every product's inputs to bfloat16")
  args = parser.parse_args()
  shape = SHAPES[args.shape]
  n, d, f = shape["batch_size"] * shape["seq_len"], shape["emb_dim"], shape["mlp_dim"]
  # The layers' projections at every token; the vocabulary projection at the chunked loss's 512.
  keys = jax.random.split(jax.random.key(0), 3)
  for tokens, d_in, d_out in ((n, d, d), (n, d, f), (n, f, d), (512, d, VOCAB), (512, VOCAB, d)):
    x = jax.random.normal(keys[0], (tokens, d_in))
    w = jax.random.normal(keys[1], (d_in, d_out))
    dy = jax.random.normal(keys[2], (tokens, d_out))
    flops = 2 * tokens * d_in * d_out
    operands = (x, w, w.T.copy(), dy)
    figures = {}
    for name, layout in layouts(args.bf16_matmul_inputs).items():
      compiled = jax.jit(layout)
      figures[name] = round(flops / min(call_seconds(lambda: compiled(*operands), args.repeats)) / 1e9)
    print(json.dumps({"tokens": tokens, "in": d_in, "out": d_out, "gflops": figures}), flush=True)


if __name__ == "__main__":
  main()
