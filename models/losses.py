"""Token-level cross-entropy with optional z-loss, summed so that batches accumulate exactly."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from models.layers import project, rounds_to_bf16, row_max, row_sum, token_sum, tokens_contracted


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                       z_loss: float = 0.0) -> dict[str, jax.Array]:
  """Weighted sums over tokens: loss (cross-entropy + z-loss), cross-entropy, z-loss, correct, weight.

  logits [b, t, v] (float32), targets [b, t], weights [b, t] (0 for padding and for
  positions that carry no loss). z-loss is z_loss * log(Z)^2 (PaLM, Chowdhery et al.
  2022, sec. 5), which keeps the softmax normaliser near 1 in low precision.
  Dividing by the summed weight gives means; sums let gradient accumulation and
  data-parallel shards add up to the same result as one large batch.
  """
  max_logit, _, _, log_z, target_logit, ties = _token_statistics(logits.astype(jnp.float32), targets)
  return _sums(log_z, target_logit, max_logit, ties, weights.astype(jnp.float32), z_loss)


def _token_statistics(logits, targets):
  """Per token of logits [..., v]: max, exp(logits - max), their sum, log Z, the target's logit, and
  how many logits reach the max."""
  max_logit = jax.lax.stop_gradient(row_max(logits))
  exp = jnp.exp(logits - max_logit[..., None])
  total = row_sum(exp)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ties = row_sum((logits == max_logit[..., None]).astype(jnp.float32))
  return max_logit, exp, total, max_logit + jnp.log(total), target_logit, ties


def _sums(log_z, target_logit, max_logit, ties, weights, z_loss):
  """The summed statistics from each token's log-normaliser, target logit, maximum and the
  number of logits at the maximum."""
  nll = log_z - target_logit
  z_term = z_loss * jnp.square(log_z)
  # A target at the row maximum shared with k - 1 other ids counts 1/k correct, the expected
  # accuracy of breaking the tie at random: a model whose logits are all equal scores chance, not 1.
  correct = jnp.where(target_logit >= max_logit, 1.0 / ties, 0.0)
  return {
      "loss": jnp.sum((nll + z_term) * weights),
      "cross_entropy": jnp.sum(nll * weights),
      "z_loss": jnp.sum(z_term * weights),
      "correct": jnp.sum(correct * weights),
      "weight": jnp.sum(weights),
  }


def chunked_cross_entropy_sums(hidden: jax.Array, table: jax.Array, targets: jax.Array, weights: jax.Array,
                               z_loss: float = 0.0, *, table_in_dim: int, bias: jax.Array | None = None,
                               bf16_inputs: bool = False, chunk_tokens: int = 512) -> dict[str, jax.Array]:
  """`cross_entropy_sums` of the logits hidden @ table (+ bias), without the [b, t, v] logits.

  hidden [b, t, d]; table [v, d] (table_in_dim=1, a tied embedding) or [d, v]
  (table_in_dim=0, an output kernel); bias [v] or None. The tokens go through in chunks
  of about `chunk_tokens`, along the sequence so a batch-sharded mesh slices no shard:
  each chunk's logits and their gradient stay in cache instead of making several passes
  over a [b, t, v] array in memory (Liger's fused linear cross-entropy, Hsu et al. 2024).
  The gradient is computed in the same pass, so nothing is recomputed for the backward.
  Only `loss` carries a gradient; the other sums are metrics.
  """
  batch, length = targets.shape
  chunk = max(1, min(length, chunk_tokens // batch))
  padding = -length % chunk
  if padding:  # padded positions carry no weight
    pad = lambda x: jnp.pad(x, [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    hidden, targets, weights = pad(hidden), pad(targets), pad(weights)
  sums = _chunked_cross_entropy(hidden, table, bias, targets, weights.astype(jnp.float32),
                                float(z_loss), table_in_dim, bf16_inputs, chunk)
  return {name: value if name == "loss" else jax.lax.stop_gradient(value) for name, value in sums.items()}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _chunked_cross_entropy(hidden, table, bias, targets, weights, z_loss, table_in_dim, bf16_inputs, chunk):
  sums, _ = _chunked_pass(hidden, table, bias, targets, weights, z_loss, table_in_dim, bf16_inputs, chunk,
                          with_gradient=False)
  return sums


def _chunked_forward(hidden, table, bias, targets, weights, z_loss, table_in_dim, bf16_inputs, chunk):
  return _chunked_pass(hidden, table, bias, targets, weights, z_loss, table_in_dim, bf16_inputs, chunk,
                       with_gradient=True)


def _chunked_backward(z_loss, table_in_dim, bf16_inputs, chunk, gradients, d_sums):
  d_hidden, d_table, d_bias = jax.tree.map(lambda g: (d_sums["loss"] * g).astype(g.dtype), gradients)
  return d_hidden, d_table, d_bias, None, None


_chunked_cross_entropy.defvjp(_chunked_forward, _chunked_backward)


def _chunked_pass(hidden, table, bias, targets, weights, z_loss, table_in_dim, bf16_inputs, chunk, *,
                  with_gradient):
  """One loop over sequence chunks: the sums, and (with_gradient) d loss / d (hidden, table, bias)."""
  batch, length, dim = hidden.shape
  vocab_dim = 1 - table_in_dim
  zeros = {name: jnp.zeros((), jnp.float32) for name in ("loss", "cross_entropy", "z_loss", "correct", "weight")}

  def body(carry, start):
    sums, d_kernel, d_bias, d_hidden = carry
    rows = lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1)  # noqa: E731
    x = rows(hidden).reshape(batch * chunk, dim)
    chunk_targets, chunk_weights = rows(targets).reshape(-1), rows(weights).reshape(-1)
    logits = project(x, table, kernel_in_dim=table_in_dim, bf16_inputs=bf16_inputs)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    max_logit, exp, total, log_z, target_logit, ties = _token_statistics(logits, chunk_targets)
    sums = jax.tree.map(jnp.add, sums, _sums(log_z, target_logit, max_logit, ties, chunk_weights, z_loss))
    if not with_gradient:
      return (sums, d_kernel, d_bias, d_hidden), None
    # d loss / d logits = w * (softmax - onehot) + w * 2 z log_z * softmax.
    scale = chunk_weights * (1.0 + 2.0 * z_loss * log_z) / total
    d_logits = exp * scale[:, None] - jax.nn.one_hot(chunk_targets, logits.shape[-1]) * chunk_weights[:, None]
    # The input gradient is the projection's own backward product (models.layers).
    d_x = project(d_logits.astype(table.dtype), table, kernel_in_dim=vocab_dim, bf16_inputs=bf16_inputs)
    d_kernel = d_kernel + tokens_contracted(x, d_logits, bf16_inputs=rounds_to_bf16(x, bf16_inputs))
    if d_bias is not None:
      d_bias = d_bias + token_sum(d_logits)
    d_hidden = jax.lax.dynamic_update_slice_in_dim(d_hidden, d_x.reshape(batch, chunk, dim).astype(d_hidden.dtype),
                                                   start, axis=1)
    return (sums, d_kernel, d_bias, d_hidden), None

  # The table's gradient accumulates as [d, v] whatever the table's layout: see models.layers.tokens_contracted.
  d_kernel = jnp.zeros((dim, table.shape[vocab_dim]), jnp.float32) if with_gradient else None
  d_bias = jnp.zeros(bias.shape, jnp.float32) if with_gradient and bias is not None else None
  d_hidden = jnp.zeros(hidden.shape, hidden.dtype) if with_gradient else None
  (sums, d_kernel, d_bias, d_hidden), _ = jax.lax.scan(body, (zeros, d_kernel, d_bias, d_hidden),
                                                       jnp.arange(0, length, chunk))
  if not with_gradient:
    return sums, None
  d_table = d_kernel if table_in_dim == 0 else d_kernel.T
  return sums, (d_hidden, d_table.astype(table.dtype), None if bias is None else d_bias.astype(bias.dtype))
