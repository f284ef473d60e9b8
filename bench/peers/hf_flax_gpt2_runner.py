"""Hugging Face's Flax GPT-2 (transformers 4.46; version 5 dropped Flax) trained on random tokens.

Run with the peer's own Python (bench/peers.py builds it); prints one JSON line, see protocol.py.
Randomly initialised from a GPT2Config of the requested shape: nothing is downloaded. Dropout
is off, as in our decoder, so both time the same arithmetic.
"""

from __future__ import annotations

import importlib.metadata

import jax
import jax.numpy as jnp
from transformers import FlaxGPT2LMHeadModel, GPT2Config

import protocol
import timed_adamw


def main() -> None:
  args = protocol.parse_args(__doc__)
  config = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.emb_dim, n_layer=args.layers,
                      n_head=args.heads, n_inner=args.mlp_dim, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  model = FlaxGPT2LMHeadModel(config, input_shape=(1, args.seq), seed=0, dtype=jnp.dtype(args.dtype))

  def forward(params, tokens):
    return model(tokens, params=params, train=False).logits

  step_seconds = timed_adamw.median_step_seconds(forward, model.params, args)
  protocol.report(args, peer="hf_flax_gpt2", version=importlib.metadata.version("transformers"),
                  jax_version=jax.__version__,
                  arch="gpt2: LayerNorm, learned positions, GELU MLP, biases, tied embeddings",
                  gated=False, head_dim=args.emb_dim // args.heads, step_seconds=step_seconds)


if __name__ == "__main__":
  main()
