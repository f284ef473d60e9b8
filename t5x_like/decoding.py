"""Decoding from decoders and encoder-decoders over the KV cache, each a compiled loop.

Prompts are left-padded so every row's next token lands in the same cache slot; the
padding has segment id 0 (never attended) and positions count from each row's first
real token, so a batch of prompts of different lengths decodes greedily or by beam search
exactly as each prompt would alone. Sampling draws one number per row and step from the
batch's key, so a prompt's samples depend on its row.

Strategies: greedy; sampling with temperature, top-k and top-p (Holtzman et al. 2020);
beam search with a length penalty (Wu et al. 2016, eq. 14). Greedy and sampling take an
optional repetition penalty (Keskar et al. 2019, sec. 4.1).

A model whose arrays span several processes (a run split over a pod's hosts) decodes on all
of them at once: each process calls `generate` with the same arguments (jit takes its host
values as replicated) and gets the same tokens back; no host gathers the model.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from models.config import ConfigError
from models.layers import row_max, row_sum
from t5x_like.data.tokenizer import EOS_ID, PAD_ID

NEG_INF = -1e30
NO_TOKEN = -1  # what greedy and sampling choose from a row of non-finite logits
# The loop computes in float32, whatever Python floats configure it: its smallest normal and largest values.
FLOAT32_TINY, FLOAT32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  strategy: str = "greedy"  # greedy | sample | beam
  max_new_tokens: int = 64
  eos_id: int = EOS_ID  # -1: none, every row runs to max_new_tokens
  pad_id: int = PAD_ID
  temperature: float = 1.0  # sample only
  top_k: int = 0  # sample only; 0: no top-k filter
  top_p: float = 1.0  # sample only; 1: no nucleus filter
  repetition_penalty: float = 1.0  # greedy and sample; 1: none
  num_beams: int = 4  # beam only
  length_penalty: float = 0.6  # beam only: alpha
  # Ids at or above it are never chosen: the tokenizer's size where model.vocab_size pads past
  # it (GPT-2's 50257 with an 8192-id tokenizer), or a decoder's first id its targets never hold
  # (samples.vocab_limit). 0: every id of the model.
  vocab_limit: int = 0
  # Ids below vocab_limit never chosen either: an encoder-decoder's mask, which sits below the
  # sentinels its targets hold (samples.excluded_ids).
  excluded_ids: tuple[int, ...] = ()
  # The prompt attends both ways, as a prefix LM (data.objective "prefix_lm") learned to read
  # its prefix; the new tokens attend causally, as its targets did.
  prefix_lm: bool = False

  def validate(self) -> None:
    if self.strategy not in ("greedy", "sample", "beam"):
      raise ConfigError(f"strategy={self.strategy!r} is not one of ('greedy', 'sample', 'beam')")
    if self.max_new_tokens <= 0:
      raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be positive")
    if not (_positive_float32(self.temperature) and self.top_k >= 0 and _positive_float32(self.top_p)
            and self.top_p <= 1):
      raise ConfigError(f"need temperature > 0, top_k >= 0 and 0 < top_p <= 1 (finite float32 values, in which "
                        f"anything below {FLOAT32_TINY:.3g} flushes to 0); got {self.temperature}, {self.top_k}, "
                        f"{self.top_p}")
    if self.vocab_limit < 0:
      raise ConfigError(f"vocab_limit={self.vocab_limit} must be at least 0 (0: every id)")
    if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0 for i in self.excluded_ids):
      raise ConfigError(f"excluded_ids={self.excluded_ids!r} must hold ids (integers), each at least 0")
    if not (_positive_float32(self.repetition_penalty) and self.num_beams >= 1
            and abs(self.length_penalty) <= FLOAT32_MAX):
      raise ConfigError(f"need repetition_penalty > 0 (in float32), num_beams >= 1 and a finite length_penalty; got "
                        f"{self.repetition_penalty}, {self.num_beams}, {self.length_penalty}")
    if self.strategy == "beam" and self.repetition_penalty != 1.0:
      raise ConfigError("repetition_penalty applies to greedy and sample decoding, not to beam search")


def _positive_float32(value: float) -> bool:
  """Whether `value` stays a positive normal float32, as the loop computes with it (NaN is not)."""
  return FLOAT32_TINY <= value <= FLOAT32_MAX


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> (left-padded [b, p] array, lengths [b])."""
  width = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, width - len(prompt):] = prompt
  return tokens, np.array([len(p) for p in prompts], np.int32)


