"""Prefix LM: a random split into a bidirectional prefix and targets, loss on targets only."""

import numpy as np
import scipy.stats

from t5x_like.data.objectives.prefix_lm import PrefixLM, split_prefix


def _row(example):
  n = len(example["targets"])
  row = dict(example)
  for name in example:
    row[f"{name}_segment_ids"], row[f"{name}_positions"] = np.ones(n, np.int32), np.arange(n)
  return row


def test_t5x_worked_example(tokenizer):
  """T5X's PrefixLM converter: inputs [9 4 6], targets [3 9 1]."""
  features = PrefixLM(tokenizer, 6).features(_row(split_prefix(np.array([9, 4, 6, 3, 9, 1]), 3)))
  np.testing.assert_array_equal(features["decoder_target_tokens"], [9, 4, 6, 3, 9, 1])
  np.testing.assert_array_equal(features["decoder_input_tokens"], [0, 9, 4, 6, 3, 9])
  np.testing.assert_array_equal(features["decoder_loss_weights"], [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(features["decoder_causal_attention"], [1, 1, 1, 1, 0, 0])
  assert features["decoder_causal_attention"].dtype == bool


def test_packed_rows_keep_each_prefix_in_its_segment(tokenizer):
  row = {"targets": np.array([5, 6, 7, 8, 9, 0]),
         "loss_weights": np.array([0, 1, 1, 0, 1, 0], np.float32),
         "causal_attention": np.array([1, 1, 0, 1, 1, 0]),
         "targets_segment_ids": np.array([1, 1, 1, 2, 2, 0]),
         "targets_positions": np.array([0, 1, 2, 0, 1, 0])}
  features = PrefixLM(tokenizer, 6).features(row)
  np.testing.assert_array_equal(features["decoder_input_tokens"], [0, 5, 6, 0, 8, 0])
  np.testing.assert_array_equal(features["decoder_causal_attention"], [1, 1, 0, 1, 1, 0])
  np.testing.assert_array_equal(features["decoder_loss_weights"], [0, 1, 1, 0, 1, 0])


def test_split_points_are_uniform_and_loss_covers_only_targets(tokenizer):
  objective = PrefixLM(tokenizer, 512)
  text = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition."
  ids = tokenizer.encode(text)
  rng = np.random.default_rng(0)
  splits = []
  for _ in range(400):
    (example,) = objective.examples({"text": text}, rng)
    split = int(np.argmax(example["loss_weights"]))
    splits.append(split)
    np.testing.assert_array_equal(example["targets"][:-1], ids)
    np.testing.assert_array_equal(example["loss_weights"], np.arange(len(ids) + 1) >= split)
    np.testing.assert_array_equal(example["causal_attention"], np.arange(len(ids) + 1) <= split)
  # Uniform over [1, n-1] of the n tokens with eos: Pearson's test of the counts (a seeded draw).
  counts = np.bincount(splits, minlength=len(ids) + 1)
  assert counts[0] == 0 and len(counts) == len(ids) + 1
  assert scipy.stats.chisquare(counts[1:]).pvalue > 1e-3
