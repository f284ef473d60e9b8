"""Schedules against their formulas; weight decay spares norms and biases; Adafactor steps; clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax import nnx
from flax.traverse_util import flatten_dict

from models.config import ConfigError, ModelConfig
from models.transformer import build_model
from t5x_like.optimizers import (clip_by_global_norm, decay_mask, default_optimizer_config, make_optimizer,
                                 make_schedule, schedule_inputs, schedule_over)


def config(**changes):
  c = default_optimizer_config()
  c.update(changes)
  return c


def optimizer(config, total_steps=10):
  return make_optimizer(config, schedule_inputs(config, total_steps))


def test_warmup_then_cosine():
  schedule = make_schedule(config(learning_rate=1.0, warmup_steps=10, end_learning_rate_fraction=0.1), 110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  # Halfway through the cosine: 0.1 + 0.9 * (1 + cos(pi / 2)) / 2.
  assert float(schedule(60)) == pytest.approx(0.55, abs=1e-6)
  assert float(schedule(110)) == pytest.approx(0.1)


@pytest.mark.parametrize("warmup, total, fraction", [(10, 110, 0.1), (0, 20, 0.0), (5, 5, 0.5), (7, 3, 1.0)])
def test_warmup_cosine_is_optaxs_with_its_numbers_traced_or_not(warmup, total, fraction):
  """The trainer's step reads the schedule's numbers as arguments; optax's own schedule, with them
  compiled in (a warmup as long as the run decays over one step past it), is the reference."""
  c = config(learning_rate=3e-3, warmup_steps=warmup, end_learning_rate_fraction=fraction)
  reference = optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup, max(total, warmup + 1), end_value=3e-3 * fraction)
  steps = jnp.arange(total + 3)
  traced = jax.jit(lambda inputs: jax.vmap(schedule_over("warmup_cosine", inputs))(steps))
  expected = np.asarray(jax.vmap(reference)(steps))
  # Compiled, the same float32 formula may round apart by about 1e-7 of the peak.
  np.testing.assert_allclose(jax.vmap(make_schedule(c, total))(steps), expected, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(traced(schedule_inputs(c, total)), expected, rtol=1e-6, atol=1e-9)


def test_a_warmup_as_long_as_a_run_past_float32s_whole_numbers_decays_without_a_nan():
  """Past 2^24, float32 rounds warmup + 1 back to warmup: the cosine must not last 0 steps."""
  schedule = make_schedule(config(learning_rate=1e-3, warmup_steps=2**24, end_learning_rate_fraction=0.1), 2**24)
  assert float(schedule(2**24)) == pytest.approx(1e-3) and float(schedule(2**24 + 5)) == pytest.approx(1e-4)


def test_rsqrt_is_flat_during_warmup_then_decays_as_one_over_sqrt_step():
  schedule = make_schedule(config(schedule="rsqrt", learning_rate=0.01, warmup_steps=100), 1000)
  assert float(schedule(1)) == pytest.approx(0.01)
  assert float(schedule(100)) == pytest.approx(0.01)
  assert float(schedule(400)) == pytest.approx(0.01 * math.sqrt(100 / 400))


def test_adamw_decays_matrices_but_not_norms_or_biases():
  params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones((2,)), "bias": jnp.ones((2,)),
            "query": {"bias": jnp.ones((2, 3))}}  # per head: 2-D, and still a bias
  tx, _ = optimizer(config(schedule="constant", learning_rate=0.1, weight_decay=0.5))
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  for spared in (updates["scale"], updates["bias"], updates["query"]["bias"]):
    np.testing.assert_array_equal(spared, 0.0)


@pytest.mark.parametrize("arch, position", [("decoder", "learned"), ("encoder_decoder", "relative")])
def test_a_biased_models_mask_spares_exactly_its_biases_and_norms(arch, position):
  """T5's relative position table is a bias on the logits, spared as well."""
  model = build_model(ModelConfig(arch=arch, vocab_size=32, emb_dim=16, num_heads=2, mlp_dim=32,
                                  num_layers=1, use_bias=True, norm="layernorm", position=position), seed=0)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  mask = flatten_dict(decay_mask(params))
  for path, decayed in mask.items():
    assert decayed == (path[-1] not in ("bias", "scale") and "relative_bias" not in path), path
  assert (position == "relative") == any("relative_bias" in path for path in mask)


