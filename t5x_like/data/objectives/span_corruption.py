"""Span corruption (T5; Raffel et al. 2020, §3.1.4): an encoder-decoder restores dropped spans.

A document (no eos) is cut into pieces of `tokens_length` tokens, the longest whose
corrupted inputs fit `input_len` (T5's random_spans_helper: 568 tokens for 512 inputs
and 114 targets). In each piece round(n * noise_density) noise tokens form
round(noise / mean_noise_span_length) spans, at random places (T5's
random_spans_noise_mask, rewritten in numpy). Spans alternate with non-noise runs,
starting with non-noise. The inputs keep the non-noise tokens and replace span i by
sentinel i; the targets list sentinel i before the tokens of span i; both end with eos:

  tokens   [a b c d e f g]  noise at c d and g
  inputs   [a b <0> e f <1> eos]
  targets  [<0> c d <1> g eos]
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from models.config import ConfigError
from t5x_like.data.objectives.base import Example, Objective
from t5x_like.data.objectives.features import decoder_feature_names, decoder_features
from t5x_like.data.tokenizer import EOS_ID, NUM_SENTINELS, Tokenizer


def span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of a piece of `length` tokens, as in T5: at least one of
  each, at least one non-noise token, and here also never more spans than non-noise tokens."""
  length = max(length, 2)
  noise = min(max(int(round(length * noise_density)), 1), length - 1)
  spans = min(max(int(round(noise / mean_noise_span_length)), 1), length - noise)
  return noise, spans


def corrupted_lengths(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
  """(inputs, targets) lengths of a corrupted piece: a sentinel per span and eos on each."""
  noise, spans = span_counts(length, noise_density, mean_noise_span_length)
  return length - noise + spans + 1, noise + spans + 1


def tokens_length_for(input_len: int, noise_density: float, mean_noise_span_length: float) -> int:
  """The longest piece whose corrupted inputs fit input_len (T5's random_spans_helper)."""
  length = input_len - 1
  while corrupted_lengths(length + 1, noise_density, mean_noise_span_length)[0] <= input_len:
    length += 1
  return length


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """Lengths of num_segments non-empty runs that split num_items, uniformly at random."""
  first_in_segment = np.zeros(num_items, bool)
  first_in_segment[1 + rng.permutation(num_items - 1)[:num_segments - 1]] = True
  return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
  """Boolean mask [length], True on noise; runs alternate non-noise, noise."""
  padded_length = max(length, 2)  # T5 avoids the degenerate one-token case the same way
  noise, spans = span_counts(length, noise_density, mean_noise_span_length)
  noise_lengths = _random_segmentation(noise, spans, rng)
  nonnoise_lengths = _random_segmentation(padded_length - noise, spans, rng)
  run_lengths = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
  run_starts = np.cumsum(run_lengths)[:-1]
  run_index = np.zeros(padded_length, np.int64)
  run_index[run_starts] = 1
  return (np.cumsum(run_index) % 2 == 1)[:length]


def replace_spans(tokens: np.ndarray, noise_mask: np.ndarray, first_sentinel_id: int) -> np.ndarray:
  """Each run of masked tokens becomes one sentinel: first_sentinel_id, then one less, ..."""
  previous = np.concatenate([[False], noise_mask[:-1]])
  first = noise_mask & ~previous
  sentinels = first_sentinel_id + 1 - np.cumsum(first)
  return np.where(first, sentinels, tokens)[~(noise_mask & previous)].astype(np.int32)


def corrupt(tokens: np.ndarray, noise_mask: np.ndarray, first_sentinel_id: int) -> Example:
  eos = np.array([EOS_ID], np.int32)
  return {"inputs": np.concatenate([replace_spans(tokens, noise_mask, first_sentinel_id), eos]),
          "targets": np.concatenate([replace_spans(tokens, ~noise_mask, first_sentinel_id), eos])}


class SpanCorruption(Objective):

  architectures = ("encoder_decoder",)
  config_fields = ("input_len", "target_len", "noise_density", "mean_noise_span_length")
  feature_names = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions") + decoder_feature_names()

  def __init__(self, tokenizer: Tokenizer, input_len: int, target_len: int,
               noise_density: float, mean_noise_span_length: float):
    super().__init__(tokenizer)
    self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
    self.tokens_length = tokens_length_for(input_len, noise_density, mean_noise_span_length)
    if self.tokens_length < 1:
      raise ConfigError(f"data.input_len={input_len} leaves no room for text beside its eos; "
                        f"make it at least 2")
    needed_targets = corrupted_lengths(self.tokens_length, noise_density, mean_noise_span_length)[1]
    if needed_targets > target_len:
      raise ConfigError(f"data.target_len={target_len} is too short for span corruption of "
                        f"data.input_len={input_len}: the targets need {needed_targets}")
    spans = span_counts(self.tokens_length, noise_density, mean_noise_span_length)[1]
    if spans > NUM_SENTINELS:
      raise ConfigError(f"span corruption of data.input_len={input_len} makes {spans} spans but "
                        f"the vocabulary has {NUM_SENTINELS} sentinels; lower data.input_len or "
                        f"raise data.mean_noise_span_length")
    self.lengths = {"inputs": input_len, "targets": target_len}

  def examples(self, record: Mapping[str, str], rng: np.random.Generator) -> list[Example]:
    return [corrupt(piece, random_spans_noise_mask(len(piece), self.noise_density,
                                                   self.mean_noise_span_length, rng),
                    self.tokenizer.sentinel_id(0))
            for piece in self.document_chunks(record["text"], self.tokens_length, eos=False)]

  def features(self, row: Example) -> dict[str, np.ndarray]:
    return {
        "encoder_input_tokens": row["inputs"].astype(np.int32),
        "encoder_segment_ids": row["inputs_segment_ids"],
        "encoder_positions": row["inputs_positions"],
        **decoder_features(row["targets"], row["targets_segment_ids"], row["targets_positions"]),
    }
