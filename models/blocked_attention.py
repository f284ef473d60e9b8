"""Softmax attention one kv head and one query block at a time, over batch items in small groups, for CPUs.

XLA:CPU runs each elementwise step of attention (scale, mask, max, exp, sum, and their
gradients) as its own pass over memory. At 512 tokens the float32 scores of a batch are
64 MB per layer, and those passes cost more than the matmuls. Here a loop over the batch,
then over kv heads and query blocks, keeps one block's scores (at most 128 x keys per
head and batch item) in cache; at short lengths, where XLA:CPU's fixed cost per op
counts, one iteration takes several batch items together. The backward pass recomputes
the scores from the saved log-sum-exp rather than storing them, as FlashAttention does.
When the caller knows the mask is causal, a query block skips the keys after its last
query: half of the work at long lengths. Under a multi-device mesh (Auto axes) the batch
loop gathers the batch, so it is meant for one device; models/attention.py's "auto"
choice only picks it there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from models.layers import row_major_transpose, row_max, row_sum

QUERY_BLOCK = 128
# Scores per head (items x queries x keys) one iteration of the batch loop may cover. Against
# one item an iteration, bfloat16 training steps on a Zen 5 (docs/performance.md, item 29): at
# 256 tokens all 8 items together were 6 to 11% faster; at 512 tokens 2 items 5% faster (d_model
# 512) and the same (d_model 1024), 4 items 9% and 50% slower.
ITERATION_SCORES = 2**19
MASKED_LOGIT = jnp.finfo(jnp.float32).min  # finite, so fully masked rows stay free of NaNs


def _query_blocks(queries: int, keys: int, causal: bool) -> list[tuple[int, int, int]]:
  """(first query, end query, end key) per block; causal blocks end their keys at their queries."""
  return [(start, min(start + QUERY_BLOCK, queries), min(start + QUERY_BLOCK, keys) if causal else keys)
          for start in range(0, queries, QUERY_BLOCK)]


def _logits(q, k, mask, scale):
  """Masked, scaled float32 logits [g, tq, s] for q [g, tq, e], k [s, e], mask [tq, s]."""
  logits = jnp.einsum("gte,se->gts", q, k, preferred_element_type=jnp.float32) * scale
  return jnp.where(mask[None], logits, MASKED_LOGIT)


def _forward_pair(q, k, v, mask, *, scale, causal):
  """One pair: q [g, t, e], k and v [s, e], mask [t, s] -> (out [g, t, e] f32, lse [g, t]).

  A query that sees no key has top MASKED_LOGIT, so its log-sum-exp rounds back to
  MASKED_LOGIT in float32 and says it saw none (_backward_pair). Its weights are 1 / the
  keys its block reads: all the keys, as the xla kernel's softmax gives, except in a causal
  call, where a block reads up to its last query; there only padding sees no key, and
  nothing reads a padding query's output.
  """
  outs, lses = [], []
  for start, end, keys in _query_blocks(q.shape[1], k.shape[0], causal):
    logits = _logits(q[:, start:end], k[:keys], mask[start:end, :keys], scale)
    top = row_max(logits, keepdims=True)
    weights = jnp.exp(logits - top)
    total = row_sum(weights, keepdims=True)
    out = jnp.einsum("gts,se->gte", weights.astype(v.dtype), v[:keys], preferred_element_type=jnp.float32)
    outs.append(out / total)
    lses.append((top + jnp.log(total))[..., 0])
  return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)


def _backward_pair(q, k, v, mask_t, out, lse, d_out, *, scale, causal):
  """Gradients (dq, dk, dv) of one pair, recomputing the softmax weights block by block.

  The scores are recomputed transposed, [keys, g * block queries], so that dk and dv are
  plain matmuls, and dq is one against the keys transposed once per pair: XLA:CPU copies
  a transposed operand before a matmul that contracts its leading dim, and the score
  blocks are the largest arrays here (docs/performance.md, item 13). mask_t is [s, t].

  The products take their inputs in q's dtype, as the forward pass does, and accumulate in
  float32: with bfloat16 q, k and v they run on bf16 matmul units (item 19).

  A query that sees no key (its lse is MASKED_LOGIT) passes no gradient to q and k, as the
  xla kernel's mask does: its row of d_logits is scaled by 0 rather than by `scale`. Its
  recomputed weights come out as exp(0) = 1 rather than 1 / keys, so its d_out is divided by
  the block's keys for dv. Keeping the log-sum-exp's two terms apart for such rows instead
  made XLA:CPU's exp fusions here about 3x slower (docs/performance.md, item 60).
  """
  g, t, e, dtype = *q.shape, q.dtype
  matmul = lambda a, b: jnp.matmul(a.astype(dtype), b, preferred_element_type=jnp.float32)  # noqa: E731
  sees_a_key = lse > MASKED_LOGIT  # [g, t]
  row_scale = jnp.where(sees_a_key, scale, 0.0)
  d_out = d_out.astype(jnp.float32)
  row_dots = row_sum(d_out * out)  # [g, t]: sum_s weights * d_weights, per row
  d_out = d_out.astype(dtype)
  k_t = _transposed(k)  # [e, s]
  q_t, d_out_t = (_transposed(x.reshape(g * t, e)).reshape(e, g, t) for x in (q, d_out))
  dq_t, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for start, end, keys in _query_blocks(t, k.shape[0], causal):
    rows, n = slice(start, end), g * (end - start)
    q_b = q[:, rows].reshape(n, e)
    d_out_b = jnp.where(sees_a_key[:, rows, None], d_out[:, rows], d_out[:, rows] / keys).reshape(n, e)
    logits = matmul(k[:keys], q_t[:, :, rows].reshape(e, n)).reshape(keys, g, end - start) * scale
    logits = jnp.where(mask_t[:keys, None, rows], logits, MASKED_LOGIT)
    weights = jnp.exp(logits - lse[None, :, rows]).reshape(keys, n)
    dv = dv.at[:keys].add(matmul(weights, d_out_b))
    d_weights = matmul(v[:keys], d_out_t[:, :, rows].reshape(e, n))
    d_logits = weights * (d_weights - row_dots[:, rows].reshape(1, n)) * row_scale[:, rows].reshape(1, n)
    dk = dk.at[:keys].add(matmul(d_logits, q_b))
    dq_t.append(matmul(k_t[:, :keys], d_logits.astype(dtype)).reshape(e, g, end - start))
  return jnp.concatenate(dq_t, axis=2).transpose(1, 2, 0), dk, dv


def _transposed(x):
  """x.T for a product's operand; in bfloat16 one YNNPACK can take (models.layers.row_major_transpose)."""
  return row_major_transpose(x) if x.dtype == jnp.bfloat16 else x.T