# Logit filters -------------------------------------------------------------------------

def limit_vocab(logits: jax.Array, limit: int, excluded: tuple[int, ...] = ()) -> jax.Array:
  """logits [b, v] with the ids at or above limit (0: none) and the excluded ones at -inf."""
  vocab = logits.shape[-1]
  allowed = np.arange(vocab) < (limit or vocab)
  allowed[[i for i in excluded if i < vocab]] = False
  return logits if allowed.all() else jnp.where(allowed, logits, NEG_INF)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
  """Makes tokens already in the row less likely: positive logits / penalty, negative * penalty."""
  penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
  return jnp.where(seen, penalised, logits)


def filter_logits(logits: jax.Array, *, temperature, top_k, top_p,
                  filters: tuple[bool, bool] | None = None) -> jax.Array:
  """Scaled log-probabilities with everything outside top-k / the top-p nucleus at -inf.

  `filters` says which of (top-k, top-p) run, for values that are traced (a compiled loop's);
  by default, those whose values filter anything. Both filters keep the logits at or above a
  per-row threshold (ties with it stay):
  top-k's is the k-th largest logit; top-p's the largest logit whose tokens at or above it
  hold at least top_p of the mass, so the nucleus is the smallest prefix of the sorted
  tokens that reaches top_p.
  """
  # The row's largest logit is subtracted before scaling: a small temperature would otherwise make
  # logits past 1e10, and XLA's compiled log-softmax of those came out -inf everywhere.
  logits = logits.astype(jnp.float32)
  masked = logits <= NEG_INF  # limit_vocab's: kept out at any temperature, however high
  logits = jnp.where(masked, NEG_INF, (logits - row_max(logits, keepdims=True)) / temperature)
  use_top_k, use_top_p = filters or (top_k > 0, top_p < 1.0)
  if use_top_k:
    logits = _keep_at_least(logits, lambda kept: row_sum(kept.astype(jnp.int32)) >= top_k)
  if use_top_p:
    probs = jnp.exp(_log_softmax(logits))
    logits = _keep_at_least(logits, lambda kept: row_sum(jnp.where(kept, probs, 0.0)) >= top_p)
  return _log_softmax(logits)


def _log_softmax(logits: jax.Array) -> jax.Array:
  """jax.nn.log_softmax over the last axis through row_max and row_sum (models.layers)."""
  top = row_max(logits, keepdims=True)
  return logits - top - jnp.log(row_sum(jnp.exp(logits - top), keepdims=True))


def _keep_at_least(logits: jax.Array, enough) -> jax.Array:
  """logits, -inf below the largest threshold t per row for which enough(logits >= t) holds.

  `enough` must hold for the row's smallest logit and, as t grows, stop holding once. The
  threshold is found bit by bit over order-preserving integer keys of the floats: 32 passes
  over [b, v] where a sort would do. XLA:CPU sorts [8, 8192] in about 10 ms, four times a
  tiny decoder's whole step, and turns a top_k whose indices go unused into that sort
  (docs/performance.md, item 44).
  """
  bits = jax.lax.bitcast_convert_type(logits, jnp.uint32)
  keys = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))  # negatives reversed, below positives

  def next_bit(i, threshold):
    candidate = threshold | jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
    return jnp.where(enough(keys >= candidate[..., None]), candidate, threshold)

  threshold = jax.lax.fori_loop(0, 32, next_bit, jnp.zeros(logits.shape[:-1], jnp.uint32))
  return jnp.where(keys >= threshold[..., None], logits, NEG_INF)


