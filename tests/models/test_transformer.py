"""Behaviour of the three architectures: shapes, masks, caching, GQA, precision."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from flax import nnx

from models.attention import Attention, attention_mask, dot_product_attention, heads_first_attention
from models.config import ConfigError, ModelConfig
from models.layers import (add_bias, apply_rope, gelu_exact, gelu_tanh, project, relative_position_bucket,
                           row_max, row_sum, scale_and_shift, sinusoidal_embedding, token_sum,
                           tokens_contracted)
from models.transformer import build_model

VOCAB, LENGTH = 64, 10


def small(**overrides) -> ModelConfig:
  base = dict(vocab_size=VOCAB, emb_dim=32, num_heads=4, mlp_dim=48, num_layers=2, max_len=32)
  return ModelConfig(**{**base, **overrides})


def random_tokens(seed, shape=(2, LENGTH)):
  return jax.random.randint(jax.random.key(seed), shape, 3, VOCAB)


@nnx.jit
def forward(model, tokens, segment_ids, positions, prefix_mask):
  if model.config.arch == "encoder":
    return model(tokens, segment_ids=segment_ids, positions=positions)
  return model(tokens, segment_ids=segment_ids, positions=positions, prefix_mask=prefix_mask)


def run(model, tokens, segment_ids=None, positions=None, prefix_mask=None):
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return forward(model, tokens, segment_ids, positions, prefix_mask)


@nnx.jit
def encoder_decoder_forward(model, inputs, targets, encoder_segment_ids=None, decoder_segment_ids=None):
  return model(inputs, targets, encoder_segment_ids=encoder_segment_ids, decoder_segment_ids=decoder_segment_ids)


POSITIONS = ("rope", "learned", "sinusoidal", "relative", "none")


# Shapes over option combinations ------------------------------------------------

COMBOS = [
    dict(arch=arch, norm=norm, norm_position=norm_position, mlp_activation=act, mlp_gated=gated,
         position=position, num_kv_heads=kv, tie_embeddings=tie, use_bias=bias)
    for arch, (norm, norm_position), (act, gated), position, kv, tie, bias in [
        ("decoder", ("rmsnorm", "pre"), ("silu", True), "rope", 2, False, False),       # LLaMA
        ("decoder", ("layernorm", "pre"), ("gelu_tanh", False), "learned", None, True, True),  # GPT-2
        ("decoder", ("layernorm", "post"), ("relu", False), "sinusoidal", 1, True, False),  # MQA
        ("decoder", ("rmsnorm", "pre"), ("gelu", True), "relative", None, False, False),
        ("encoder", ("layernorm", "post"), ("gelu", False), "learned", None, True, True),   # BERT
        ("encoder", ("rmsnorm", "pre"), ("silu", True), "rope", 2, False, False),
        ("encoder_decoder", ("rmsnorm", "pre"), ("gelu_tanh", True), "relative", None, False, False),  # T5
        ("encoder_decoder", ("layernorm", "post"), ("relu", False), "learned", 1, True, True),
        ("encoder_decoder", ("rmsnorm", "pre"), ("silu", True), "rope", 2, True, False),
    ]
]


@pytest.mark.parametrize("options", COMBOS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_logits_shape_and_dtype(options):
  cfg = small(**options)
  model = build_model(cfg)
  tokens = random_tokens(0)
  if cfg.arch == "encoder_decoder":
    logits = encoder_decoder_forward(model, tokens, tokens[:, :7])
    assert logits.shape == (2, 7, VOCAB)
  else:
    logits = run(model, tokens)
    assert logits.shape == (2, LENGTH, VOCAB)
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_every_parameter_has_logical_axis_names_that_fit_its_dims():
  """Each name labels a dim of the size it stands for (the sizes below are all distinct), so a
  kernel whose names are swapped, which computes the same and shards wrongly, fails."""
  for options in COMBOS:
    cfg = small(**options, relative_num_buckets=16, max_len=24)
    sizes = {"embed": 32, "norm": 32, "mlp": 48, "heads": 4, "kv_heads": cfg.kv_heads, "kv": 8, "vocab": VOCAB,
             "relpos_buckets": 16, None: 24}  # None: the learned position table's rows, never sharded
    model = build_model(cfg)
    for path, var in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param),
                                                         is_leaf=lambda x: isinstance(x, nnx.Variable)):
      axes = var.get_metadata().get("out_sharding")
      assert axes is not None and len(axes) == var[...].ndim, (options, path, axes)
      expected = tuple(32 if (name == "mlp" and "mlm_dense" in str(path)) else sizes[name] for name in axes)
      assert var[...].shape == expected, (options, jax.tree_util.keystr(path), axes)  # BERT's head is [d, d]


# Masks --------------------------------------------------------------------------

@pytest.mark.parametrize("position", POSITIONS)
def test_decoder_is_causal(position):
  model = build_model(small(position=position))
  tokens = random_tokens(1)
  base = run(model, tokens)
  for t in range(LENGTH - 1):
    changed = run(model, tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % VOCAB))
    np.testing.assert_allclose(changed[:, :t + 1], base[:, :t + 1], atol=1e-6)
    assert not np.allclose(changed[:, t + 1], base[:, t + 1], atol=1e-4)


@pytest.mark.parametrize("position", ["rope", "relative"])
def test_prefix_lm_is_bidirectional_inside_the_prefix_only(position):
  model = build_model(small(position=position, relative_bidirectional=position == "relative"))
  tokens = random_tokens(2)
  prefix_len = 4
  prefix = jnp.broadcast_to(jnp.arange(LENGTH) < prefix_len, tokens.shape)
  base = run(model, tokens, prefix_mask=prefix)
  # Position i sees token j where j <= i, or where both lie in the prefix (positions 0 to 3): the
  # first target, position 4, is seen by no earlier position. Every token changed, one at a time.
  for j in range(LENGTH):
    changed = run(model, tokens.at[:, j].set((tokens[:, j] + 1) % VOCAB), prefix_mask=prefix)
    sees_j = np.array([j <= i or (i < prefix_len and j < prefix_len) for i in range(LENGTH)])
    moved = np.abs(np.asarray(changed) - np.asarray(base)).max(axis=(0, 2))
    assert np.all(moved[~sees_j] < 1e-6) and np.all(moved[sees_j] > 1e-4), (j, moved)


def test_a_prefix_lm_with_t5_relative_positions_needs_buckets_in_both_directions():
  """A causal decoder's buckets are one-directional: every later prefix token would sit at distance
  0, so the first position's output ignored their order. With relative_bidirectional it reads it,
  as it does with RoPE, and unlike a model without positions, for which the prefix is a set."""
  tokens = random_tokens(2)
  prefix = jnp.broadcast_to(jnp.arange(LENGTH) < 4, tokens.shape)
  with pytest.raises(ConfigError, match=r"with model.position='relative' needs model.relative_bidirectional=True"):
    run(build_model(small(position="relative")), tokens, prefix_mask=prefix)
  swapped = tokens.at[:, 1].set(tokens[:, 2]).at[:, 2].set(tokens[:, 1])  # two later prefix tokens
  for position, reads_order in (("relative", True), ("rope", True), ("none", False)):
    model = build_model(small(position=position, relative_bidirectional=position == "relative"))
    first = [np.asarray(run(model, t, prefix_mask=prefix))[:, 0] for t in (tokens, swapped)]
    assert np.allclose(first[0], first[1], atol=1e-5) != reads_order, position
  with pytest.raises(ConfigError, match="model.relative_bidirectional applies only to model.arch='decoder'"):
    small(arch="encoder", position="relative", relative_bidirectional=True).validate()


@pytest.mark.parametrize("arch,position", [("decoder", "rope"), ("decoder", "relative"),
                                           ("encoder", "learned"), ("encoder", "rope")])
def test_packed_documents_do_not_attend_to_each_other(arch, position):
  """A row packing documents A and B gives each the logits it gets alone."""
  model = build_model(small(arch=arch, position=position))
  a, b = random_tokens(3, (1, 4)), random_tokens(4, (1, 6))
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.array([[1] * 4 + [2] * 6])
  positions = jnp.array([list(range(4)) + list(range(6))])
  logits = run(model, packed, segments, positions)
  np.testing.assert_allclose(logits[:, :4], run(model, a), atol=1e-5)
  np.testing.assert_allclose(logits[:, 4:], run(model, b), atol=1e-5)


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_padding_does_not_change_real_tokens(arch):
  model = build_model(small(arch=arch, position="learned"))
  tokens = random_tokens(5, (1, 7))
  padded = jnp.concatenate([tokens, jnp.zeros((1, 3), jnp.int32)], axis=1)
  segments = jnp.array([[1] * 7 + [0] * 3])
  np.testing.assert_allclose(run(model, padded, segments)[:, :7], run(model, tokens), atol=1e-5)


def test_encoder_decoder_padding_does_not_change_real_tokens():
  model = build_model(small(arch="encoder_decoder", position="relative"))
  inputs, targets = random_tokens(6, (1, 6)), random_tokens(7, (1, 5))
  reference = encoder_decoder_forward(model, inputs, targets)
  padded_inputs = jnp.pad(inputs, ((0, 0), (0, 3)))
  padded_targets = jnp.pad(targets, ((0, 0), (0, 2)))
  logits = encoder_decoder_forward(model, padded_inputs, padded_targets,
                                   jnp.array([[1] * 6 + [0] * 3]), jnp.array([[1] * 5 + [0] * 2]))
  np.testing.assert_allclose(logits[:, :5], reference, atol=1e-5)


@pytest.mark.parametrize("position", ["relative", "rope"])
def test_packed_encoder_decoder_pairs_do_not_attend_to_each_other(position):
  """Rows packing pairs A and B on both sides (as span corruption packs them) give each pair's
  targets the logits it gets alone: neither its decoder nor its cross-attention sees the other."""
  model = build_model(small(arch="encoder_decoder", position=position))
  inputs_a, targets_a = random_tokens(8, (1, 4)), random_tokens(9, (1, 3))
  inputs_b, targets_b = random_tokens(10, (1, 5)), random_tokens(11, (1, 4))
  logits = model(jnp.concatenate([inputs_a, inputs_b], axis=1), jnp.concatenate([targets_a, targets_b], axis=1),
                 encoder_segment_ids=jnp.array([[1] * 4 + [2] * 5]),
                 encoder_positions=jnp.array([list(range(4)) + list(range(5))]),
                 decoder_segment_ids=jnp.array([[1] * 3 + [2] * 4]),
                 decoder_positions=jnp.array([list(range(3)) + list(range(4))]))
  np.testing.assert_allclose(logits[:, :3], encoder_decoder_forward(model, inputs_a, targets_a), atol=1e-5)
  np.testing.assert_allclose(logits[:, 3:], encoder_decoder_forward(model, inputs_b, targets_b), atol=1e-5)


# Incremental decoding ----------------------------------------------------------------

@pytest.mark.parametrize("position,kv_heads", [("rope", 2), ("learned", None), ("relative", 1),
                                               ("sinusoidal", None), ("none", None)])
def test_decoder_cache_matches_full_forward(position, kv_heads):
  model = build_model(small(position=position, num_kv_heads=kv_heads))
  tokens = random_tokens(8)
  full = run(model, tokens)
  step = nnx.jit(lambda m, t, c: m.decode(t, c))
  cache = model.init_cache(2, 16)
  logits, cache = step(model, tokens[:, :4], cache)  # prefill a prompt
  pieces = [logits]
  for t in range(4, LENGTH):
    logits, cache = step(model, tokens[:, t:t + 1], cache)
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)
  assert int(cache["index"]) == LENGTH


def test_a_decode_past_the_caches_end_is_refused():
  """The write would otherwise land on the last slots (the update's start is clamped) and decode
  on as if in place. Outside jit the slot is known; under jit a prompt longer than the cache is."""
  model = build_model(small())
  tokens = random_tokens(8)
  _, cache = model.decode(tokens[:, :3], model.init_cache(2, 4))
  _, cache = model.decode(tokens[:, 3:4], cache)  # fills the last slot
  with pytest.raises(ValueError, match="decoding 1 tokens from slot 4 overruns a cache of 4 slots"):
    model.decode(tokens[:, 4:5], cache)
  with pytest.raises(ValueError, match="decoding 5 tokens overruns a cache of 4 slots"):
    nnx.jit(lambda m, t, c: m.decode(t, c))(model, tokens[:, :5], model.init_cache(2, 4))


def test_a_prefill_for_the_last_tokens_logits_computes_only_those():
  """last_only gives the last position's logits and the same cache; the other positions' logits
  are not computed (without it XLA kept the [b * t, v] product and sliced it)."""
  model = build_model(small())
  tokens = random_tokens(8)
  b, t = tokens.shape
  graph, state = nnx.split(model)
  prefill = lambda last_only: jax.jit(  # noqa: E731
      lambda state, tokens, cache: nnx.merge(graph, state).decode(tokens, cache, last_only=last_only))
  every, every_cache = prefill(False)(state, tokens, model.init_cache(b, 16))
  last, last_cache = prefill(True)(state, tokens, model.init_cache(b, 16))
  assert last.shape == (b, 1, model.config.vocab_size)
  np.testing.assert_allclose(np.asarray(last), np.asarray(every[:, -1:]), rtol=1e-5, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, last_cache, every_cache)
  all_logits = f"f32[{b * t},{model.config.vocab_size}]"
  compiled = {last_only: prefill(last_only).lower(state, tokens, model.init_cache(b, 16)).compile().as_text()
              for last_only in (False, True)}
  assert all_logits in compiled[False] and all_logits not in compiled[True]


def test_encoder_decoder_cache_matches_full_forward():
  model = build_model(small(arch="encoder_decoder", position="relative", num_kv_heads=2))
  inputs, targets = random_tokens(9, (2, 7)), random_tokens(10, (2, 6))
  full = encoder_decoder_forward(model, inputs, targets)
  encoded = nnx.jit(lambda m, x: m.encode(x))(model, inputs)
  cache = model.init_cache(encoded, max_len=8)
  step = nnx.jit(lambda m, t, c: m.decode(t, c))
  pieces = []
  for t in range(6):
    logits, cache = step(model, targets[:, t:t + 1], cache)
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)


def test_a_float32_cache_decodes_a_bfloat16_model_as_a_bfloat16_cache_does():
  """It holds the same bf16-rounded keys and values, and attention rounds as it would for bf16 ones."""
  model = build_model(small(dtype="bfloat16", num_kv_heads=2))
  tokens = random_tokens(8)
  step = nnx.jit(lambda m, t, c: m.decode(t, c))
  decoded = []
  for dtype in (jnp.float32, jnp.bfloat16):
    logits, cache = step(model, tokens[:, :4], model.init_cache(2, 16, dtype=dtype))
    pieces = [logits]
    for t in range(4, LENGTH):
      logits, cache = step(model, tokens[:, t:t + 1], cache)
      pieces.append(logits)
    assert cache["layers"][0]["self"]["k"].dtype == dtype
    decoded.append(np.asarray(jnp.concatenate(pieces, axis=1), np.float32))
  np.testing.assert_allclose(decoded[0], decoded[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_through_a_row_index_equals_attention_over_the_cache_it_indexes(dtype):
  """Beam search's cache: slot s of row r is read from row rows[r, s] (GQA, a bias, two queries)."""
  b, t, heads, kv_heads, slots, e = 3, 2, 4, 2, 10, 8
  keys = jax.random.split(jax.random.key(0), 5)
  query = jax.random.normal(keys[0], (b, t, heads, e)).astype(dtype)
  key, value = (jax.random.normal(k, (b, kv_heads, slots, e)).astype(dtype) for k in keys[1:3])
  rows = np.asarray(jax.random.randint(keys[3], (b, slots), 0, b))
  bias = jax.random.normal(keys[4], (1, heads, t, slots))
  written = (np.arange(slots) < 7).astype(np.int32)[None].repeat(b, 0)
  mask = attention_mask(jnp.ones((b, t), jnp.int32), jnp.asarray(written), causal=True,
                        query_slots=5 + jnp.arange(t), key_slots=jnp.arange(slots))

  def looked_up(x):
    x = np.asarray(x.astype(jnp.float32))
    return jnp.asarray([[[x[rows[r, s], j, s] for s in range(slots)] for j in range(kv_heads)] for r in range(b)],
                       dtype)
  expected = heads_first_attention(query, looked_up(key), looked_up(value), mask, bias, scale=0.3)
  got = heads_first_attention(query, key, value, mask, bias, scale=0.3, rows=jnp.asarray(rows))
  assert got.dtype == query.dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                             atol=1e-5 if dtype == "float32" else 1.6e-2)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="what XLA:CPU compiles")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_decode_step_moves_no_kv_cache_but_its_update(dtype):
  """Kept as [b, s, k, e], the cache was transposed whole twice per layer and token; kept in
  bfloat16, converted whole to float32 (docs/performance.md, item 44)."""
  model = build_model(small(emb_dim=256, dtype=dtype))
  cache = model.init_cache(2, 40)
  step = nnx.jit(lambda m, t, c: m.decode(t, c))
  hlo = step.lower(model, random_tokens(0, (2, 1)), cache).compile().as_text().split("\nENTRY")[1]
  cache_size = math.prod(cache["layers"][0]["self"]["k"].shape)
  parameters, moved = set(), []
  for line in hlo.splitlines():
    match = re.match(r"\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]\S* ([\w-]+)\(%?([^,)]*)", line)
    if not match or math.prod(int(d) for d in match.group(2).split(",") if d) != cache_size:
      continue
    name, op, operand = match.groups()[0], match.group(3), match.group(4)
    if op == "parameter":
      parameters.add(name)
    elif not (op == "bitcast" or (op == "copy" and operand in parameters) or "dynamic-update-slice" in name):
      moved.append(line.strip()[:120])
  assert len(parameters) == 2 * 2  # k and v of both layers
  assert not moved


