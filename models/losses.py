"""Token-level cross-entropy with optional z-loss, summed so that batches accumulate exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                       z_loss: float = 0.0) -> dict[str, jax.Array]:
  """Weighted sums over tokens: loss (cross-entropy + z-loss), z-loss, correct, weight.

  logits [b, t, v] (float32), targets [b, t], weights [b, t] (0 for padding and for
  positions that carry no loss). z-loss is z_loss * log(Z)^2 (PaLM, Chowdhery et al.
  2022, sec. 5), which keeps the softmax normaliser near 1 in low precision.
  Dividing by the summed weight gives means; sums let gradient accumulation and
  data-parallel shards add up to the same result as one large batch.
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  max_logit = jax.lax.stop_gradient(jnp.max(logits, axis=-1))  # [b, t]
  log_z = max_logit + jnp.log(jnp.sum(jnp.exp(logits - max_logit[..., None]), axis=-1))
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = log_z - target_logit
  z_term = z_loss * jnp.square(log_z)
  # Correct when the target reaches the row maximum (a tie for the top counts as
  # correct); this reuses logsumexp's max instead of a second pass over [b, t, v].
  correct = (target_logit >= max_logit).astype(jnp.float32)
  return {
      "loss": jnp.sum((nll + z_term) * weights),
      "cross_entropy": jnp.sum(nll * weights),
      "z_loss": jnp.sum(z_term * weights),
      "correct": jnp.sum(correct * weights),
      "weight": jnp.sum(weights),
  }
