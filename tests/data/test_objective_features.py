"""Shared objective steps against hand-worked rows."""

import numpy as np
import pytest

from t5x_like.data.objectives.features import autoregressive_inputs, chunks, decoder_features, pad_example


def test_chunks_cover_every_id_once():
  ids = np.arange(10)
  assert [c.tolist() for c in chunks(ids, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  assert [c.tolist() for c in chunks(ids, 10)] == [list(range(10))]
  assert chunks(ids[:0], 4) == []


def test_autoregressive_inputs_restart_at_each_segment():
  targets = np.array([[5, 6, 7, 8, 9, 4, 0, 0]])
  segments = np.array([[1, 1, 1, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(autoregressive_inputs(targets, segments), [[0, 5, 6, 0, 8, 0, 0, 0]])


def test_decoder_features_weight_real_tokens_times_given_weights():
  targets = np.array([5, 6, 7, 8, 0])
  segments = np.array([1, 1, 2, 2, 0])
  positions = np.array([0, 1, 0, 1, 0])
  features = decoder_features(targets, segments, positions, np.array([0, 1, 1, 1, 1], np.float32))
  np.testing.assert_array_equal(features["decoder_input_tokens"], [0, 5, 0, 7, 0])
  np.testing.assert_array_equal(features["decoder_loss_weights"], [0, 1, 1, 1, 0])
  assert features["decoder_loss_weights"].dtype == np.float32
  for name in ("target_tokens", "input_tokens", "segment_ids", "positions"):
    assert features[f"decoder_{name}"].dtype == np.int32
  assert set(decoder_features(targets, segments, positions, prefix="chosen_decoder")) == {
      "chosen_decoder_target_tokens", "chosen_decoder_input_tokens", "chosen_decoder_segment_ids",
      "chosen_decoder_positions", "chosen_decoder_loss_weights"}


def test_pad_example_writes_the_packers_keys():
  row = pad_example({"targets": np.array([4, 5, 6], np.int32)}, {"targets": 5})
  np.testing.assert_array_equal(row["targets"], [4, 5, 6, 0, 0])
  np.testing.assert_array_equal(row["targets_segment_ids"], [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(row["targets_positions"], [0, 1, 2, 0, 0])
  with pytest.raises(ValueError, match="'targets' has 3 ids, more than its row of 2"):
    pad_example({"targets": np.array([4, 5, 6])}, {"targets": 2})
