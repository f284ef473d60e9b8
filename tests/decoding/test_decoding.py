"""Decoding strategies against references: full-forward recomputation, exhaustive search,
the filtered distribution, one-prompt-at-a-time decoding."""

import dataclasses
import functools
import itertools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import nnx

from models.config import ConfigError, ModelConfig
from models.transformer import build_model
from t5x_like import decoding
from t5x_like.decoding import (NEG_INF, NO_TOKEN, DecodeConfig, filter_logits, generate, greedy_token, limit_vocab,
                               sample)

EOS = 1


@pytest.fixture(scope="module")
def decoder():
  return build_model(ModelConfig(arch="decoder", vocab_size=24, emb_dim=32, num_heads=4, num_kv_heads=2,
                                 mlp_dim=48, num_layers=2, position="rope"), seed=3)


@pytest.fixture(scope="module")
def encoder_decoder():
  return build_model(ModelConfig(arch="encoder_decoder", vocab_size=24, emb_dim=32, num_heads=4,
                                 mlp_dim=48, num_layers=2, position="relative"), seed=4)


PROMPTS = [[5, 9, 3, 7, 11], [4, 8], [13, 2, 6]]


def padded(tokens, width):
  """One row of `tokens` padded to `width`, and its segment ids (pads are segment 0, after
  the tokens): the references' forward passes keep one shape, so their ops compile once."""
  row = jnp.zeros((1, width), jnp.int32).at[0, :len(tokens)].set(jnp.array(tokens))
  return row, (jnp.arange(width) < len(tokens)).astype(jnp.int32)[None]


def full_forward(model, tokens, width=16, prefix_len=0):
  """Logits [len(tokens), v] of one full forward pass; the first prefix_len tokens attend both ways."""
  row, segments = padded(tokens, width)
  if prefix_len:
    return _prefix_forward(model, row, segments, jnp.arange(width)[None, :] < prefix_len)[0, :len(tokens)]
  return _forward(model, row, segments)[0, :len(tokens)]


@nnx.jit
def _forward(model, row, segments):
  return model(row, segment_ids=segments)


@nnx.jit
def _prefix_forward(model, row, segments, prefix):
  return model(row, segment_ids=segments, prefix_mask=prefix)


@nnx.jit
def _encoder_decoder_forward(model, source, row, segments):
  return model(source, row, decoder_segment_ids=segments)


def greedy_by_recomputation(model, prompt, steps, prefix_len=0):
  """Reference: the full forward pass over the whole sequence at every step, no cache."""
  tokens = list(prompt)
  for _ in range(steps):
    next_token = int(jnp.argmax(full_forward(model, tokens, prefix_len=prefix_len)[-1]))
    tokens.append(next_token)
    if next_token == EOS:
      break
  return tokens[len(prompt):]


def test_cached_greedy_equals_recomputing_the_full_forward_pass(decoder):
  config = DecodeConfig(max_new_tokens=8, eos_id=EOS)
  for prompt, out in zip(PROMPTS, generate(decoder, PROMPTS, config)):
    assert out == greedy_by_recomputation(decoder, prompt, 8)


def test_encoder_decoder_greedy_equals_recomputation(encoder_decoder):
  inputs = [[5, 9, 3, 7, 11, 4], [4, 8, 2]]
  outputs = generate(encoder_decoder, [[0]] * 2, DecodeConfig(max_new_tokens=6, eos_id=EOS),
                     encoder_inputs=inputs)
  for source, out in zip(inputs, outputs):
    tokens = [0]
    for _ in range(6):
      row, segments = padded(tokens, 8)
      logits = _encoder_decoder_forward(encoder_decoder, jnp.array([source]), row, segments)
      tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
      if tokens[-1] == EOS:
        break
    assert out == tokens[1:]


@pytest.mark.parametrize("relative", [False, True])
def test_prefix_lm_decoding_reads_the_prompt_both_ways_and_the_new_tokens_causally(relative, decoder,
                                                                                   encoder_decoder):
  """With RoPE, and with T5 buckets in both directions (the cache's keys read at their distances)."""
  if relative:
    decoder = build_model(dataclasses.replace(decoder.config, position="relative", relative_bidirectional=True),
                          seed=3)
  config = DecodeConfig(max_new_tokens=6, eos_id=EOS, prefix_lm=True)
  outputs = generate(decoder, PROMPTS, config)
  for prompt, out in zip(PROMPTS, outputs):
    assert out == greedy_by_recomputation(decoder, prompt, 6, prefix_len=len(prompt))
  assert outputs != generate(decoder, PROMPTS, dataclasses.replace(config, prefix_lm=False))
  one_beam = dataclasses.replace(config, strategy="beam", num_beams=1, length_penalty=0.0)
  assert generate(decoder, PROMPTS, one_beam) == outputs
  with pytest.raises(ConfigError, match="prefix_lm decoding needs a decoder"):
    generate(encoder_decoder, [[0]], config, encoder_inputs=[[5, 9]])


