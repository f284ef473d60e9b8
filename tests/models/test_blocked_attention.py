"""The blocked CPU attention kernel against jax.nn.dot_product_attention and our xla kernel.

Lengths above QUERY_BLOCK (128) with a ragged last block, GQA, packed and padded
segments; values and gradients. Padding queries see no key at all: every kernel returns
some finite average for them, and training masks them out of the loss, so the
comparisons weight outputs by the real-token mask, as the loss does.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from models.attention import attention_mask, dot_product_attention
import models.blocked_attention as blocked
from models.blocked_attention import QUERY_BLOCK
from models.config import ConfigError, ModelConfig

LENGTH = QUERY_BLOCK + 72  # two query blocks, the second one ragged


def inputs(seed, *, queries=LENGTH, keys=LENGTH, heads=4, kv_heads=2, batch=2):
  parts = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(parts[0], (batch, queries, heads, 8))
  k = jax.random.normal(parts[1], (batch, keys, kv_heads, 8))
  v = jax.random.normal(parts[2], (batch, keys, kv_heads, 8))
  cotangent = jax.random.normal(parts[3], q.shape)
  return q, k, v, cotangent


def packed_segments(length):
  """Row 0: two documents; row 1: one document, then 30 padding tokens."""
  first = jnp.where(jnp.arange(length) < 90, 1, 2)
  second = jnp.where(jnp.arange(length) < length - 30, 1, 0)
  return jnp.stack([first, second])


def weighted_loss(kernel, mask, real, cotangent, *, causal):
  def loss(q, k, v):
    out = dot_product_attention(q, k, v, mask, None, scale=0.35, kernel=kernel, causal=causal)
    return jnp.sum(out * cotangent * real[:, :, None, None])
  return jax.value_and_grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("causal", [True, False])
def test_queries_that_see_no_key_get_the_xla_kernels_gradients(causal):
  """With gradient on the padding rows too (a packed encoder-decoder row whose cross-attention
  sees no encoder token is one): uniform weights for dv, no gradient into q and k."""
  q, k, v, cotangent = inputs(1)
  segments = packed_segments(LENGTH)
  mask = attention_mask(segments, segments, causal=causal)
  every_row = jnp.ones(segments.shape, bool)
  expected = weighted_loss("xla", mask, every_row, cotangent, causal=causal)(q, k, v)
  got = jax.jit(weighted_loss("blocked", mask, every_row, cotangent, causal=causal))(q, k, v)
  for ours, reference in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(ours, reference, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_values_and_gradients_match_the_xla_kernel(causal):
  q, k, v, cotangent = inputs(0)
  segments = packed_segments(LENGTH)
  mask = attention_mask(segments, segments, causal=causal)
  real = segments != 0
  expected = weighted_loss("xla", mask, real, cotangent, causal=causal)(q, k, v)
  got = jax.jit(weighted_loss("blocked", mask, real, cotangent, causal=causal))(q, k, v)
  for ours, reference in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(ours, reference, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_batch_items_grouped_per_iteration_match_the_xla_kernel(group, monkeypatch):
  # A limit of `group` items' scores makes each loop iteration take that many batch items.
  monkeypatch.setattr(blocked, "ITERATION_SCORES", group * LENGTH * LENGTH)
  assert blocked._items_per_iteration(4, LENGTH, LENGTH) == group
  q, k, v, cotangent = inputs(3, batch=4)
  segments = jnp.tile(packed_segments(LENGTH), (2, 1))
  mask, real = attention_mask(segments, segments, causal=True), segments != 0
  expected = weighted_loss("xla", mask, real, cotangent, causal=True)(q, k, v)
  got = jax.jit(weighted_loss("blocked", mask, real, cotangent, causal=True))(q, k, v)
  for ours, reference in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(ours, reference, rtol=2e-4, atol=2e-4)


def test_items_per_iteration_is_the_largest_divisor_of_the_batch_within_the_limit():
  limit = blocked.ITERATION_SCORES
  for batch, length in [(8, 256), (8, 512), (6, 300), (3, 512), (8, 2048)]:
    group = blocked._items_per_iteration(batch, length, length)
    assert batch % group == 0 and (group == 1 or group * length * length <= limit)
    larger = [n for n in range(group + 1, batch + 1) if batch % n == 0]
    assert all(n * length * length > limit for n in larger)
  assert blocked._items_per_iteration(8, 2048, 2048) == 1  # one item over the limit still runs


def dot_operand_types(hlo: str) -> list[tuple[str, str]]:
  """(lhs, rhs) element types of every dot in compiled HLO text; instruction names are module-unique."""
  types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
  return [(types[a], types[b]) for a, b in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)]


def test_bf16_values_and_gradients_track_float32_with_every_product_in_bf16():
  # XLA:CPU runs a bf16 product YNNPACK refuses (a transposed operand) in float32.
  q, k, v, cotangent = inputs(7)
  segments = packed_segments(LENGTH)
  mask, real = attention_mask(segments, segments, causal=True), segments != 0
  loss = jax.jit(weighted_loss("blocked", mask, real, cotangent, causal=True))
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  expected, got = loss(q, k, v), loss(*bf16)
  for ours, reference in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert ours.dtype == jnp.bfloat16 or ours.ndim == 0
    error = np.linalg.norm(np.asarray(ours, np.float32) - reference) / np.linalg.norm(reference)
    assert error < 0.02
  types = dot_operand_types(loss.lower(*bf16).compile().as_text())
  assert types and set(types) == {("bf16", "bf16")}


def test_gradients_with_the_batch_sharded_over_eight_devices():
  q, k, v, cotangent = inputs(5, batch=8)
  segments = jnp.tile(packed_segments(LENGTH), (4, 1))
  mask = attention_mask(segments, segments, causal=True)
  real = segments != 0
  expected = weighted_loss("xla", mask, real, cotangent, causal=True)(q, k, v)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))  # as the trainer's
  batch_sharded = NamedSharding(mesh, P("data"))
  q, k, v = jax.device_put((q, k, v), batch_sharded)
  got = jax.jit(weighted_loss("blocked", mask, real, cotangent, causal=True))(q, k, v)
  for ours, reference in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(ours, reference, rtol=2e-4, atol=2e-4)


def test_values_match_jax_reference_attention():
  """Cross-attention shape (fewer queries than keys), GQA, no causal skipping."""
  q, k, v, _ = inputs(1, queries=QUERY_BLOCK + 5, keys=LENGTH, heads=6, kv_heads=3)
  mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool), k=40)[None, None].repeat(2, axis=0)
  ours = dot_product_attention(q, k, v, mask, None, scale=0.35, kernel="blocked")
  reference = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.35)
  np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_causal_promise_needs_self_attention_lengths():
  q, k, v, _ = inputs(2, queries=10, keys=12)
  mask = jnp.ones((2, 1, 10, 12), bool)
  with pytest.raises(ValueError, match="as many queries as keys"):
    dot_product_attention(q, k, v, mask, None, scale=1.0, kernel="blocked", causal=True)


def test_blocked_kernel_takes_no_bias():
  with pytest.raises(ConfigError, match="attention_kernel='blocked' takes no attention bias"):
    ModelConfig(position="relative", attention_kernel="blocked").validate()
  q, k, v, _ = inputs(3, queries=4, keys=4)
  with pytest.raises(ValueError, match="takes no bias"):
    dot_product_attention(q, k, v, jnp.ones((2, 1, 4, 4), bool), jnp.zeros((1, 4, 4, 4)),
                          scale=1.0, kernel="blocked")


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_decoder_logits_match_across_kernels(prefix_lm):
  """A whole decoder past one query block: packing, and a prefix the kernel must not skip."""
  from models.transformer import build_model

  length = QUERY_BLOCK + 22
  tokens = jax.random.randint(jax.random.key(4), (2, length), 3, 64)
  segments = packed_segments(length)
  positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
  prefix = (jnp.arange(length) < 140)[None].repeat(2, axis=0) if prefix_lm else None
  logits = {}
  for kernel in ("xla", "blocked"):
    cfg = ModelConfig(vocab_size=64, emb_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=48,
                      num_layers=2, max_len=length, attention_kernel=kernel)
    model = build_model(cfg, seed=0)
    logits[kernel] = model(tokens, segment_ids=segments, positions=positions, prefix_mask=prefix)
  real = (segments != 0)[:, :, None]
  np.testing.assert_allclose(logits["blocked"] * real, logits["xla"] * real, atol=1e-4)


def test_auto_picks_blocked_on_cpu_for_long_uncached_unbiased_attention():
  from models.attention import Attention
  from flax import nnx

  attention = Attention(ModelConfig(emb_dim=32, num_heads=4), rope=True, rngs=nnx.Rngs(0))
  assert jax.default_backend() == "cpu"
  assert attention._kernel(None, QUERY_BLOCK + 1, QUERY_BLOCK + 1) == "blocked"
  assert attention._kernel(None, QUERY_BLOCK, QUERY_BLOCK) == "xla"
  assert attention._kernel(jnp.zeros(()), 512, 512) == "xla"
  with jax.set_mesh(jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))):
    assert attention._kernel(None, 512, 512) == "xla"