# Grouped-query attention ------------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_key_value_heads(kv_heads):
  """GQA is MHA whose key/value heads are shared within each group of query heads."""
  gqa = build_model(small(num_kv_heads=kv_heads))
  mha = build_model(small(num_kv_heads=4))
  nnx.update(mha, nnx.state(gqa, nnx.Not(nnx.Any(nnx.PathContains("key"), nnx.PathContains("value")))))
  for gqa_layer, mha_layer in zip(gqa.decoder.layers, mha.decoder.layers):
    for name in ("key", "value"):
      kernel = getattr(gqa_layer.self_attention, name).kernel[...]  # [d, k, e]
      getattr(mha_layer.self_attention, name).kernel[...] = jnp.repeat(kernel, 4 // kv_heads, axis=1)
  tokens = random_tokens(11)
  np.testing.assert_allclose(run(gqa, tokens), run(mha, tokens), atol=1e-5)


def test_mha_with_all_kv_heads_equals_the_reference_attention():
  """Our attention against jax.nn.dot_product_attention, with GQA, a mask and a bias."""
  keys = jax.random.split(jax.random.key(12), 4)
  q = jax.random.normal(keys[0], (2, 5, 4, 8))
  k = jax.random.normal(keys[1], (2, 7, 2, 8))
  v = jax.random.normal(keys[2], (2, 7, 2, 8))
  bias = jax.random.normal(keys[3], (1, 4, 5, 7))
  mask = jnp.tril(jnp.ones((5, 7), bool), k=2)[None, None].repeat(2, axis=0)
  ours = dot_product_attention(q, k, v, mask, bias, scale=0.3)
  reference = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=0.3)
  np.testing.assert_allclose(ours, reference, atol=1e-5)


