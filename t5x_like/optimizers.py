"""Optimizers and learning-rate schedules from the `train.optimizer` config, via optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from models.config import ConfigError


def default_optimizer_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="adamw",            # adamw | adafactor
      learning_rate=3e-3,
      schedule="warmup_cosine",  # warmup_cosine | rsqrt | constant
      warmup_steps=100,
      end_learning_rate_fraction=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      grad_clip_norm=1.0,      # 0 disables clipping
  ))


# The optimizer fields a schedule reads, besides its kind (`schedule`) and the run's length.
SCHEDULE_FIELDS = ("learning_rate", "warmup_steps", "end_learning_rate_fraction")


def schedule_inputs(config: ml_collections.ConfigDict, total_steps: int) -> dict[str, np.ndarray]:
  """The numbers a schedule reads, as float32 scalars. The trainer hands them to its compiled step
  as arguments rather than compiling them in, so runs that differ only in them (a sweep's token
  budgets, a learning-rate scan, a run resumed with more steps) share one compiled step through
  jax's compilation cache."""
  return {name: np.float32(config[name]) for name in SCHEDULE_FIELDS} | {"total_steps": np.float32(total_steps)}


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """The learning rate by update of a run `total_steps` long."""
  return schedule_over(config.schedule, schedule_inputs(config, total_steps))


def schedule_over(kind: str, inputs: dict) -> optax.Schedule:
  """Linear warmup then cosine decay; T5's inverse square root; or constant, over schedule_inputs'
  numbers, concrete or traced. optax's warmup_cosine_decay_schedule checks its lengths in Python,
  so it cannot take traced ones; its formulas are written out here over arrays."""
  peak, warmup, total = inputs["learning_rate"], inputs["warmup_steps"], inputs["total_steps"]
  if kind == "warmup_cosine":
    alpha = inputs["end_learning_rate_fraction"]
    decay_steps = jnp.maximum(total - warmup, 1)  # the cosine's length, at least 1 (warmup + 1 rounds past 2^24)

    def warmup_cosine(step):
      step = jnp.asarray(step, jnp.float32)
      rising = -peak * (1 - step / jnp.maximum(warmup, 1)) + peak
      cosine = 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(step - warmup, decay_steps) / decay_steps))
      return jnp.where(step < warmup, rising, peak * ((1 - alpha) * cosine + alpha))
    return warmup_cosine
  if kind == "rsqrt":
    # Raffel et al. 2020: lr = 1/sqrt(max(step, warmup)), scaled so it peaks at `peak`.
    return lambda step: peak * jax.lax.rsqrt(jnp.maximum(step, jnp.maximum(warmup, 1)) / jnp.maximum(warmup, 1))
  if kind == "constant":
    return optax.constant_schedule(peak)
  raise ConfigError(f"train.optimizer.schedule={kind!r} is not one of ('warmup_cosine', 'rsqrt', 'constant')")


def decay_mask(params):
  """Weight decay on weight matrices and embeddings only, never on biases or norms' scales. By
  name as well as rank: the query, key and value biases are [heads, head_dim], and T5's relative
  position bias is a table [buckets, heads] of logit biases."""
  def decayed(path, p) -> bool:
    names = [getattr(key, "key", getattr(key, "name", None)) for key in path]
    return p.ndim > 1 and names[-1] != "bias" and "relative_bias" not in names
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config: ml_collections.ConfigDict, inputs: dict):
  """Returns (optax transformation, schedule) over schedule_inputs' numbers `inputs`; its update
  may take the gradients' norm as `grad_norm=`."""
  # A negative clip norm would flip every update's sign, and a negative rate or decay would too.
  for name in ("learning_rate", "warmup_steps", "weight_decay", "grad_clip_norm", "end_learning_rate_fraction"):
    if not config[name] >= 0:
      raise ConfigError(f"train.optimizer.{name}={config[name]} must be at least 0")
  if config.end_learning_rate_fraction > 1:  # a fraction of the peak: above 1 the decay would climb
    raise ConfigError(f"train.optimizer.end_learning_rate_fraction={config.end_learning_rate_fraction} "
                      f"must be at most 1")
  if not config.eps > 0:  # Adam's update of a parameter whose gradient is 0 would be 0 / 0
    raise ConfigError(f"train.optimizer.eps={config.eps} must be positive")
  for name in ("b1", "b2"):
    if not 0 <= config[name] < 1:
      raise ConfigError(f"train.optimizer.{name}={config[name]} must be in [0, 1)")
  schedule = schedule_over(config.schedule, inputs)
  if config.name == "adamw":
    tx = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                     weight_decay=config.weight_decay, mask=decay_mask)
  elif config.name == "adafactor":
    # optax.adafactor's transformations with its defaults, but the weight decay added before the
    # learning rate, so that it follows the schedule as AdamW's does. optax.adafactor adds it
    # after: a decay of 0.1 shrank every matrix by 10% a step, even at a learning rate of 0.
    tx = optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0), optax.scale_by_param_block_rms(),
                     optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
                     optax.scale_by_learning_rate(schedule))
  else:
    raise ConfigError(f"train.optimizer.name={config.name!r} is not one of ('adamw', 'adafactor')")
  # Chained with clipping off too, so that the optimizer state has one layout: a run resumes
  # with clipping turned on or off (without the clip step, Adam's moments moved from
  # opt_state.1 to opt_state.0 and the checkpoint no longer fitted).
  return optax.chain(clip_by_global_norm(config.grad_clip_norm), tx), schedule


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm, reusing the norm its caller already has (`update(..., grad_norm=)`);
  a max_norm of 0 clips nothing.

  The trainer computes the gradients' norm for its metrics and its NaN check, outside the
  branch that updates; optax's clip computed it again inside, and XLA shares no work across
  that branch: a second pass over every gradient, each step (docs/performance.md, item 43).
  """
  def update(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    if not max_norm:
      return updates, state
    norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
    scale = jnp.minimum(1.0, max_norm / norm)
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)
