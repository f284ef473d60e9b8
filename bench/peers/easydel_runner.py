"""EasyDeL's LLaMA (an NNX model) trained on random tokens by a plain jitted AdamW step.

Run with the peer's own Python (bench/peers.py builds it); prints one JSON line, see protocol.py.
LLaMA because EasyDeL 0.3.0's GPT-2 does not run. Heads are emb_dim / heads wide with as many
key/value heads as query heads; attention runs in the requested dtype (EasyDeL's default is
bfloat16 whatever the model's dtype); weights stay float32, as ours do.
"""

from __future__ import annotations

import importlib.metadata

import easydel
import jax
import jax.numpy as jnp
from flax import nnx

import protocol
import timed_adamw


def main() -> None:
  args = protocol.parse_args(__doc__)
  dtype, head_dim = jnp.dtype(args.dtype), args.emb_dim // args.heads
  config = easydel.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.emb_dim, intermediate_size=args.mlp_dim,
      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
      head_dim=head_dim, max_position_embeddings=args.seq, attn_dtype=dtype)
  model = easydel.LlamaForCausalLM(config, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params, others = model.split_module()

  def forward(params, tokens):
    return model.merge_module(graphdef, params, others)(input_ids=tokens).logits

  with model.mesh:  # EasyDeL's layers constrain activations to the model's own mesh
    step_seconds = timed_adamw.median_step_seconds(forward, params, args)
  protocol.report(args, peer="easydel", version=importlib.metadata.version("easydel"),
                  jax_version=jax.__version__, arch="llama: RMSNorm, RoPE, SwiGLU, untied",
                  gated=True, head_dim=head_dim, step_seconds=step_seconds)


if __name__ == "__main__":
  main()