def test_encoder_inputs_must_match_the_model_and_the_prompts(decoder, encoder_decoder):
  config = DecodeConfig(max_new_tokens=2)
  with pytest.raises(ConfigError, match="model.arch='decoder', encoder_inputs given"):
    generate(decoder, [[0]], config, encoder_inputs=[[5, 9]])
  with pytest.raises(ConfigError, match="model.arch='encoder_decoder', encoder_inputs not given"):
    generate(encoder_decoder, [[0]], config)
  with pytest.raises(ConfigError, match="1 decoder prompts for 2 encoder inputs"):
    generate(encoder_decoder, [[0]], config, encoder_inputs=[[5, 9], [7]])


def test_learned_positions_decode_up_to_max_len_and_refuse_to_go_past_it():
  # Past the table, jnp.take embeds positions as NaN and greedy quietly returns the last id.
  model = build_model(ModelConfig(arch="decoder", vocab_size=24, emb_dim=32, num_heads=4, mlp_dim=48,
                                  num_layers=1, position="learned", max_len=16), seed=5)
  prompt = PROMPTS[0]
  config = DecodeConfig(max_new_tokens=16 - len(prompt), eos_id=-1)
  assert generate(model, [prompt], config)[0] == greedy_by_recomputation(model, prompt, config.max_new_tokens)
  with pytest.raises(ConfigError, match="max_new_tokens: 17 exceeds model.max_len=16"):
    generate(model, [prompt], dataclasses.replace(config, max_new_tokens=12))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU's cache is float32 in the host's memory")
@pytest.mark.parametrize("strategy, rows", [("greedy", 3), ("beam", 3 * 4)])
def test_a_cache_past_the_hosts_memory_is_refused_before_allocating(decoder, strategy, rows, monkeypatch):
  # A host of 1 MiB, so that decoding, were the cache not checked, would run rather than exhaust this one.
  memory = 256 * 4096
  monkeypatch.setattr(os, "sysconf", {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 256}.get)
  # Keys and values: 2 layers x 2 kv heads x 8 dims a token each, in float32 on a CPU.
  token_bytes = 2 * 2 * 2 * 8 * 4
  length = memory // (rows * token_bytes) + 1  # one token more than the host holds
  config = DecodeConfig(strategy=strategy, max_new_tokens=length - max(map(len, PROMPTS)))
  with pytest.raises(ConfigError, match=rf"KV cache of {rows} rows .* of {length} tokens .*needs "
                                        rf"{rows * length * token_bytes / 2**30:.3g} GiB, more than the "
                                        rf"{memory / 2**30:.3g} GiB of memory here"):
    generate(decoder, PROMPTS, config)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU's cache is float32 in the host's memory")
def test_an_encoder_decoders_cache_counts_its_cross_attention_keys(encoder_decoder, monkeypatch):
  memory = 256 * 4096
  monkeypatch.setattr(os, "sysconf", {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 256}.get)
  token_bytes = 2 * 2 * 4 * 8 * 4  # keys and values, 2 decoder layers x 4 heads x 8 dims, float32
  rows, length = 2, 1 + 4
  encoder_length = memory // (rows * token_bytes) - length + 1  # together, one token more than the host holds
  inputs = [[5] * encoder_length, [4, 8]]
  with pytest.raises(ConfigError, match=rf"of {length} tokens .* and {encoder_length} encoder tokens needs"):
    generate(encoder_decoder, [[0]] * rows, DecodeConfig(max_new_tokens=4), encoder_inputs=inputs)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_batched_prompts_of_different_lengths_equal_one_at_a_time(decoder, strategy):
  config = DecodeConfig(strategy=strategy, max_new_tokens=6, eos_id=EOS, num_beams=3)
  batched = generate(decoder, PROMPTS, config)
  alone = [generate(decoder, [p], config)[0] for p in PROMPTS]
  assert batched == alone


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_a_decoding_loop_returns_its_tokens_and_no_copy_of_the_parameters(decoder, strategy):
  """nnx.jit hands a model's state back as outputs unless told its call changes nothing: each
  generate wrote a second copy of every parameter (416 MB for a 109M-parameter decoder)."""
  config = DecodeConfig(strategy=strategy, max_new_tokens=3, num_beams=2)
  tokens, lengths = (jnp.asarray(x) for x in decoding.left_pad(PROMPTS, config.pad_id))
  loop, values = decoding._Loop.of(config), decoding._traced_values(config)
  if strategy == "beam":
    lowered = decoding._beam_loop.lower(decoder, tokens, lengths, None, values, loop=loop)
  else:
    lowered = decoding._greedy_or_sample_loop.lower(decoder, tokens, lengths, jax.random.key(0), None, values,
                                                    loop=loop)
  params = sum(x.nbytes for x in jax.tree.leaves(nnx.state(decoder)))
  assert lowered.compile().memory_analysis().output_size_in_bytes == len(PROMPTS) * 3 * 4 < params  # int32 tokens