# Positions -------------------------------------------------------------------------

def test_rope_scores_depend_only_on_relative_position():
  q, k = jax.random.normal(jax.random.key(13), (2, 1, 1, 1, 16))
  def score(i, j):
    qi = apply_rope(q, jnp.array([[i]]), 10_000.0)
    kj = apply_rope(k, jnp.array([[j]]), 10_000.0)
    return float(jnp.sum(qi * kj))
  assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-4)
  assert score(5, 5) == pytest.approx(float(jnp.sum(q * k)), abs=1e-4)
  assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)


def test_rope_in_bfloat16_stays_within_rounding_of_a_float64_rotation():
  """bf16 rotates in bf16, with sine and cosine of float32 angles: a few roundings off exact."""
  x = jax.random.normal(jax.random.key(14), (2, 64, 3, 16)).astype(jnp.bfloat16)
  positions = jnp.arange(64)[None].repeat(2, axis=0) * 31  # angles up to ~2000 rad
  ours = apply_rope(x, positions, 10_000.0)
  assert ours.dtype == jnp.bfloat16
  exact_x = np.asarray(x, np.float64)
  angles = np.asarray(positions, np.float64)[..., None, None] * 10_000.0 ** (-np.arange(8) / 8)
  x1, x2 = exact_x[..., :8], exact_x[..., 8:]
  exact = np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles),
                          x2 * np.cos(angles) + x1 * np.sin(angles)], axis=-1)
  scale = np.concatenate([np.abs(x1) + np.abs(x2)] * 2, axis=-1)
  error = np.abs(np.asarray(ours, np.float64) - exact)
  # bf16's unit roundoff is 2^-8; sine, cosine, both products and the sum each round once.
  assert np.all(error <= 4 * 2.0 ** -8 * scale)


