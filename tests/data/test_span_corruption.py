"""T5 span corruption: the noise mask's statistics, sentinels, and exact reconstruction."""

import numpy as np
import pytest

from models.config import ConfigError
from t5x_like.data.objectives.span_corruption import (
    SpanCorruption, corrupt, corrupted_lengths, random_spans_noise_mask, span_counts, tokens_length_for)
from t5x_like.data.tokenizer import EOS_ID

SENTINEL_0 = 8191


def reconstruct(inputs: np.ndarray, targets: np.ndarray) -> list[int]:
  """The original tokens: each sentinel in the inputs replaced by its span from the targets."""
  spans, current = {}, None
  for token in targets[:-1].tolist():
    if token > SENTINEL_0 - 100:
      current = spans.setdefault(token, [])
    else:
      current.append(token)
  out = []
  for token in inputs[:-1].tolist():
    out.extend(spans.get(token, []) if token > SENTINEL_0 - 100 else [token])
  return out


def test_t5_lengths():
  """T5's random_spans_helper: 568 tokens give 512 inputs and 114 targets."""
  assert tokens_length_for(512, 0.15, 3.0) == 568
  assert corrupted_lengths(568, 0.15, 3.0) == (512, 114)
  assert tokens_length_for(256, 0.15, 3.0) == 284 and corrupted_lengths(284, 0.15, 3.0) == (256, 58)
  # T5 rounds both counts to the nearest: 74 tokens give round(11.1) = 11 noise tokens in
  # round(11 / 3) = 4 spans; 10 tokens give round(1.5) = 2 noise tokens in 1 span.
  assert span_counts(74, 0.15, 3.0) == (11, 4) and span_counts(10, 0.15, 3.0) == (2, 1)


def test_hand_worked_example():
  tokens = np.array([10, 11, 12, 13, 14, 15, 16])  # a b c d e f g
  mask = np.array([0, 0, 1, 1, 0, 0, 1], bool)  # noise at c d and g
  example = corrupt(tokens, mask, SENTINEL_0)
  assert example["inputs"].tolist() == [10, 11, SENTINEL_0, 14, 15, SENTINEL_0 - 1, EOS_ID]
  assert example["targets"].tolist() == [SENTINEL_0, 12, 13, SENTINEL_0 - 1, 16, EOS_ID]
  assert reconstruct(example["inputs"], example["targets"]) == tokens.tolist()


def test_noise_density_and_mean_span_length_over_many_samples():
  rng = np.random.default_rng(0)
  noise = spans = total = 0
  span_lengths = []
  for length in rng.integers(40, 600, size=300):
    mask = random_spans_noise_mask(int(length), 0.15, 3.0, rng)
    assert len(mask) == length and not mask[0] and mask[-1]  # non-noise first, noise last
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    ends = np.flatnonzero(mask & ~np.concatenate([mask[1:], [False]]))
    span_lengths.extend(ends - starts + 1)
    noise, spans, total = noise + mask.sum(), spans + len(starts), total + length
  assert noise / total == pytest.approx(0.15, abs=0.003)
  assert noise / spans == pytest.approx(3.0, abs=0.1)
  assert min(span_lengths) == 1 and max(span_lengths) > 6  # random lengths, not all 3


def test_short_pieces():
  rng = np.random.default_rng(1)
  assert random_spans_noise_mask(1, 0.15, 3.0, rng).tolist() == [False]
  assert random_spans_noise_mask(2, 0.15, 3.0, rng).tolist() == [False, True]


def test_inputs_and_targets_reconstruct_the_original(tokenizer):
  objective = SpanCorruption(tokenizer, 32, 8, 0.15, 3.0)
  text = ("It is a truth universally acknowledged, that a single man in possession of a good "
          "fortune, must be in want of a wife. However little known the feelings or views of such "
          "a man may be on his first entering a neighbourhood, this truth is so well fixed.")
  rng = np.random.default_rng(2)
  for _ in range(50):
    examples = objective.examples({"text": text}, rng)
    assert len(examples) > 1  # longer than one piece of objective.tokens_length
    original = [t for e in examples for t in reconstruct(e["inputs"], e["targets"])]
    assert tokenizer.decode(original) == text
    assert all(len(e["inputs"]) <= 32 and len(e["targets"]) <= 8 for e in examples)
  assert objective.counts.snapshot()["split_documents"] == 50


def test_features_feed_encoder_and_decoder(tokenizer):
  objective = SpanCorruption(tokenizer, 16, 8, 0.15, 3.0)
  row = {"inputs": np.array([10, 11, SENTINEL_0, 1, 0]), "inputs_segment_ids": np.array([1, 1, 1, 1, 0]),
         "inputs_positions": np.array([0, 1, 2, 3, 0]), "targets": np.array([SENTINEL_0, 12, 1, 0]),
         "targets_segment_ids": np.array([1, 1, 1, 0]), "targets_positions": np.array([0, 1, 2, 0])}
  features = objective.features(row)
  np.testing.assert_array_equal(features["encoder_input_tokens"], row["inputs"])
  np.testing.assert_array_equal(features["decoder_input_tokens"], [0, SENTINEL_0, 12, 0])
  np.testing.assert_array_equal(features["decoder_loss_weights"], [1, 1, 1, 0])


def test_lengths_that_cannot_work_name_the_field(tokenizer):
  with pytest.raises(ConfigError, match=r"data.target_len=100 is too short for span corruption of "
                                        r"data.input_len=512: the targets need 114"):
    SpanCorruption(tokenizer, 512, 100, 0.15, 3.0)
  with pytest.raises(ConfigError, match=r"data.input_len=4096 makes 227 spans but the vocabulary has 100"):
    SpanCorruption(tokenizer, 4096, 2048, 0.15, 3.0)
  with pytest.raises(ConfigError, match=r"data.input_len=1 leaves no room for text beside its eos; make it at least 2"):
    SpanCorruption(tokenizer, 1, 8, 0.15, 3.0)
  SpanCorruption(tokenizer, 2, 8, 0.15, 3.0)


def test_an_empty_document_gives_no_example_and_is_counted(tokenizer):
  objective = SpanCorruption(tokenizer, 32, 8, 0.15, 3.0)
  assert objective.examples({"text": ""}, np.random.default_rng(0)) == []
  assert objective.counts.snapshot() == {"documents": 1, "chunks": 0, "split_documents": 0, "empty_documents": 1}