def test_a_model_with_dropout_on_is_named_before_decoding(decoder):
  """Flax's own error was 'Cannot mutate RngCount from a different trace level'."""
  training = build_model(dataclasses.replace(decoder.config, dropout_rate=0.1), seed=3)
  with pytest.raises(ConfigError, match=r"training mode, with dropout on: call model.eval\(\)"):
    generate(training, PROMPTS, DecodeConfig(max_new_tokens=2))
  training.eval()
  assert generate(training, PROMPTS, DecodeConfig(max_new_tokens=2)) == generate(decoder, PROMPTS, DecodeConfig(
      max_new_tokens=2))  # the same weights (seed 3), dropout off


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_top_k_1_and_beam_width_1_equal_greedy(decoder, dtype):
  """In bfloat16 too, where beam search reads the cache through its row index and greedy through products."""
  if dtype == "bfloat16":
    decoder = build_model(dataclasses.replace(decoder.config, dtype="bfloat16"), seed=3)
  greedy = generate(decoder, PROMPTS, DecodeConfig(max_new_tokens=6, eos_id=EOS))
  top1 = generate(decoder, PROMPTS, DecodeConfig(strategy="sample", top_k=1, max_new_tokens=6, eos_id=EOS))
  # Without a length penalty: with alpha > 0 a beam still live at the end may outrank one that ended.
  beam1 = generate(decoder, PROMPTS, DecodeConfig(strategy="beam", num_beams=1, length_penalty=0.0,
                                                  max_new_tokens=6, eos_id=EOS))
  assert top1 == greedy and beam1 == greedy


def test_a_temperature_near_zero_samples_the_greedy_tokens(decoder):
  """Logits / 1e-10 pass 1e10: scaled as they were, XLA's compiled log-softmax of them came out
  -inf everywhere and the sampler drew id 0 (before that, an id past the vocabulary)."""
  greedy = generate(decoder, PROMPTS, DecodeConfig(max_new_tokens=6, eos_id=EOS))
  cold = generate(decoder, PROMPTS, DecodeConfig(strategy="sample", temperature=1e-10, max_new_tokens=6, eos_id=EOS))
  assert cold == greedy
  for field in ("temperature", "repetition_penalty", "length_penalty"):
    with pytest.raises(ConfigError, match="nan"):
      DecodeConfig(**{field: float("nan")}).validate()
  # Positive as Python floats, 0 (or infinite) as the float32 the loop computes in.
  for field, value in (("temperature", 1e-40), ("top_p", 1e-45), ("repetition_penalty", 1e-50),
                       ("temperature", 1e39), ("length_penalty", -1e39)):
    with pytest.raises(ConfigError, match=re.escape(str(value))):
      DecodeConfig(**{field: value}).validate()


def test_logits_that_are_not_finite_are_named_by_every_strategy(decoder):
  broken = build_model(decoder.config, seed=3)
  broken.token_embed.embedding[...] = jnp.full_like(broken.token_embed.embedding[...], jnp.nan)
  for strategy in ("greedy", "sample", "beam"):
    with pytest.raises(ConfigError, match="the model's logits were not finite"):
      generate(broken, PROMPTS, DecodeConfig(strategy=strategy, max_new_tokens=3, num_beams=2))