def _forward_item(q, k, v, mask, *, scale, causal):
  """One batch element in the projections' own layout: q [t, k, g, e], k and v [s, k, e].

  Slicing heads here, in cache, replaces transposing whole [b, t, h, e] arrays to
  heads-first, which XLA:CPU does at well under 1 GB/s.
  """
  pairs = [_forward_pair(q[:, j].swapaxes(0, 1), k[:, j], v[:, j], mask, scale=scale, causal=causal)
           for j in range(k.shape[1])]
  return (jnp.stack([out.swapaxes(0, 1) for out, _ in pairs], axis=1),  # [t, k, g, e]
          jnp.stack([lse for _, lse in pairs]))  # [k, g, t]


def _backward_item(q, k, v, mask, out, lse, d_out, *, scale, causal):
  heads_first = lambda x, j: x[:, j].swapaxes(0, 1)  # noqa: E731
  mask_t = mask.T
  grads = [_backward_pair(heads_first(q, j), k[:, j], v[:, j], mask_t, heads_first(out, j), lse[j],
                          heads_first(d_out, j), scale=scale, causal=causal)
           for j in range(k.shape[1])]
  dq, dk, dv = zip(*grads)
  return (jnp.stack([g.swapaxes(0, 1) for g in dq], axis=1), jnp.stack(dk, axis=1), jnp.stack(dv, axis=1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blocked_attention(query, key, value, mask, scale: float, causal: bool):
  """Softmax(q k^T * scale) v in float32.

  query [b, t, k, g, e] (g query heads per kv head); key, value [b, s, k, e]; mask
  [b, 1, t, s], True where a query may see a key. `causal` promises that the mask hides
  every key after the query's own position (so t == s); only then are those keys skipped.
  """
  return _forward(query, key, value, mask, scale, causal)[0]


def _items_per_iteration(batch: int, queries: int, keys: int) -> int:
  """The most batch items, dividing the batch, whose scores per head fit in ITERATION_SCORES."""
  fits = [n for n in range(2, batch + 1) if batch % n == 0 and n * queries * keys <= ITERATION_SCORES]
  return max(fits, default=1)


def _over_batch(step, items):
  """step mapped over the batch items, in groups of `_items_per_iteration` per loop iteration."""
  query, key = items[0], items[1]
  group = _items_per_iteration(query.shape[0], query.shape[1], key.shape[1])
  return jax.lax.map(lambda item: step(*item), items, batch_size=group if group > 1 else None)


def _forward(query, key, value, mask, scale, causal):
  if causal and query.shape[1] != key.shape[1]:
    raise ValueError(f"causal blocked attention needs as many queries as keys, got "
                     f"{query.shape[1]} and {key.shape[1]}")
  step = functools.partial(_forward_item, scale=scale, causal=causal)
  out, lse = _over_batch(step, (query, key, value, mask[:, 0]))
  return out, (query, key, value, mask, out, lse)


def _backward(scale, causal, saved, d_out):
  query, key, value, mask, out, lse = saved
  step = functools.partial(_backward_item, scale=scale, causal=causal)
  dq, dk, dv = _over_batch(step, (query, key, value, mask[:, 0], out, lse, d_out))
  return dq.astype(query.dtype), dk.astype(key.dtype), dv.astype(value.dtype), None


blocked_attention.defvjp(_forward, _backward)