def greedy_token(logits: jax.Array) -> jax.Array:
  """Per row of logits [b, v], the first token with the largest logit (jnp.argmax's choice), in two passes.

  XLA:CPU runs argmax as one reduction over (value, index) pairs in scalar code: 120 us for
  [8, 8192], 5% of a tiny decoder's step. A row maximum and then the smallest index that
  reaches it take 49 us. A row of NaNs reaches nothing, and a row whose largest logit is
  infinite picks by overflow, not by the model: NO_TOKEN, which `generate` reports.
  """
  vocab = logits.shape[-1]
  largest = row_max(logits, keepdims=True)
  first = jnp.min(jnp.where(logits == largest, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
  return jnp.where((first < vocab) & jnp.isfinite(largest[..., 0]), first, NO_TOKEN)


def sample(key: jax.Array, scores: jax.Array) -> jax.Array:
  """One token per row of log-probabilities scores [b, v], by inverting the cumulative distribution.

  One uniform per row, where jax.random.categorical draws a Gumbel per token: 1.1 ms for
  [8, 8192] on a CPU, against 2.5 for the rest of a tiny decoder's step.
  """
  probs = jnp.exp(scores)
  # 0 at every filtered token, so none passes u: XLA:CPU's cumsum sums in a tree, and its running
  # sum can step up by an ulp at a token of probability 0, where a count of cdf <= u picked it.
  cdf = jnp.where(probs > 0, jnp.cumsum(probs, axis=-1), 0.0)
  total = row_max(cdf)
  u = jnp.minimum(jax.random.uniform(key, total.shape) * total, jnp.nextafter(total, 0.0))
  vocab = scores.shape[-1]
  first = jnp.min(jnp.where(cdf > u[..., None], jnp.arange(vocab), vocab), axis=-1)  # the first to pass u
  return jnp.where(first < vocab, first, NO_TOKEN)  # none passes only in a row of NaNs


# The model side: one function per architecture to prefill and to step ---------------------

def _prefill(model, prompt, lengths, cache_len, encoder_inputs, prefix_lm):
  """Runs the prompt through the model; returns (last logits [b, v], cache)."""
  b, p = prompt.shape
  offset = p - lengths  # [b] pads before each prompt
  if encoder_inputs is not None:
    encoder_tokens, encoder_segment_ids = encoder_inputs
    encoded = model.encode(encoder_tokens, segment_ids=encoder_segment_ids)
    cache = model.init_cache(encoded, cache_len, encoded_segment_ids=encoder_segment_ids)
  else:
    cache = model.init_cache(b, cache_len)
  slots = jnp.arange(p)[None, :]
  segment_ids = (slots >= offset[:, None]).astype(jnp.int32)
  positions = jnp.maximum(slots - offset[:, None], 0)
  prefix = {"prefix_mask": segment_ids > 0} if prefix_lm else {}  # a decoder's only
  logits, cache = model.decode(prompt, cache, segment_ids=segment_ids, positions=positions, last_only=True, **prefix)
  return logits[:, -1], cache


def _step(model, tokens, positions, cache):
  """One token per row at the given positions -> (logits [b, v], cache)."""
  logits, cache = model.decode(tokens[:, None], cache, segment_ids=jnp.ones_like(tokens[:, None]),
                               positions=positions[:, None])
  return logits[:, 0], cache


# The compiled loops ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Loop:
  """What a decoding loop is compiled for: its strategy, its shapes and which filters run. The
  rest of a DecodeConfig (end and pad ids, temperature, filter thresholds, penalties) enters the
  loop traced (`_traced_values`), so that another temperature or length penalty reruns the
  compiled loop instead of compiling a new one."""
  strategy: str
  max_new_tokens: int
  num_beams: int
  vocab_limit: int
  excluded_ids: tuple[int, ...]
  prefix_lm: bool
  top_k: bool
  top_p: bool
  repetition_penalty: bool

  @classmethod
  def of(cls, config: DecodeConfig) -> _Loop:
    sampled, beam = config.strategy == "sample", config.strategy == "beam"
    return cls(config.strategy, config.max_new_tokens, config.num_beams if beam else 1, config.vocab_limit,
               tuple(int(i) for i in config.excluded_ids), config.prefix_lm, sampled and config.top_k > 0,
               sampled and config.top_p < 1.0, not beam and config.repetition_penalty != 1.0)


def _traced_values(config: DecodeConfig) -> dict[str, jax.Array]:
  """The fields `_Loop` leaves out, as arrays; a top_k past any vocabulary keeps every id, as int32 can hold."""
  floats = ("temperature", "top_p", "repetition_penalty", "length_penalty")
  return {"eos_id": jnp.int32(config.eos_id), "pad_id": jnp.int32(config.pad_id),
          "top_k": jnp.int32(min(config.top_k, np.iinfo(np.int32).max)),
          **{name: jnp.float32(getattr(config, name)) for name in floats}}


# Greedy and sampling ---------------------------------------------------------------------
# The loops change no state of the model: graph_updates=False, or nnx.jit hands its state back
# as outputs, a copy of every parameter each call (416 MB for a 109M-parameter decoder).

@functools.partial(nnx.jit, static_argnames=("loop",), graph_updates=False)
def _greedy_or_sample_loop(model, prompt, lengths, rng, encoder_inputs, values, *, loop: _Loop):
  b, p = prompt.shape
  vocab = model.config.vocab_size
  logits, cache = _prefill(model, prompt, lengths, p + loop.max_new_tokens, encoder_inputs, loop.prefix_lm)
  seen = jnp.zeros((b, vocab), bool)
  if loop.repetition_penalty:
    real = jnp.arange(p)[None, :] >= (p - lengths)[:, None]
    seen = seen.at[jnp.arange(b)[:, None], prompt].max(real)
  out = jnp.full((b, loop.max_new_tokens), values["pad_id"], jnp.int32)

  def cond(carry):
    i, _, _, _, done, _, _ = carry
    return (i < loop.max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, logits, cache, out, done, seen, rng = carry
    if loop.repetition_penalty:
      logits = apply_repetition_penalty(logits, seen, values["repetition_penalty"])
    logits = limit_vocab(logits, loop.vocab_limit, loop.excluded_ids)  # after the penalty, which would scale its -inf
    if loop.strategy == "greedy":
      token = greedy_token(logits)
    else:
      rng, key = jax.random.split(rng)
      scores = filter_logits(logits, temperature=values["temperature"], top_k=values["top_k"], top_p=values["top_p"],
                             filters=(loop.top_k, loop.top_p))
      token = sample(key, scores).astype(jnp.int32)
    token = jnp.where(done, values["pad_id"], token)
    out = out.at[:, i].set(token)
    seen = seen.at[jnp.arange(b), token].set(True)
    done = done | (token == values["eos_id"])
    logits, cache = _step(model, token, lengths + i, cache)
    return i + 1, logits, cache, out, done, seen, rng

  carry = (jnp.zeros((), jnp.int32), logits, cache, out, jnp.zeros(b, bool), seen, rng)
  return jax.lax.while_loop(cond, body, carry)[3]


# Beam search ----------------------------------------------------------------------------

def _length_penalty(length, alpha):
  return ((5.0 + length) / 6.0) ** alpha


@functools.partial(nnx.jit, static_argnames=("loop",), graph_updates=False)
def _beam_loop(model, prompt, lengths, encoder_inputs, values, *, loop: _Loop):
  """Keeps the num_beams best partial sequences per row; a finished sequence is scored
  log p / ((5 + length) / 6)^alpha and kept aside while live beams may still beat it."""
  b, p = prompt.shape
  k, steps, vocab = loop.num_beams, loop.max_new_tokens, model.config.vocab_size
  repeat = lambda x: jnp.repeat(x, k, axis=0)
  # Each row's beams start from its prompt: prefilled once, then copied (every cache array but
  # the index is batch-first).
  logits, cache = _prefill(model, prompt, lengths, p + steps, encoder_inputs, loop.prefix_lm)
  logits, cache = jax.tree.map(lambda x: repeat(x) if x.ndim else x, (logits, cache))
  own_rows = jnp.broadcast_to(jnp.arange(b * k)[:, None], (b * k, p + steps))
  cache = _with_rows(cache, own_rows)
  # Only the first copy of each row is live at the start, so beams do not duplicate.
  live_scores = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1)), (b, 1))  # [b, k]
  live_tokens = jnp.full((b, k, steps), values["pad_id"], jnp.int32)
  done_scores = jnp.full((b, k), NEG_INF)
  done_tokens = jnp.full((b, k, steps), values["pad_id"], jnp.int32)

  def body(i, carry):
    logits, cache, live_scores, live_tokens, done_scores, done_tokens, broken = carry
    broken = broken | ~jnp.all(jnp.isfinite(logits).reshape(b, -1), axis=1)  # as greedy's NO_TOKEN says
    log_probs = _log_softmax(limit_vocab(logits.astype(jnp.float32), loop.vocab_limit, loop.excluded_ids)
                             ).reshape(b, k, vocab)
    candidates = (live_scores[..., None] + log_probs).reshape(b, k * vocab)
    scores, flat = jax.lax.top_k(candidates, 2 * k)  # 2k: up to k of them may end here
    beam, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    tokens = jnp.take_along_axis(live_tokens, beam[..., None], axis=1).at[:, :, i].set(token)
    ended = token == values["eos_id"]
    # A candidate that ends counts as finished only if it is among the k best (as in Hugging
    # Face's beam search), so that one beam without a length penalty is exactly greedy decoding.
    # With alpha > 0 a beam still live at max_new_tokens is divided by a larger penalty and can
    # outrank one that ended early, as Wu et al.'s normalisation intends.
    finished = ended & (jnp.arange(2 * k) < k)[None, :]
    # Finished: merge with earlier finished sequences, keep the k best by penalised score.
    final = jnp.where(finished, scores / _length_penalty(i + 1.0, values["length_penalty"]), NEG_INF)
    all_scores = jnp.concatenate([done_scores, final], axis=1)
    all_tokens = jnp.concatenate([done_tokens, tokens], axis=1)
    best = jax.lax.top_k(all_scores, k)[1]
    done_scores = jnp.take_along_axis(all_scores, best, axis=1)
    done_tokens = jnp.take_along_axis(all_tokens, best[..., None], axis=1)
    # Live: the k best candidates that did not end.
    live_rank = jax.lax.top_k(jnp.where(ended, NEG_INF, scores), k)[1]
    new_scores = jnp.take_along_axis(scores, live_rank, axis=1)
    live_scores = jnp.where(jnp.take_along_axis(ended, live_rank, axis=1), NEG_INF, new_scores)
    live_tokens = jnp.take_along_axis(tokens, live_rank[..., None], axis=1)
    source = (jnp.arange(b)[:, None] * k + jnp.take_along_axis(beam, live_rank, axis=1)).reshape(-1)
    cache = _follow_beams(cache, source, own_rows, written=p + i)
    next_token = live_tokens[:, :, i].reshape(-1)
    logits, cache = _step(model, next_token, repeat(lengths) + i, cache)
    return logits, cache, live_scores, live_tokens, done_scores, done_tokens, broken

  carry = (logits, cache, live_scores, live_tokens, done_scores, done_tokens, jnp.zeros(b, bool))
  _, _, live_scores, live_tokens, done_scores, done_tokens, broken = jax.lax.fori_loop(0, steps, body, carry)
  # Beams still live at max_new_tokens compete with the finished ones at full length.
  live_final = live_scores / _length_penalty(float(steps), values["length_penalty"])
  all_scores = jnp.concatenate([done_scores, live_final], axis=1)
  all_tokens = jnp.concatenate([done_tokens, live_tokens], axis=1)
  best = jnp.take_along_axis(all_tokens, jnp.argmax(all_scores, axis=1)[:, None, None], axis=1)[:, 0]
  return jnp.where(broken[:, None], NO_TOKEN, best)