@pytest.mark.parametrize("prompts, options, message", [
    (PROMPTS, dict(pad_id=24), r"pad_id=24 is not an id of the model's vocabulary \[0, 24\)"),
    (PROMPTS, dict(eos_id=12, vocab_limit=10), r"eos_id=12 is not among the ids a step can choose \(below 10, "),
    (PROMPTS, dict(eos_id=1, excluded_ids=(1,)), r"eos_id=1 is not among the ids a step can choose .*not excluded"),
    ([[5, 9], [4, 30, -2]], {}, r"prompt 1 holds ids outside the model's vocabulary \[0, 24\): \[-2, 30\]"),
    ([[5, 9], []], {}, r"prompt 1 is empty"),
    ([], {}, r"no prompts to decode"),
])
def test_ids_the_model_cannot_read_and_empty_prompts_are_named(decoder, prompts, options, message):
  """Each would decode garbage or fail inside tracing: an id past the embedding table reads a row
  of NaNs, and an empty row's queries see no key."""
  with pytest.raises(ConfigError, match=message):
    generate(decoder, prompts, DecodeConfig(max_new_tokens=2, **options))


def test_an_encoder_input_of_ids_past_the_vocabulary_is_named(encoder_decoder):
  with pytest.raises(ConfigError, match=r"encoder input 0 holds ids outside"):
    generate(encoder_decoder, [[0]], DecodeConfig(max_new_tokens=2), encoder_inputs=[[5, 99]])


def test_a_temperature_however_high_samples_no_id_past_the_vocab_limit():
  logits = jnp.asarray(np.random.default_rng(0).normal(0, 3, (2, 50)), jnp.float32)
  scores = filter_logits(limit_vocab(logits, 40), temperature=1e30, top_k=0, top_p=1.0)
  assert np.all(np.asarray(scores)[:, 40:] <= NEG_INF)  # at 1e30, -1e30 / T would be about -1
  assert np.all(np.asarray(jax.vmap(lambda k: sample(k, scores))(jax.random.split(jax.random.key(0), 64))) < 40)


def test_excluded_ids_are_never_chosen_by_any_strategy(decoder):
  """An encoder-decoder's mask sits below the sentinels it may write: a limit cannot cut it off.
  Each strategy, its first greedy picks excluded, chooses as if those ids had -inf logits."""
  first = sorted({row[0] for row in generate(decoder, PROMPTS, DecodeConfig(max_new_tokens=1, eos_id=-1))})
  for strategy in ("greedy", "sample", "beam"):
    config = DecodeConfig(strategy=strategy, max_new_tokens=4, eos_id=-1, excluded_ids=tuple(first), num_beams=2)
    assert not {t for row in generate(decoder, PROMPTS, config, seed=1) for t in row} & set(first), strategy
  logits = jnp.asarray(np.random.default_rng(0).normal(0, 3, (2, 12)), jnp.float32)
  limited = np.asarray(limit_vocab(logits, 10, (3, 7, 11)))
  kept = np.isin(np.arange(12), [3, 7, 10, 11], invert=True)
  np.testing.assert_array_equal(limited[:, kept], np.asarray(logits)[:, kept])
  assert np.all(limited[:, ~kept] == NEG_INF)
  with pytest.raises(ConfigError, match=r"excluded_ids=\(-1,\) must hold ids \(integers\), each at least 0"):
    DecodeConfig(excluded_ids=(-1,)).validate()


def test_a_repetition_penalty_below_one_keeps_ids_past_the_vocab_limit_out(decoder):
  """The penalty multiplies a seen id's negative logit, which would lift the limit's -1e30 off the
  floor filter_logits keeps out; at temperature 1e30 such an id would then be drawn often."""
  config = DecodeConfig(strategy="sample", temperature=1e30, repetition_penalty=0.5, vocab_limit=8,
                        max_new_tokens=4, eos_id=-1)
  prompts = [[5, 20, 21, 22, 23]] * 8  # ids 20 to 23 are past the limit and seen
  assert all(t < 8 for row in generate(decoder, prompts, config, seed=2) for t in row)


def test_sampling_is_reproducible_for_a_seed(decoder):
  config = DecodeConfig(strategy="sample", temperature=1.5, max_new_tokens=8, eos_id=EOS)
  assert generate(decoder, PROMPTS, config, seed=7) == generate(decoder, PROMPTS, config, seed=7)
  assert generate(decoder, PROMPTS * 4, config, seed=7) != generate(decoder, PROMPTS * 4, config, seed=8)


