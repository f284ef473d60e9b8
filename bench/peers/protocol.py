"""What every peer runner shares: its command line, the FLOP count and the one JSON line it prints.

Runners run under each peer's own virtual environment, never ours, and import this file
from beside them (a script's own folder comes first on sys.path); the tests load it by path
to check its FLOP count against ours. Standard library only, so any of those Pythons can load it.
"""

from __future__ import annotations

import argparse
import json
import platform


def parse_args(description: str) -> argparse.Namespace:
  """--emb-dim --layers --heads --mlp-dim --seq --batch --vocab --steps --warmup --dtype.

  --warmup steps run untimed after the compiling one, as bench/train_throughput.py runs ours.
  """
  parser = argparse.ArgumentParser(description=description)
  for name in ("emb-dim", "layers", "heads", "mlp-dim", "seq", "batch", "vocab", "steps", "warmup"):
    parser.add_argument(f"--{name}", type=int, required=True)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  return parser.parse_args()


def train_flops_per_step(*, emb_dim: int, layers: int, heads: int, head_dim: int, mlp_dim: int,
                         seq: int, batch: int, vocab: int, gated: bool) -> int:
  """Model FLOPs of one training step by PaLM's count (Chowdhery et al. 2022, app. B).

  6 per matmul parameter per token (q/k/v/o, the MLP's matrices: 3 when gated, and the
  vocabulary projection even when tied to the embedding; not the lookup, not positions),
  plus 12 x layers x seq x attention width per token for QK^T and AV; recomputation not counted.
  """
  attention_width = heads * head_dim
  per_layer = 4 * emb_dim * attention_width + (3 if gated else 2) * emb_dim * mlp_dim
  matmul_params = layers * per_layer + emb_dim * vocab
  return batch * seq * (6 * matmul_params + 12 * layers * seq * attention_width)


def report(args: argparse.Namespace, *, peer: str, version: str, jax_version: str, arch: str,
           gated: bool, head_dim: int, step_seconds: float) -> None:
  """Prints the runner's one JSON line on stdout."""
  flops = train_flops_per_step(emb_dim=args.emb_dim, layers=args.layers, heads=args.heads, head_dim=head_dim,
                               mlp_dim=args.mlp_dim, seq=args.seq, batch=args.batch, vocab=args.vocab,
                               gated=gated)
  print(json.dumps({
      "peer": peer, "version": version, "jax": jax_version, "python": platform.python_version(),
      "arch": arch, "dtype": args.dtype, "step_seconds": step_seconds,
      "tokens_per_second": args.batch * args.seq / step_seconds,
      "flops_per_step": flops, "model_flops_per_second": flops / step_seconds,
  }), flush=True)