def _with_rows(cache, rows):
  """The cache with `rows` [b, s] as every self-attention layer's index (models.attention.heads_first_attention)."""
  layers = [dict(layer, self=dict(layer["self"], rows=rows)) for layer in cache["layers"]]
  return dict(cache, layers=layers)


def _follow_beams(cache, source, own_rows, written):
  """The cache as seen from the surviving beams: beam r continues beam source[r].

  Keys and values stay where they were written: slot s of beam r is read from row
  rows[r, s], so a beam takes over its parent's row index for the `written` slots and its
  own row for the ones it will write. Gathering the keys and values themselves was most of
  a step (docs/performance.md, item 46). Cross-attention keys are the same for every beam
  of a prompt, so they stay; the per-slot segment ids and positions are gathered.
  """
  rows = cache["layers"][0]["self"]["rows"]
  rows = jnp.where(jnp.arange(rows.shape[1])[None, :] < written, rows[source], own_rows)
  gather = lambda x: x[source] if x.ndim >= 1 else x  # noqa: E731
  rest = jax.tree.map(gather, {key: value for key, value in cache.items() if key != "layers"})
  return _with_rows(dict(cache, **rest), rows)


# Entry point ---------------------------------------------------------------------------

def _check_cache_fits(cfg, rows: int, length: int, encoder_length: int = 0) -> None:
  """Refuses a KV cache larger than the memory there is, which XLA would fail to allocate with a
  traceback (or, where the kernel overcommits, the OOM killer would end with no message). An
  encoder-decoder's decoder layers also keep the encoder input's cross-attention keys."""
  if jax.default_backend() == "cpu":  # the devices share the host's memory; the cache is float32 there
    memory, itemsize = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), 4
  else:
    memory = sum((device.memory_stats() or {}).get("bytes_limit", 0) for device in jax.local_devices())
    itemsize = jnp.dtype(cfg.compute_dtype).itemsize
  needed = 2 * rows * (length + encoder_length) * cfg.decoder_layers * cfg.kv_heads * cfg.dim_per_head * itemsize
  if memory and needed > memory:
    encoder = f" and {encoder_length} encoder tokens" if encoder_length else ""
    raise ConfigError(f"the KV cache of {rows} rows (prompts x beams) of {length} tokens (the longest prompt plus "
                      f"max_new_tokens){encoder} needs {needed / 2**30:.3g} GiB, more than the "
                      f"{memory / 2**30:.3g} GiB of memory here; lower max_new_tokens, num_beams or the number of "
                      f"prompts")