def test_another_temperature_filter_penalty_or_end_token_reruns_the_compiled_loop(decoder, request):
  """A sweep over sampling settings or length penalties compiles each loop once; a change of which
  filters run compiles another."""
  compiles = []

  def count(event, seconds, **kwargs):
    if event.endswith("backend_compile_duration"):
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(count)
  request.addfinalizer(lambda: jax.monitoring.unregister_event_duration_listener(count))
  pairs = (("sample", dict(temperature=0.5, top_k=3, top_p=0.9, repetition_penalty=1.2, eos_id=-1, pad_id=0),
            dict(temperature=2.0, top_k=7, top_p=0.5, repetition_penalty=1.5, eos_id=9, pad_id=1)),
           ("greedy", dict(repetition_penalty=1.2, eos_id=-1), dict(repetition_penalty=1.5, eos_id=9, temperature=3.0)),
           ("beam", dict(num_beams=2, length_penalty=0.0, eos_id=-1), dict(num_beams=2, length_penalty=2.0, eos_id=7)))
  for strategy, first, second in pairs:
    generate(decoder, PROMPTS, DecodeConfig(strategy=strategy, max_new_tokens=4, **first))
    compiles.clear()
    generate(decoder, PROMPTS, DecodeConfig(strategy=strategy, max_new_tokens=4, **second))
    assert not compiles, strategy
  generate(decoder, PROMPTS, DecodeConfig(strategy="sample", max_new_tokens=4, top_k=0, top_p=0.9))
  assert compiles  # no top-k: another loop
  unfiltered, huge_k = (DecodeConfig(strategy="sample", max_new_tokens=4, top_k=k) for k in (0, 10**12))
  assert generate(decoder, PROMPTS, huge_k, seed=2) == generate(decoder, PROMPTS, unfiltered, seed=2)  # past int32


def expected_distribution(logits, temperature, top_k, top_p):
  """Independent numpy reference for the filtered next-token distribution: scale, keep the top k,
  renormalise, keep the smallest nucleus holding top_p of that (Hugging Face's order), renormalise."""
  probs = np.exp(logits / temperature - np.max(logits / temperature))
  order = np.argsort(-probs)
  if top_k:
    probs[order[top_k:]] = 0.0
  probs /= probs.sum()
  keep = np.zeros_like(probs, bool)
  mass = 0.0
  for token in order:
    if mass >= top_p or probs[token] == 0:
      break
    keep[token] = True
    mass += probs[token]
  filtered = np.where(keep, probs, 0.0)
  return filtered / filtered.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (1.0, 4, 0.8)])
def test_sampled_frequencies_match_the_filtered_distribution(decoder, temperature, top_k, top_p):
  prompt = [5, 9, 3]
  logits = np.asarray(decoder(jnp.array([prompt]))[0, -1], np.float64)
  expected = expected_distribution(logits, temperature, top_k, top_p)
  draws = 4000
  config = DecodeConfig(strategy="sample", temperature=temperature, top_k=top_k, top_p=top_p,
                        max_new_tokens=1, eos_id=EOS)
  first_tokens = [row[0] for row in generate(decoder, [prompt] * draws, config, seed=11)]
  observed = np.bincount(first_tokens, minlength=len(expected)) / draws
  assert np.all(observed[expected == 0] == 0), "a filtered-out token was sampled"
  # Within 4.5 binomial standard deviations (plus a hair) for every token.
  tolerance = 4.5 * np.sqrt(expected * (1 - expected) / draws) + 1e-3
  assert np.all(np.abs(observed - expected) <= tolerance), (observed, expected)


def test_filter_logits_keeps_the_nucleus_exactly():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(filter_logits(logits, temperature=1.0, top_k=0, top_p=0.8))) & (
      np.asarray(filter_logits(logits, temperature=1.0, top_k=0, top_p=0.8)) > -1e20)
  np.testing.assert_array_equal(kept[0], [True, True, False, False])


def kept_by_sorting(row, top_k, top_p):
  """numpy reference for one row of logits: which survive top-k, then the top-p nucleus."""
  keep = np.ones(row.shape, bool)
  if top_k:
    keep &= row >= np.sort(row)[-top_k]
  if top_p < 1:
    probs = np.where(keep, np.exp(row - row.max()), 0.0)
    probs /= probs.sum()
    order = np.argsort(-row, kind="stable")
    mass_before = np.cumsum(probs[order]) - probs[order]
    keep &= row >= row[order][mass_before < top_p].min()
  return keep