def test_sinusoidal_values():
  table = sinusoidal_embedding(jnp.arange(3)[None], 8)[0]
  np.testing.assert_allclose(table[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
  inv = 10_000.0 ** (-np.arange(4) / 4)
  np.testing.assert_allclose(table[2], np.concatenate([np.sin(2 * inv), np.cos(2 * inv)]), atol=1e-6)


@pytest.mark.parametrize("scaled", [True, False])
def test_attention_logits_start_at_unit_scale_with_or_without_the_sqrt_head_dim(scaled):
  """T5 leaves its logits undivided by sqrt(head_dim) and draws its query kernel that much smaller."""
  attention = Attention(small(emb_dim=128, num_heads=2, scale_attn_logits=scaled), rope=False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 64, 128))  # unit variance, as after a norm
  logits = jnp.einsum("bqhe,bkhe->bhqk", attention.query(x), attention.key(x)) * attention.scale
  assert float(jnp.std(logits)) == pytest.approx(1.0, rel=0.15)


@pytest.mark.parametrize("arch, num_buckets, max_distance", [("decoder", 32, 17), ("encoder", 32, 9)])
def test_relative_buckets_at_the_smallest_valid_distance_give_finite_logits(arch, num_buckets, max_distance):
  model = build_model(small(arch=arch, position="relative", relative_num_buckets=num_buckets,
                            relative_max_distance=max_distance, max_len=64))
  assert bool(jnp.all(jnp.isfinite(model(random_tokens(20, (1, 60))))))


def test_relative_position_buckets_follow_t5():
  """T5 with 32 buckets, max distance 128: exact below 8 (or 16 one-way), log-spaced beyond."""
  rel = jnp.array([0, -1, -7, -8, -127, -500, 1, 7, 200])
  bidirectional = relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
  # Keys before the query use buckets 0..15; keys after use 16..31.
  expected = [0, 1, 7, 8 + int(np.log(8 / 8) / np.log(128 / 8) * 8), 15, 15, 17, 23, 31]
  np.testing.assert_array_equal(bidirectional, expected)
  causal = np.asarray(relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128))
  # Future keys all share bucket 0 in a causal stack.
  np.testing.assert_array_equal(causal[[0, 6, 7, 8]], [0, 0, 0, 0])
  np.testing.assert_array_equal(causal[[1, 2, 3]], [1, 7, 8])  # exact below 16 one-way
  assert causal[4] == 16 + int(np.log(127 / 16) / np.log(128 / 16) * 16)
  assert causal[5] == 31  # past max_distance: the last bucket