def _check_ids(vocab: int, limit: int, prompts, encoder_inputs, config: DecodeConfig) -> None:
  """Refuses ids the model has no embedding for (jnp.take reads them as NaN rows, which attention
  spreads to every row padded with them), an EOS no step can choose, and empty inputs (a row
  whose queries see no key)."""
  if len(prompts) == 0:
    raise ConfigError("no prompts to decode")
  if not 0 <= config.pad_id < vocab:
    raise ConfigError(f"pad_id={config.pad_id} is not an id of the model's vocabulary [0, {vocab})")
  if config.eos_id != -1 and (not 0 <= config.eos_id < limit or config.eos_id in config.excluded_ids):
    raise ConfigError(f"eos_id={config.eos_id} is not among the ids a step can choose (below {limit}, not "
                      f"excluded), so no row would end at it; -1 decodes every row to max_new_tokens")
  for name, rows in (("prompt", prompts), ("encoder input", [] if encoder_inputs is None else encoder_inputs)):
    for row, ids in enumerate(rows):
      ids = np.asarray(ids, np.int64)
      if not ids.size:
        raise ConfigError(f"{name} {row} is empty; give it at least one token (a start token)")
      outside = ids[(ids < 0) | (ids >= vocab)]
      if outside.size:
        raise ConfigError(f"{name} {row} holds ids outside the model's vocabulary [0, {vocab}): "
                          f"{np.unique(outside)[:5].tolist()}")


