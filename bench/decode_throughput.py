"""Decode tokens/s with and without the KV cache (a bench shape's decoder, greedy), as one JSON line.

    python bench/decode_throughput.py [--shape tiny] [--batch 8] [--prompt-len 16] [--new-tokens 256]
                                      [--strategies] [--dtype float32]

Without the cache every step reruns the full forward pass over the whole buffer (what
decoding costs without incremental state); both loops are compiled `lax` loops.
`bench/run.py` runs this and writes the figures to docs/benchmarks.md. --strategies times
each decoding strategy with the cache instead (greedy, sampling with and without top-k and
top-p, beam search), one JSON line each.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_throughput import SHAPES, VOCAB  # noqa: E402

from models.config import ModelConfig  # noqa: E402
from models.transformer import build_model  # noqa: E402
from t5x_like.decoding import DecodeConfig, generate  # noqa: E402
from t5x_like.hardware import call_seconds  # noqa: E402


@functools.partial(nnx.jit, static_argnames=("new_tokens",), graph_updates=False)  # no copy of the parameters out
def greedy_without_cache(model, prompt, *, new_tokens: int):
  batch, prompt_len = prompt.shape
  tokens = jnp.pad(prompt, ((0, 0), (0, new_tokens)))

  def step(i, tokens):
    logits = model(tokens)  # [b, total, v]: the whole buffer, every step
    next_token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, prompt_len - 1 + i, 1, False), -1)
    return jax.lax.dynamic_update_index_in_dim(tokens, next_token.astype(tokens.dtype), prompt_len + i, 1)

  return jax.lax.fori_loop(0, new_tokens, step, tokens)


def decoder(shape: str, max_len: int, dtype: str):
  """The default decoder at one of the training benchmark's shapes (its batch and length aside), in eval mode."""
  dims = {key: SHAPES[shape][key] for key in ("emb_dim", "num_layers", "num_heads", "mlp_dim")}
  model = build_model(ModelConfig(arch="decoder", vocab_size=VOCAB, max_len=max_len, dtype=dtype, **dims))
  model.eval()
  return model


def best_of_3(fn) -> float:
  return min(call_seconds(fn, repeats=3))


def measure(shape: str, batch: int, prompt_len: int, new_tokens: int) -> dict:
  """Best of 3 after compilation, for each loop; the cached one for a bfloat16 model too."""
  prompts = np.random.default_rng(0).integers(3, VOCAB, (batch, prompt_len)).tolist()
  config = DecodeConfig(max_new_tokens=new_tokens, eos_id=-1)  # never stop early
  models = {dtype: decoder(shape, prompt_len + new_tokens, dtype) for dtype in ("float32", "bfloat16")}
  cached = best_of_3(lambda: generate(models["float32"], prompts, config))
  cached_bf16 = best_of_3(lambda: generate(models["bfloat16"], prompts, config))
  uncached = best_of_3(lambda: greedy_without_cache(models["float32"], jnp.asarray(prompts, jnp.int32),
                                                    new_tokens=new_tokens))
  return {"shape": shape, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
          "cached_tokens_per_second": batch * new_tokens / cached,
          "bfloat16_cached_tokens_per_second": batch * new_tokens / cached_bf16,
          "uncached_tokens_per_second": batch * new_tokens / uncached}


STRATEGIES = ({}, {"strategy": "sample"}, {"strategy": "sample", "top_k": 40}, {"strategy": "sample", "top_p": 0.9},
              {"strategy": "sample", "temperature": 0.8, "top_k": 40, "top_p": 0.9},
              {"strategy": "beam", "num_beams": 4})


def measure_strategies(shape: str, batch: int, prompt_len: int, new_tokens: int, dtype: str):
  """Yields, per decoding strategy, its cached tokens/s and ms a step (best of 3 after compilation)."""
  model = decoder(shape, prompt_len + new_tokens, dtype)
  prompts = np.random.default_rng(0).integers(3, VOCAB, (batch, prompt_len)).tolist()
  for fields in STRATEGIES:
    seconds = best_of_3(lambda: generate(model, prompts, DecodeConfig(max_new_tokens=new_tokens, eos_id=-1,
                                                                      **fields)))
    yield {"shape": shape, "dtype": dtype, **fields, "tokens_per_second": batch * new_tokens / seconds,
           "ms_per_step": seconds / new_tokens * 1e3}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="a training benchmark shape")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt-len", type=int, default=16)
  parser.add_argument("--new-tokens", type=int, default=256)
  parser.add_argument("--strategies", action="store_true")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))  # with --strategies
  args = parser.parse_args()
  if args.strategies:
    for result in measure_strategies(args.shape, args.batch, args.prompt_len, args.new_tokens, args.dtype):
      print(json.dumps(result), flush=True)
  else:
    print(json.dumps(measure(args.shape, args.batch, args.prompt_len, args.new_tokens)))


if __name__ == "__main__":
  main()
