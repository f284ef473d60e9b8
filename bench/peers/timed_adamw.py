"""The training step the EasyDeL and Hugging Face runners time: next-token cross-entropy, AdamW.

Written here rather than taken from either library's trainer so that both time the same
step around their own model. The update rule is ours and MaxText's default (b2 0.95, weight
decay 0.1, global-norm clip 1.0), so what differs between peers is the model's compiled code.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def median_step_seconds(forward: Callable[[Any, jax.Array], jax.Array], params: Any,
                        args: argparse.Namespace) -> float:
  """Median wall time of args.steps steps after one compiling and args.warmup untimed steps, each waited for.

  forward(params, tokens [batch, seq]) returns logits [batch, seq, vocab]; params are donated.
  """
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1))

  def loss_fn(params, tokens):
    logits = forward(params, tokens[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, tokens):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq + 1), 0, args.vocab)  # random: speed only
  state, _ = jax.block_until_ready(train_step((params, optimizer.init(params)), tokens))
  for _ in range(args.warmup):
    state, _ = jax.block_until_ready(train_step(state, tokens))
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, _ = jax.block_until_ready(train_step(state, tokens))
    times.append(time.perf_counter() - start)
  return statistics.median(times)