@pytest.mark.parametrize("top_k,top_p,temperature", [(1, 1.0, 1.0), (7, 1.0, 1.0), (300, 1.0, 0.5), (0, 0.3, 1.0),
                                                     (0, 0.95, 2.0), (50, 0.9, 1.0), (50, 0.9, 0.7)])
def test_filters_keep_what_sorting_keeps(top_k, top_p, temperature):
  """Ties, negative and masked (NEG_INF) logits included; the filters search thresholds, not sort.
  Logits of spread 3 make the temperature move both the nucleus and every probability."""
  rng = np.random.default_rng(top_k + int(100 * top_p))
  logits = rng.normal(0, 3, (6, 1000)).astype(np.float32)
  logits[0, :40] = logits[0, 40]  # a run of ties
  logits[1] = np.round(logits[1])  # many ties
  logits[2, ::3] = NEG_INF  # filtered before
  logits[3] = -np.abs(logits[3]) - 50  # all negative
  scores = np.asarray(filter_logits(jnp.asarray(logits), temperature=temperature, top_k=top_k, top_p=top_p))
  for row, score_row in zip(logits, scores):
    scaled = row.astype(np.float64) / temperature
    kept = kept_by_sorting(scaled, top_k, top_p)
    np.testing.assert_array_equal(score_row > NEG_INF / 2, kept)
    log_probs = scaled[kept] - scipy.special.logsumexp(scaled[kept])  # renormalised over the kept
    np.testing.assert_allclose(score_row[kept], log_probs, rtol=1e-5, atol=1e-5)


def test_greedy_token_is_the_first_largest_logit_as_numpy_argmax_picks():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (5, 1000)).astype(np.float32)
  logits[0, [17, 400, 999]] = 50.0  # tied for the top
  logits[1] = np.round(logits[1])  # many ties
  logits[2, :-1] = NEG_INF  # only the last token left
  logits[3] = -np.abs(logits[3]) - 50  # all negative
  np.testing.assert_array_equal(greedy_token(jnp.asarray(logits)), np.argmax(logits, axis=-1))


def test_greedy_token_refuses_rows_whose_largest_logit_is_not_finite():
  """argmax would pick id 0 from a row of -inf and the overflowed id from a +inf: neither is the model's choice."""
  logits = np.zeros((4, 6), np.float32)
  logits[0] = -np.inf
  logits[1, 3] = np.inf
  logits[2, 4] = np.nan
  logits[3, :5] = -np.inf  # one finite logit is a choice
  np.testing.assert_array_equal(greedy_token(jnp.asarray(logits)), [NO_TOKEN, NO_TOKEN, NO_TOKEN, 5])


def test_sample_draws_each_token_at_its_probability():
  probs = np.array([0.0, 0.5, 0.0, 0.2, 0.25, 0.05, 0.0, 0.0])
  scores = jnp.log(jnp.asarray(probs, jnp.float32))  # -inf where a token may not be drawn
  draws = 20000
  keys = jax.random.split(jax.random.key(0), draws)
  tokens = np.asarray(jax.vmap(lambda key: sample(key, scores[None])[0])(keys))
  observed = np.bincount(tokens, minlength=len(probs)) / draws
  assert np.all(observed[probs == 0] == 0)
  np.testing.assert_allclose(observed, probs, atol=4.5 * np.sqrt(0.25 / draws))


def test_sample_never_draws_a_filtered_token_where_the_running_sum_steps_up(monkeypatch):
  """XLA:CPU sums in a tree, so jnp.cumsum can step up by an ulp at a token of probability 0:
  a uniform drawn onto that step must still pick a token the filters kept."""
  logits = jnp.asarray(np.random.default_rng(0).normal(0, 3, (64, 8192)), jnp.float32)
  scores = filter_logits(logits, temperature=1.0, top_k=50, top_p=0.9)
  probs = np.asarray(jnp.exp(scores))
  cdf = np.asarray(jnp.cumsum(jnp.exp(scores), axis=-1))
  before = np.concatenate([np.zeros((64, 1), np.float32), cdf[:, :-1]], axis=1)
  steps_up = (cdf > before) & (probs == 0)
  rows = np.flatnonzero(steps_up.any(axis=1))
  assert len(rows), "no step at a filtered token on this XLA: nothing to test"
  uniforms = before[rows, np.argmax(steps_up[rows], axis=1)] / cdf[rows, -1]  # onto each row's first step
  monkeypatch.setattr(jax.random, "uniform", lambda key, shape: jnp.asarray(uniforms, jnp.float32))
  tokens = np.asarray(sample(jax.random.key(0), scores[rows]))
  assert np.all(probs[rows, tokens] > 0)


