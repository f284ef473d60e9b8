"""The ceiling a training step can reach here: its own matmuls alone, forward and backward.

    python bench/matmul_floor.py [--shape tiny] [--bf16-inputs]

Chains exactly the matmuls of one step of our decoder at a bench shape (q, k, v, o and
the MLP per layer, both attention products, the vocabulary projection) with nothing
between them but residual adds, differentiates the sum of the logits, and reports
model FLOP/s by the same count as bench/train_throughput.py. No implementation whose
matmuls go through XLA:CPU can beat this figure; the gap to a real step is everything
else (norms, softmax, activations, loss, optimizer, layout copies). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import t5x_like  # noqa: E402,F401  (the package's XLA:CPU defaults, as in a training run)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from train_throughput import SHAPES, VOCAB  # noqa: E402

from models.config import ModelConfig  # noqa: E402
from models.model_size import train_flops_per_sequence  # noqa: E402


def step_matmuls(shape: dict, dtype) -> tuple:
  b, t, d, f = shape["batch_size"], shape["seq_len"], shape["emb_dim"], shape["mlp_dim"]
  h, layers = shape["num_heads"], shape["num_layers"]
  e = d // h

  def loss(params, x):
    for layer in params["layers"]:
      heads = lambda w: (x @ w.astype(dtype)).reshape(b, t, h, e)  # noqa: E731
      q, k, v = heads(layer["q"]), heads(layer["k"]), heads(layer["v"])
      scores = jnp.einsum("bthe,bshe->bhts", q, k, preferred_element_type=jnp.float32)
      out = jnp.einsum("bhts,bshe->bthe", scores.astype(dtype), v).reshape(b * t, d)
      x = x + out @ layer["o"].astype(dtype)
      x = x + (x @ layer["w1"].astype(dtype)) @ layer["w2"].astype(dtype)
    return jnp.sum((x @ params["embed"].T.astype(dtype)).astype(jnp.float32))

  keys = iter(jax.random.split(jax.random.key(0), 6 * layers + 2))
  init = lambda *dims: jax.random.normal(next(keys), dims) * 0.02  # noqa: E731
  params = {"layers": [dict(q=init(d, d), k=init(d, d), v=init(d, d), o=init(d, d), w1=init(d, f), w2=init(f, d))
                       for _ in range(layers)], "embed": init(VOCAB, d)}
  config = ModelConfig(vocab_size=VOCAB, emb_dim=d, num_heads=h, mlp_dim=f, num_layers=layers, max_len=t)
  flops = b * train_flops_per_sequence(config, t)  # our default block: the same matmuls
  # Differentiating the input too keeps the first layer's input-gradient matmuls, as the
  # embeddings do in a real step.
  return jax.jit(jax.grad(loss, argnums=(0, 1))), params, init(b * t, d).astype(dtype), flops


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
  parser.add_argument("--bf16-inputs", action="store_true", help="activations in bf16 (weights cast per use)")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  grad, params, x, flops = step_matmuls(SHAPES[args.shape], jnp.bfloat16 if args.bf16_inputs else jnp.float32)
  jax.block_until_ready(grad(params, x))
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    jax.block_until_ready(grad(params, x))
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  print(json.dumps({"shape": args.shape, "bf16_inputs": args.bf16_inputs, "step_seconds": seconds,
                    "model_flops_per_second": flops / seconds}))


if __name__ == "__main__":
  main()
