"""The ceiling a training step can reach here: its own matmuls alone, forward and backward.

    python bench/matmul_floor.py [--shape tiny] [--bf16-matmul-inputs]

Chains exactly the matmuls of one step of our decoder at a bench shape (q, k, v, o and
the MLP per layer, both attention products, the vocabulary projection) with nothing
between them but residual adds, returns the sum of the logits and its gradient, and reports
model FLOP/s by the same count as bench/train_throughput.py. The projections go through
`models.layers.project`, as the model's do, so --bf16-matmul-inputs rounds the same
products the model option does; attention products stay float32, as in the model; the
table's gradient is taken as the chunked loss takes it (`tokens_contracted`). No
implementation whose matmuls go through XLA:CPU can beat this figure; the gap to a real
step is everything else (norms, softmax, activations, loss, optimizer, layout copies).
bench/run.py adds it to each shape's table. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import t5x_like  # noqa: E402,F401  (the package's XLA:CPU defaults, as in a training run)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from train_throughput import SHAPES, VOCAB, WARMUP_STEPS  # noqa: E402

from models.config import ModelConfig  # noqa: E402
from models.layers import project, tokens_contracted  # noqa: E402
from models.model_size import train_flops_per_sequence  # noqa: E402
from t5x_like.hardware import call_seconds  # noqa: E402


def vocabulary_logits(bf16_inputs: bool):
  """x [n, d] against the table [v, d], differentiated with the chunked loss's products."""

  @jax.custom_vjp
  def logits(x, table):
    return project(x, table, kernel_in_dim=1, bf16_inputs=bf16_inputs)

  def forward(x, table):
    return logits(x, table), (x, table)

  def backward(saved, d_logits):
    x, table = saved
    d_x = project(d_logits, table, kernel_in_dim=0, bf16_inputs=bf16_inputs)
    return d_x, tokens_contracted(x, d_logits, bf16_inputs=bf16_inputs).T

  logits.defvjp(forward, backward)
  return logits


def step_matmuls(shape: dict, bf16_inputs: bool = False) -> tuple:
  b, t, d, f = shape["batch_size"], shape["seq_len"], shape["emb_dim"], shape["mlp_dim"]
  h, layers = shape["num_heads"], shape["num_layers"]
  e = d // h
  dense = lambda x, w: project(x, w, kernel_in_dim=0, bf16_inputs=bf16_inputs)  # noqa: E731
  logits = vocabulary_logits(bf16_inputs)

  def loss(params, x):
    for layer in params["layers"]:
      heads = lambda w: dense(x, w).reshape(b, t, h, e)  # noqa: E731
      q, k, v = heads(layer["q"]), heads(layer["k"]), heads(layer["v"])
      scores = jnp.einsum("bthe,bshe->bhts", q, k)
      out = jnp.einsum("bhts,bshe->bthe", scores, v).reshape(b * t, d)
      x = x + dense(out, layer["o"])
      x = x + dense(dense(x, layer["w1"]), layer["w2"])
    return jnp.sum(logits(x, params["embed"]))

  keys = iter(jax.random.split(jax.random.key(0), 6 * layers + 2))
  init = lambda *dims: jax.random.normal(next(keys), dims) * 0.02  # noqa: E731
  params = {"layers": [dict(q=init(d, d), k=init(d, d), v=init(d, d), o=init(d, d), w1=init(d, f), w2=init(f, d))
                       for _ in range(layers)], "embed": init(VOCAB, d)}
  config = ModelConfig(vocab_size=VOCAB, emb_dim=d, num_heads=h, mlp_dim=f, num_layers=layers, max_len=t)
  flops = b * train_flops_per_sequence(config, t)  # our default block: the same matmuls
  # Differentiating the input too keeps the first layer's input-gradient matmuls, as the
  # embeddings do in a real step. The value is returned as well: with the gradient alone the
  # backward never reads the logits, and their product was dropped as unused (before session
  # 48 the floor was credited with that product and did not run it: docs/performance.md, item 62).
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params, init(b * t, d), flops


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
  parser.add_argument("--bf16-matmul-inputs", action="store_true", help="as the model option of that name")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="untimed calls after the compiling one")
  args = parser.parse_args()
  shape = SHAPES[args.shape]
  grad, params, x, flops = step_matmuls(shape, args.bf16_matmul_inputs)
  times = call_seconds(lambda: grad(params, x), args.repeats, args.warmup)
  seconds = statistics.median(times)
  print(json.dumps({"shape": args.shape, "dtype": "float32, bf16 matmul inputs" if args.bf16_matmul_inputs
                    else "float32", "step_seconds": seconds,
                    "tokens_per_second": shape["batch_size"] * shape["seq_len"] / seconds,
                    "model_flops_per_second": flops / seconds}))


if __name__ == "__main__":
  main()
