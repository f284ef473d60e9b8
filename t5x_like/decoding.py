"""Greedy decoding over the KV cache, compiled as one loop (the decoding issue adds sampling
and beam search on the same cache)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(nnx.jit, static_argnames=("max_new_tokens",))
def greedy_decode(model, prompt: jax.Array, prompt_lengths: jax.Array, *, max_new_tokens: int,
                  eos_id: int) -> jax.Array:
  """Continues right-padded prompts [b, p] (true lengths [b]) by max_new_tokens tokens.

  Each row is fed its own prompt; shorter rows are completed token by token while
  longer ones still read their prompt, so one cache serves prompts of any length.
  Returns [b, p + max_new_tokens]; tokens after a row's EOS are EOS.
  """
  batch, prompt_len = prompt.shape
  total = prompt_len + max_new_tokens
  tokens = jnp.pad(prompt, ((0, 0), (0, max_new_tokens)))
  cache = model.init_cache(batch, total)

  def step(i, carry):
    tokens, cache, done = carry
    logits, cache = model.decode(tokens[:, i:i + 1], cache)
    next_token = jnp.argmax(logits[:, -1], axis=-1).astype(tokens.dtype)
    in_prompt = i + 1 < prompt_lengths
    prompt_token = jax.lax.dynamic_index_in_dim(tokens, i + 1, axis=1, keepdims=False)
    next_token = jnp.where(in_prompt, prompt_token, next_token)
    next_token = jnp.where(done, eos_id, next_token)
    done = done | (~in_prompt & (next_token == eos_id))
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, next_token, i + 1, axis=1)
    return tokens, cache, done

  tokens, _, _ = jax.lax.fori_loop(0, total - 1, step, (tokens, cache, jnp.zeros(batch, bool)))
  return tokens