# Precision and dropout ----------------------------------------------------------------

def test_bf16_compute_keeps_fp32_params_and_tracks_fp32_logits():
  fp32 = build_model(small())
  bf16 = build_model(small(dtype="bfloat16"))
  for leaf in jax.tree.leaves(nnx.state(bf16, nnx.Param)):
    assert leaf.dtype == jnp.float32
  tokens = random_tokens(14)
  a, b = fp32(tokens), bf16(tokens)
  assert b.dtype == jnp.float32
  assert_tracks(a, b)


@pytest.mark.parametrize("tie", [True, False])
def test_bf16_logits_are_the_float32_sum_of_bf16_products(tie):
  """Against numpy in float64 from the bf16 hidden states and table: the vocabulary projection
  accumulates and returns float32 whether tied or not (an untied head once rounded its logits
  to bf16, by up to 2**-8 of each, before the loss read them)."""
  model = build_model(small(dtype="bfloat16", tie_embeddings=tie))
  hidden = model.hidden(random_tokens(15))
  logits = model._logits(hidden)
  assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  rounded = lambda a: np.asarray(a.astype(jnp.bfloat16), np.float64)  # noqa: E731
  table = rounded(model.token_embed.embedding[...]).T if tie else rounded(model.lm_head.kernel[...])
  expected = rounded(hidden) @ table
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * np.max(np.abs(expected)))


def assert_tracks(a, b):
  """Logits within bf16's rounding of a few layers (measured: 1% of the largest at most, 0.8% of
  the mean): 2% of each. The logits here are about 0.1, so an absolute bound would hide a bug."""
  np.testing.assert_allclose(a, b, atol=2e-2 * float(jnp.max(jnp.abs(a))))
  assert float(jnp.mean(jnp.abs(a - b))) < 2e-2 * float(jnp.mean(jnp.abs(a)))


@pytest.mark.parametrize("kernel_in_dim", [0, 1])
def test_bf16_matmul_inputs_round_every_product(kernel_in_dim):
  """Against numpy in float64: y, dx and dW are products of bf16-rounded inputs."""
  parts = jax.random.split(jax.random.key(16), 3)
  x = jax.random.normal(parts[0], (6, 5))
  kernel = jax.random.normal(parts[1], (5, 3) if kernel_in_dim == 0 else (3, 5))
  d_out = jax.random.normal(parts[2], (6, 3))
  y, pullback = jax.vjp(lambda x, w: project(x, w, kernel_in_dim=kernel_in_dim, bf16_inputs=True), x, kernel)
  d_x, d_kernel = pullback(d_out)

  rounded = lambda a: np.asarray(a.astype(jnp.bfloat16), np.float64)  # noqa: E731
  w = rounded(kernel) if kernel_in_dim == 0 else rounded(kernel).T
  np.testing.assert_allclose(y, rounded(x) @ w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_x, rounded(d_out) @ w.T, rtol=1e-5, atol=1e-5)
  d_w = rounded(x).T @ rounded(d_out)
  np.testing.assert_allclose(d_kernel, d_w if kernel_in_dim == 0 else d_w.T, rtol=1e-5, atol=1e-5)
  # Exact float32 inputs would have moved dW by far more than that tolerance.
  exact = np.asarray(x, np.float64).T @ np.asarray(d_out, np.float64)
  assert np.max(np.abs(d_w - exact)) > 1e-3


@pytest.mark.parametrize("kernel_in_dim", [0, 1])
def test_bf16_matmul_products_all_run_in_bf16_on_ynnpack(kernel_in_dim):
  """The weight gradient too: XLA:CPU runs a bf16 product it cannot give YNNPACK in float32."""
  x = jax.random.normal(jax.random.key(18), (64, 32))
  kernel = jnp.ones((32, 48) if kernel_in_dim == 0 else (48, 32))
  d_out = jnp.ones((64, 48))

  def forward_and_backward(x, kernel, d_out):
    y, pullback = jax.vjp(lambda x, w: project(x, w, kernel_in_dim=kernel_in_dim, bf16_inputs=True), x, kernel)
    return y, pullback(d_out)

  hlo = jax.jit(forward_and_backward).lower(x, kernel, d_out).compile().as_text()
  assert hlo.count('"kind":"__ynn_fusion"') == 3


@pytest.mark.parametrize("backend, primitive", [("cpu", "dot_general"), ("gpu", "reduce_sum")])
def test_token_sum_is_the_column_sum(monkeypatch, backend, primitive):
  """A product with ones on a CPU (XLA:CPU's column sums are slow), a plain sum elsewhere."""
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  x = jax.random.normal(jax.random.key(20), (37, 6))
  np.testing.assert_allclose(token_sum(x), np.asarray(x, np.float64).sum(axis=0), rtol=1e-6, atol=1e-6)
  # A fresh function each time: make_jaxpr caches traces by function, and the backend is not in the key.
  primitives = {eqn.primitive.name for eqn in jax.make_jaxpr(lambda x: token_sum(x))(x).jaxpr.eqns}
  assert primitive in primitives and not {"dot_general", "reduce_sum"} - {primitive} & primitives