def test_vocab_limit_keeps_ids_the_tokenizer_lacks_out_of_every_strategy(decoder):
  """A model vocabulary padded past its tokenizer's (GPT-2's 50257 with an 8192-id tokenizer):
  no strategy may return an id the tokenizer cannot decode."""
  limit = max(t for row in generate(decoder, PROMPTS, DecodeConfig(max_new_tokens=6)) for t in row)
  assert limit > EOS  # an id greedy picks when nothing stops it
  for strategy in ("greedy", "sample", "beam"):
    config = DecodeConfig(strategy=strategy, max_new_tokens=6, vocab_limit=limit, num_beams=2)
    assert all(t < limit for row in generate(decoder, PROMPTS, config, seed=1) for t in row), strategy


def test_beam_search_finds_the_exhaustive_best(decoder):
  """With as many beams as prefixes, beam search must return the best sequence (alpha = 0)."""
  vocab, steps, prompt = 24, 2, [5, 9, 3]
  config = DecodeConfig(strategy="beam", num_beams=vocab, max_new_tokens=steps, eos_id=EOS, length_penalty=0.0)
  found = generate(decoder, [prompt], config)[0]

  def log_probs(continuations):  # of equal lengths, scored in one forward pass
    logp = np.asarray(jax.nn.log_softmax(decoder(jnp.array([prompt + c for c in continuations])), axis=-1))
    return [float(sum(logp[row, len(prompt) - 1 + i, t] for i, t in enumerate(c)))
            for row, c in enumerate(continuations)]

  pairs = [[a, b] for a, b in itertools.product(range(vocab), repeat=2) if a != EOS]
  best = max(log_probs([[EOS]]) + log_probs(pairs))
  assert log_probs([found])[0] == pytest.approx(best, abs=1e-5)


def beam_by_rescoring(last_log_probs, prompt, beams, steps):
  """Reference beam search without an end token: each step scores every beam's whole sequence anew."""
  live = [([], 0.0)]
  for _ in range(steps):
    candidates = [(tokens + [token], score + float(log_prob)) for tokens, score in live
                  for token, log_prob in enumerate(last_log_probs(prompt + tokens))]
    live = sorted(candidates, key=lambda candidate: -candidate[1])[:beams]
  return live[0][0]


def test_beam_search_equals_rescoring_every_beam_from_scratch(decoder):
  """Over 6 steps beams overtake and replace each other; each must read its own history from the cache."""
  config = DecodeConfig(strategy="beam", num_beams=3, max_new_tokens=6, eos_id=-1)
  last_log_probs = lambda tokens: jax.nn.log_softmax(full_forward(decoder, tokens)[-1])  # noqa: E731
  expected = [beam_by_rescoring(last_log_probs, prompt, 3, 6) for prompt in PROMPTS]
  assert generate(decoder, PROMPTS, config) == expected


def test_encoder_decoder_beam_search_equals_rescoring_every_beam_from_scratch(encoder_decoder):
  """The same with cross-attention, whose keys every beam of an input shares, and a relative position bias."""
  config = DecodeConfig(strategy="beam", num_beams=3, max_new_tokens=6, eos_id=-1)
  sources = [[13, 2, 6, 9], [7, 7, 3, 12, 20]]

  def last_log_probs(source, tokens):
    row, segments = padded(tokens, 8)
    logits = _encoder_decoder_forward(encoder_decoder, jnp.array([source]), row, segments)
    return jax.nn.log_softmax(logits[0, len(tokens) - 1])

  expected = [beam_by_rescoring(functools.partial(last_log_probs, source), [0], 3, 6) for source in sources]
  assert generate(encoder_decoder, [[0]] * 2, config, encoder_inputs=sources) == expected