@pytest.mark.parametrize("field, value", [("grad_clip_norm", -1.0), ("learning_rate", -1e-3),
                                          ("weight_decay", -0.1), ("warmup_steps", -5), ("b2", 1.0),
                                          ("end_learning_rate_fraction", -0.5), ("end_learning_rate_fraction", 1.5),
                                          ("eps", 0.0)])
def test_an_optimizer_setting_that_would_reverse_or_stall_updates_is_refused(field, value):
  """A negative clip norm, for one, scaled every update by a negative number: gradient ascent."""
  with pytest.raises(ConfigError, match=f"train.optimizer.{field}={value}"):
    optimizer(config(**{field: value}))


def test_adafactor_without_decay_is_optax_adafactor():
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(256, 130)), jnp.float32),  # factored
            "b": jnp.linspace(-1.0, 1.0, 7)}
  tx, schedule = optimizer(config(name="adafactor", learning_rate=0.1, warmup_steps=2, weight_decay=0.0,
                                  grad_clip_norm=0.0))
  reference = optax.adafactor(schedule)
  state, reference_state = tx.init(params), reference.init(params)
  loss = lambda p: jnp.sum(jnp.sin(p["w"]) ** 2) + jnp.sum(p["b"] ** 4)  # noqa: E731
  for _ in range(4):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    expected, reference_state = reference.update(grads, reference_state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), updates, expected)
    params = optax.apply_updates(params, updates)


def test_adafactor_decays_matrices_by_the_scheduled_learning_rate():
  params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  tx, schedule = optimizer(config(name="adafactor", learning_rate=0.1, warmup_steps=4, weight_decay=0.5))
  state, zero_grads = tx.init(params), jax.tree.map(jnp.zeros_like, params)
  for step in range(3):  # in warmup: learning rates 0, 0.025, 0.05
    updates, state = tx.update(zero_grads, state, params)
    np.testing.assert_allclose(updates["kernel"], -float(schedule(step)) * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["scale"], 0.0)


def test_unknown_optimizer_and_schedule_name_the_field():
  with pytest.raises(ConfigError, match="train.optimizer.name='sgd'"):
    optimizer(config(name="sgd"))
  with pytest.raises(ConfigError, match="train.optimizer.schedule='linear'"):
    optimizer(config(schedule="linear"))


def test_clipping_matches_optax_and_uses_the_norm_it_is_handed():
  """optax's clip_by_global_norm, but a norm handed in (the trainer's) replaces the one it computes."""
  grads = {"w": jnp.full((4, 3), 2.0), "b": jnp.array([3.0, -4.0, 0.5])}  # norm ~8.04
  norm = float(optax.tree.norm(grads))
  clip, reference = clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
  expected, _ = reference.update(grads, reference.init(grads))
  clipped, _ = clip.update(grads, clip.init(grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), clipped, expected)
  handed, _ = clip.update(grads, clip.init(grads), grad_norm=2 * norm)
  jax.tree.map(lambda a, g: np.testing.assert_allclose(a, g / (2 * norm), rtol=1e-6), handed, grads)
  small = jax.tree.map(lambda g: g / (2 * norm), grads)  # norm 0.5: left as it is
  unchanged, _ = clip.update(small, clip.init(small))
  jax.tree.map(np.testing.assert_array_equal, unchanged, small)


@pytest.mark.parametrize("grad_clip_norm", [1.0, 0.0])
def test_every_optimizer_takes_the_gradient_norm(grad_clip_norm):
  """The trainer hands `grad_norm=` to whatever make_optimizer built; only a clip reads it."""
  params = {"w": jnp.ones((4, 3))}
  tx, _ = optimizer(config(grad_clip_norm=grad_clip_norm, schedule="constant", weight_decay=0.0))
  step = lambda norm: tx.update(params, tx.init(params), params, grad_norm=norm)[0]["w"]  # noqa: E731
  true_norm, huge_norm = step(optax.tree.norm(params)), step(1e12)
  # A huge norm clips the gradient to ~1e-12, which Adam's eps then swamps: a far smaller step.
  assert bool(jnp.all(jnp.abs(huge_norm) < 1e-2 * jnp.abs(true_norm))) == bool(grad_clip_norm)