@pytest.mark.parametrize("backend, reduced_width", [("cpu", 32), ("gpu", 8192)])
def test_row_max_and_row_sum_match_numpy(monkeypatch, backend, reduced_width):
  """Halved on a CPU down to 32 columns, then reduced; a plain reduction elsewhere."""
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  for width in (8192, 96, 4094, 7):  # 4094 halves once to an odd 2047, 7 is odd from the start
    x = np.array(jax.random.normal(jax.random.key(width), (4, width)))
    x[1, -1], x[3, 0] = 9.0, 9.0  # the maximum in the last column, and in the first
    # Within four float32 roundings of each row's sum of magnitudes.
    error = np.abs(np.asarray(row_sum(jnp.asarray(x)), np.float64) - x.astype(np.float64).sum(axis=-1))
    assert np.all(error <= 4 * 2**-24 * np.abs(x).sum(axis=-1))
    x[2, :] = -np.inf  # a row of -inf
    np.testing.assert_array_equal(row_max(jnp.asarray(x)), np.max(x, axis=-1))
    np.testing.assert_array_equal(row_max(jnp.asarray(x), keepdims=True), np.max(x, axis=-1, keepdims=True))
    assert row_sum(jnp.asarray(x), keepdims=True).shape == (4, 1)
  x = jnp.zeros((4, 8192))
  for reduction, name in ((row_max, "reduce_max"), (row_sum, "reduce_sum")):
    (eqn,) = [eqn for eqn in jax.make_jaxpr(lambda x: reduction(x))(x).jaxpr.eqns if eqn.primitive.name == name]
    assert eqn.invars[0].aval.shape == (4, reduced_width)


def test_row_reductions_leave_xla_cpu_no_reduce_window():
  """XLA:CPU's tree reduction makes wider ones slow, unfused reduce-windows (docs/performance.md, item 43)."""
  # YNNPACK for plain matmuls only, as `import t5x_like` sets; XLA's default hands it reductions too.
  options = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
  compiled = lambda f, x: jax.jit(f).lower(x).compile(compiler_options=options).as_text()  # noqa: E731
  x = jnp.zeros((16, 1024))
  assert "reduce-window" in compiled(lambda x: jnp.sum(jnp.exp(x), axis=-1), x)
  for reduction in (row_max, row_sum):
    assert "reduce-window" not in compiled(lambda x: reduction(jnp.exp(x)), x)  # noqa: B023


def _tanh_gelu_float64(v):
  return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))


# Each GELU with its value and derivative in float64: exact GELU's from scipy's normal
# distribution, GPT-2's tanh form's from its formula and central differences of it.
GELU_REFERENCES = {
    "exact": (gelu_exact, lambda v: v * scipy.stats.norm.cdf(v),
              lambda v: scipy.stats.norm.cdf(v) + v * scipy.stats.norm.pdf(v)),
    "tanh": (gelu_tanh, _tanh_gelu_float64,
             lambda v: (_tanh_gelu_float64(v + 1e-6) - _tanh_gelu_float64(v - 1e-6)) / 2e-6),
}


@pytest.mark.parametrize("gelu", [gelu_exact, gelu_tanh])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_backward_recomputes_the_cdf_from_x(gelu, dtype):
  """XLA shared one cdf(x) between the passes, an activation-sized float32 array kept for the backward."""
  x, g = jnp.ones((64, 128), dtype), jnp.ones((64, 128), dtype)
  step = jax.jit(jax.value_and_grad(lambda x, g: jnp.sum(gelu(x) * g).astype(jnp.float32)))
  hlo = step.lower(x, g).compile().as_text()
  op = "erf(" if gelu is gelu_exact else "tanh("
  computations = [c for c in hlo.split("\n\n") if op in c and not c.startswith("ENTRY")]
  assert len(computations) == 2  # the forward's fusion and the backward's


# float32 tanh: jax's autodiff of jax.nn.gelu(approximate=True) is 3.2e-6 off too, where tanh nears 1.
@pytest.mark.parametrize("gelu, dtype, tolerance", [
    ("exact", jnp.float32, 1e-6), ("exact", jnp.bfloat16, 1e-2),
    ("tanh", jnp.float32, 1e-5), ("tanh", jnp.bfloat16, 1e-2)])
def test_gelus_and_their_gradients_match_float64_references(gelu, dtype, tolerance):
  """Both GELUs, float32 inside with hand-written backwards: values and gradients against float64."""
  function, value, derivative = GELU_REFERENCES[gelu]
  x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 2001), jnp.array([0.0, -0.5, 1e-4])]).astype(dtype)
  d_y = jax.random.normal(jax.random.key(22), x.shape).astype(dtype)
  y, pullback = jax.vjp(function, x)
  (d_x,) = pullback(d_y)
  assert y.dtype == d_x.dtype == dtype
  x64, d_y64 = np.asarray(x, np.float64), np.asarray(d_y, np.float64)
  expected_y, expected_d_x = value(x64), d_y64 * derivative(x64)
  scale = 1 + np.abs(expected_y)  # relative for large values, absolute near zero
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - expected_y) / scale, tolerance)
  scale = 1 + np.abs(expected_d_x)
  np.testing.assert_array_less(np.abs(np.asarray(d_x, np.float64) - expected_d_x) / scale, tolerance)