def beam_with_eos_by_rescoring(last_log_probs, prompt, beams, steps, eos, alpha):
  """Reference beam search with an end token and Wu et al.'s length penalty, sequences rescored
  from scratch: of each step's 2k best candidates, those among the best k that end are finished
  (scored log p / ((5 + length) / 6)^alpha), the best k that do not end live on; live beams
  compete at full length at the end."""
  penalty = lambda length: ((5 + length) / 6) ** alpha  # noqa: E731
  live, finished = [([], 0.0)], []
  for step in range(1, steps + 1):
    candidates = sorted(((tokens + [token], score + float(log_prob)) for tokens, score in live
                         for token, log_prob in enumerate(last_log_probs(prompt + tokens))),
                        key=lambda candidate: -candidate[1])[:2 * beams]
    finished += [(tokens, score / penalty(step)) for rank, (tokens, score) in enumerate(candidates)
                 if tokens[-1] == eos and rank < beams]
    live = [candidate for candidate in candidates if candidate[0][-1] != eos][:beams]
  finished += [(tokens, score / penalty(steps)) for tokens, score in live]
  return max(finished, key=lambda candidate: candidate[1])[0]


def test_beam_search_with_an_end_token_and_length_penalty_equals_rescoring(decoder):
  """Finished sequences, kept aside and scored by their penalised length, against live beams."""
  @functools.cache
  def last_log_probs(tokens):
    return np.asarray(jax.nn.log_softmax(full_forward(decoder, list(tokens))[-1]))

  prompt, found = PROMPTS[2], {}
  # With end token 9, alpha 0 and 2 pick sequences of different lengths; with 11 and alpha 3, a
  # beam still live at the end wins only because its score too is divided by its length penalty.
  for eos, alpha in [(eos, alpha) for eos in (9, 7, 19) for alpha in (0.0, 0.6, 2.0)] + [(11, 3.0)]:
    config = DecodeConfig(strategy="beam", num_beams=3, max_new_tokens=6, eos_id=eos, length_penalty=alpha)
    found[eos, alpha] = generate(decoder, [prompt], config)[0]
    assert found[eos, alpha] == beam_with_eos_by_rescoring(lambda t: last_log_probs(tuple(t)), prompt, 3, 6,
                                                           eos, alpha), (eos, alpha)
  assert any(tokens[-1] == eos and len(tokens) < 6 for (eos, _), tokens in found.items())  # an early finish won
  assert any(found[eos, 0.0] != found[eos, 2.0] for eos in (9, 7, 19))  # and the penalty changed a winner
  assert len(found[11, 3.0]) == 6 and 11 not in found[11, 3.0]


def test_beam_search_refuses_a_repetition_penalty_it_would_ignore_and_more_beams_than_ids(decoder):
  with pytest.raises(ConfigError, match="not to beam search"):
    DecodeConfig(strategy="beam", repetition_penalty=1.2).validate()
  for limit, ids in ((0, 24), (10, 10)):  # the model's 24 ids, or the tokenizer's first 10
    with pytest.raises(ConfigError, match=f"num_beams={ids + 1} exceeds the {ids} ids a step can choose from"):
      generate(decoder, PROMPTS, DecodeConfig(strategy="beam", num_beams=ids + 1, vocab_limit=limit))


FAVOUR_ID_0 = 0.3  # where the third prompt (two pads) takes id 0 second, unless a pad were counted as seen


@pytest.mark.parametrize("favour_id_0", [False, True])
def test_repetition_penalty_follows_keskar_et_al_over_prompt_and_output(decoder, favour_id_0):
  """Greedy with the penalty against recomputation applying the rule by hand: a logit of a token
  already in the row (prompt or output) is divided by the penalty if positive, else multiplied.
  With id 0 (the left padding of the shorter prompts) raised near the top, a pad taken for a
  prompt token would penalise it."""
  if favour_id_0:
    decoder = nnx.clone(decoder)
    decoder.output_bias = nnx.Param(jnp.zeros(24).at[0].set(FAVOUR_ID_0))
  penalty, steps = 1.3, 8
  penalised = generate(decoder, PROMPTS, DecodeConfig(max_new_tokens=steps, eos_id=-1, repetition_penalty=penalty))
  for prompt, out in zip(PROMPTS, penalised):
    tokens = list(prompt)
    for _ in range(steps):
      logits = np.asarray(full_forward(decoder, tokens)[-1])
      seen = np.isin(np.arange(logits.size), tokens)
      logits = np.where(seen, np.where(logits > 0, logits / penalty, logits * penalty), logits)
      tokens.append(int(np.argmax(logits)))
    assert out == tokens[len(prompt):]
  plain = generate(decoder, PROMPTS, DecodeConfig(max_new_tokens=steps, eos_id=-1))
  assert penalised != plain  # the penalty changed something to check