def fetched(array: jax.Array) -> np.ndarray:
  """An output's whole value on every process: one split over processes (logits whose vocabulary
  a tensor axis across hosts holds) is gathered, as np.asarray cannot read it."""
  if array.is_fully_addressable or array.is_fully_replicated:
    return np.asarray(array)
  return multihost_utils.process_allgather(array, tiled=True)


def check_eval_mode(model) -> None:
  """Refuses a model with dropout on (an nnx.Dropout of rate > 0 not deterministic): it would
  make tokens and scores random, and a compiled decoding loop cannot advance its random streams
  (flax raised TraceContextError, 'Cannot mutate RngCount')."""
  if any(isinstance(m, nnx.Dropout) and m.rate > 0 and not m.deterministic for _, m in nnx.iter_modules(model)):
    raise ConfigError("the model is in training mode, with dropout on: call model.eval() before decoding or "
                      "scoring with it")


def generate(model, prompts: list[list[int]], config: DecodeConfig, *, seed: int = 0,
             encoder_inputs: list[list[int]] | None = None) -> list[list[int]]:
  """Continues each prompt (for an encoder-decoder: decodes each encoder input, starting from
  the prompt, usually [pad_id]); returns the new tokens up to and including EOS."""
  config.validate()
  check_eval_mode(model)
  if config.prefix_lm and model.config.arch != "decoder":
    raise ConfigError(f"prefix_lm decoding needs a decoder, not model.arch={model.config.arch!r}")
  limit = min(config.vocab_limit or model.config.vocab_size, model.config.vocab_size)
  ids = limit - len({i for i in config.excluded_ids if i < limit})
  if config.strategy == "beam" and config.num_beams > ids:  # the beams would hold -inf candidates
    raise ConfigError(f"num_beams={config.num_beams} exceeds the {ids} ids a step can choose from")
  if (encoder_inputs is not None) != (model.config.arch == "encoder_decoder"):
    raise ConfigError(f"encoder_inputs go with an encoder-decoder, and it needs them; model.arch="
                      f"{model.config.arch!r}, encoder_inputs {'given' if encoder_inputs is not None else 'not given'}")
  if encoder_inputs is not None and len(encoder_inputs) != len(prompts):
    raise ConfigError(f"{len(prompts)} decoder prompts for {len(encoder_inputs)} encoder inputs; give one each")
  _check_ids(model.config.vocab_size, limit, prompts, encoder_inputs, config)
  tokens, lengths = left_pad(prompts, config.pad_id)
  model.config.check_length(tokens.shape[1] + config.max_new_tokens, "the longest prompt plus max_new_tokens:")
  _check_cache_fits(model.config, len(prompts) * (config.num_beams if config.strategy == "beam" else 1),
                    tokens.shape[1] + config.max_new_tokens,
                    0 if encoder_inputs is None else max(map(len, encoder_inputs)))
  encoder = None
  if encoder_inputs is not None:
    width = max(len(e) for e in encoder_inputs)
    model.config.check_length(width, "the longest encoder input:")
    encoder_tokens = np.full((len(encoder_inputs), width), config.pad_id, np.int32)
    for row, e in enumerate(encoder_inputs):
      encoder_tokens[row, :len(e)] = e
    real = np.arange(width)[None, :] < np.array([len(e) for e in encoder_inputs])[:, None]
    encoder = (jnp.asarray(encoder_tokens), jnp.asarray(real, jnp.int32))
  loop, values = _Loop.of(config), _traced_values(config)
  if config.strategy == "beam":
    out = _beam_loop(model, jnp.asarray(tokens), jnp.asarray(lengths), encoder, values, loop=loop)
  else:
    out = _greedy_or_sample_loop(model, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed), encoder,
                                 values, loop=loop)
  out = fetched(out)
  if (out == NO_TOKEN).any():
    raise ConfigError("the model's logits were not finite (NaN or infinite) at a decoding step: its weights or "
                      "inputs are broken")
  results = []
  for row in out.tolist():
    if config.eos_id in row:
      row = row[:row.index(config.eos_id) + 1]
    results.append(row)
  return results