@pytest.mark.parametrize("with_bias", [True, False])
def test_parameter_gradients_summed_by_product_match_autodiff(with_bias):
  """add_bias and scale_and_shift sum their parameters' gradients over tokens with token_sum."""
  parts = jax.random.split(jax.random.key(21), 4)
  x, d_y = jax.random.normal(parts[0], (3, 5, 8)), jax.random.normal(parts[1], (3, 5, 8))
  scale = jax.random.normal(parts[2], (8,))
  bias = jax.random.normal(parts[3], (8,)) if with_bias else None
  plain = lambda x, scale, bias: x * scale if bias is None else x * scale + bias  # noqa: E731
  (y, pullback), (expected_y, expected_pullback) = (jax.vjp(f, x, scale, bias) for f in (scale_and_shift, plain))
  np.testing.assert_allclose(y, expected_y, rtol=1e-6)
  got, expected = pullback(d_y), expected_pullback(d_y)
  assert (got[2] is None) == (expected[2] is None) == (bias is None)
  for got_grad, expected_grad in zip(got[:2 + with_bias], expected[:2 + with_bias]):
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-5, atol=1e-5)
  if with_bias:
    rows = x.reshape(15, 8)
    y, pullback = jax.vjp(add_bias, rows, bias)
    d_rows, d_bias = pullback(d_y.reshape(15, 8))
    np.testing.assert_allclose(y, rows + bias, rtol=1e-6)
    np.testing.assert_allclose(d_rows, d_y.reshape(15, 8))
    np.testing.assert_allclose(d_bias, np.asarray(d_y, np.float64).sum(axis=(0, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_bf16_operands_take_bf16_products_in_the_backward_pass_too(backend, monkeypatch):
  """Autodiff would hand the backward products a float32 output gradient and run them in float32."""
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  x = jax.random.normal(jax.random.key(3), (64, 32)).astype(jnp.bfloat16)
  kernel = jax.random.normal(jax.random.key(4), (32, 48)).astype(jnp.bfloat16)
  d_y = jax.random.normal(jax.random.key(5), (64, 48))  # a float32 gradient, as from the loss
  gradients = jax.jit(jax.grad(lambda x, kernel: jnp.sum(
      project(x, kernel, kernel_in_dim=0, bf16_inputs=False) * d_y), argnums=(0, 1)))
  text = gradients.lower(x, kernel).as_text()
  products = re.findall(r"stablehlo.dot_general .*: \((tensor<[^>]*>), (tensor<[^>]*>)\)", text)
  assert len(products) == 2  # the loss is linear in the output: no forward product is needed
  assert all(operand.endswith("xbf16>") for operands in products for operand in operands), products
  assert ("optimization_barrier" in text) == (backend == "cpu")  # GPUs take transposed operands natively
  d_x, d_kernel = gradients(x, kernel)
  x64, kernel64 = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  d_y64 = np.asarray(d_y.astype(jnp.bfloat16), np.float64)
  np.testing.assert_allclose(np.asarray(d_x, np.float64), d_y64 @ kernel64.T, rtol=8e-3, atol=1e-2)
  np.testing.assert_allclose(np.asarray(d_kernel, np.float64), x64.T @ d_y64, rtol=8e-3, atol=1e-2)


def test_xla_attention_backward_takes_bf16_products_off_the_cpu(monkeypatch):
  """As the projections': the scores' float32 gradient is rounded before the products, as flash attention does."""
  keys = jax.random.split(jax.random.key(8), 3)
  q, k, v = (jax.random.normal(key, (2, 16, 4, 8)) for key in keys)
  mask = jnp.tril(jnp.ones((16, 16), bool))[None, None]
  def loss(q, k, v):
    out = dot_product_attention(q, k, v, mask, None, scale=0.35, kernel="xla")
    return jnp.sum(out.astype(jnp.float32) ** 2)
  gradients = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  reference = gradients(q, k, v)  # float32 throughout
  bf16 = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  products = re.findall(r"stablehlo.dot_general .*: \((tensor<[^>]*>), (tensor<[^>]*>)\)",
                        gradients.lower(*bf16).as_text())
  assert len(products) == 6  # two forward, four backward
  assert all(operand.endswith("xbf16>") for operands in products for operand in operands), products
  for got, expected in zip(gradients(*bf16), reference):
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=0.05 * float(jnp.max(jnp.abs(expected))))


def test_bf16_weight_gradient_runs_under_a_transposing_consumer():
  """Regression: XLA folded a consumer's .T into the bf16 product, which Eigen cannot run."""
  x = jax.random.normal(jax.random.key(19), (64, 32))
  got = jax.jit(lambda x: tokens_contracted(x, jnp.ones((64, 48)), bf16_inputs=True).T)(x)
  rounded_x = np.asarray(x.astype(jnp.bfloat16), np.float64)
  np.testing.assert_allclose(got, (rounded_x.T @ np.ones((64, 48))).T, rtol=1e-5, atol=1e-5)


def test_bf16_matmul_inputs_track_fp32_logits():
  tokens = random_tokens(17)
  a = build_model(small())(tokens)
  b = build_model(small(bf16_matmul_inputs=True))(tokens)
  assert_tracks(a, b)
  assert 0 < float(jnp.mean(jnp.abs(a - b))) < 0.02


@pytest.mark.parametrize("arch,overrides", [
    ("decoder", dict(tie_embeddings=False)),
    ("encoder", dict(use_bias=True)),  # the masked-LM head's output bias
    ("encoder_decoder", {}),
])
def test_chunked_loss_kernel_matches_the_logits_path(arch, overrides):
  # The same parameters under both loss kernels: equal sums and equal gradients for
  # every parameter, through the model's own hidden states and output projection.
  tokens, targets = random_tokens(21, (2, 12)), random_tokens(22, (2, 12))
  weights = (jax.random.uniform(jax.random.key(23), (2, 12)) > 0.2).astype(jnp.float32)

  def sums_and_grads(kernel):
    model = build_model(small(arch=arch, loss_kernel=kernel, **overrides))

    def loss(model):
      hidden = model.hidden(tokens, tokens) if arch == "encoder_decoder" else model.hidden(tokens)
      sums = model.loss_sums(hidden, targets, weights, z_loss=1e-2)
      return sums["loss"], sums

    grads, sums = nnx.jit(nnx.grad(loss, has_aux=True))(model)
    return sums, jax.tree.leaves(nnx.state(grads))

  (xla_sums, xla_grads), (chunked_sums, chunked_grads) = sums_and_grads("xla"), sums_and_grads("chunked")
  for name in xla_sums:
    np.testing.assert_allclose(chunked_sums[name], xla_sums[name], rtol=1e-5, err_msg=name)
  assert len(chunked_grads) == len(xla_grads)
  for chunked, expected in zip(chunked_grads, xla_grads):
    np.testing.assert_allclose(chunked, expected, rtol=1e-4, atol=1e-6)


def test_attention_dropout_drops_softmax_probabilities_and_rescales_the_rest():
  # With each value a unit vector, the output row is the (dropped) probability row itself.
  rate, b, t, s = 0.4, 2, 8, 16
  query = jax.random.normal(jax.random.key(0), (b, t, 1, s))
  key = jax.random.normal(jax.random.key(1), (b, 1, s, s))
  value = jnp.broadcast_to(jnp.eye(s), (b, 1, s, s))
  mask = jnp.ones((b, 1, t, s), bool)
  dropout = nnx.Dropout(rate, rngs=nnx.Rngs(dropout=0))
  out = np.asarray(heads_first_attention(query, key, value, mask, None, scale=0.25, dropout=dropout))[:, :, 0]
  probs = scipy.special.softmax(0.25 * np.einsum("bte,bse->bts", np.asarray(query)[:, :, 0], key[:, 0]), axis=-1)
  kept = out != 0
  np.testing.assert_allclose(out[kept], probs[kept] / (1 - rate), rtol=1e-5)
  assert abs((~kept).mean() - rate) < 4 * math.sqrt(rate * (1 - rate) / kept.size)


def test_mlp_dropout_drops_hidden_activations_between_wi_and_wo():
  rate = 0.5
  model = build_model(small(mlp_dropout_rate=rate, mlp_dim=32))
  mlp = model.decoder.layers[0].mlp
  mlp.wo.kernel[...] = jnp.eye(32)  # the output is then the dropped hidden activations
  x = jax.random.normal(jax.random.key(2), (2, 5, 32))
  hidden = np.asarray(jax.nn.gelu(x @ mlp.wi.kernel[...], approximate=False))
  assert small().mlp_activation == "gelu"
  out = np.asarray(mlp(x))
  kept = out != 0
  np.testing.assert_allclose(out[kept], hidden[kept] / (1 - rate), rtol=1e-5)
  assert 0.3 < (~kept).mean() < 0.7
  model.eval()
  np.testing.assert_allclose(np.asarray(mlp(x)), hidden, rtol=1e-5)


def test_attention_dropout_trains_through_the_xla_kernel_and_is_off_in_eval():
  tokens = random_tokens(16, shape=(1, 160))  # past the blocked kernel's first block of keys
  config = small(max_len=160, position="rope")
  model, plain = build_model(config.replace(attention_dropout_rate=0.3)), build_model(config)
  attention = model.decoder.layers[0].self_attention
  model.train()
  assert attention._kernel(None, 160, 160) == "xla"
  assert plain.decoder.layers[0].self_attention._kernel(None, 160, 160) != "xla"
  assert not np.allclose(model(tokens), model(tokens))
  model.eval()
  np.testing.assert_allclose(model(tokens), plain(tokens), rtol=1e-5, atol=1e-6)
  with pytest.raises(ConfigError, match="attention_kernel='blocked' never forms the attention probabilities"):
    config.replace(attention_kernel="blocked", attention_dropout_rate=0.1).validate()


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_final_dropout_drops_the_final_hidden_states_only_where_asked(norm_position):
  # The same seeds draw the same masks inside the stack; only the last one differs.
  rate, tokens = 0.5, random_tokens(17)
  hidden = {}
  for final_dropout in (True, False):
    model = build_model(small(dropout_rate=rate, norm_position=norm_position, final_dropout=final_dropout))
    model.train()
    hidden[final_dropout] = np.asarray(model.hidden(tokens))
  kept = hidden[True] != 0
  np.testing.assert_allclose(hidden[True][kept], hidden[False][kept] / (1 - rate), rtol=1e-6)
  assert 0.4 < 1 - kept.mean() < 0.6


def test_dropout_drops_the_embeddings_and_each_sublayers_output_in_training_only(monkeypatch):
  """Without the final dropout, every dropout the stack runs, recorded: the embeddings' and one per
  sublayer, each zeroing about the rate and scaling the rest by 1 / (1 - rate); none in eval."""
  rate, tokens = 0.3, random_tokens(15)
  model = build_model(small(dropout_rate=rate, final_dropout=False, position="rope"))
  calls = []
  real_call = nnx.Dropout.__call__

  def recorded(self, x, *args, **kwargs):
    out = real_call(self, x, *args, **kwargs)
    if not self.deterministic and self.rate:
      calls.append((np.asarray(x), np.asarray(out)))
    return out
  monkeypatch.setattr(nnx.Dropout, "__call__", recorded)
  model.train()
  trained = np.asarray(model(tokens))
  assert len(calls) == 1 + 2 * model.config.num_layers  # embeddings; attention and MLP of each layer
  np.testing.assert_array_equal(calls[0][0], np.asarray(model.token_embed(tokens)))  # RoPE adds nothing there
  for x, out in calls:
    kept = out != 0
    np.testing.assert_allclose(out[kept], x[kept] / (1 - rate), rtol=1e-6)
    assert abs((~kept).mean() - rate) < 4 * math.sqrt(rate * (1 - rate) / kept.size)
  model.eval()
  calls.clear()
  evaluated = np.asarray(model(tokens))
  assert not calls and not np.allclose(trained, evaluated)
  np.testing.assert_array_equal(evaluated, np.asarray(model(tokens)))
