"""Cross-entropy sums against a numpy reference, z-loss included."""

import numpy as np
import pytest

from models.losses import cross_entropy_sums


def test_sums_match_numpy_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 7, size=(2, 5))
  weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
  sums = cross_entropy_sums(logits, targets, weights, z_loss=1e-2)
  log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  assert float(sums["cross_entropy"]) == pytest.approx(float((nll * weights).sum()), rel=1e-5)
  assert float(sums["z_loss"]) == pytest.approx(float((1e-2 * log_z**2 * weights).sum()), rel=1e-5)
  assert float(sums["loss"]) == pytest.approx(float(sums["cross_entropy"] + sums["z_loss"]), rel=1e-6)
  assert float(sums["correct"]) == float(((logits.argmax(-1) == targets) * weights).sum())
  assert float(sums["weight"]) == float(weights.sum())


def test_uniform_logits_give_log_vocab():
  sums = cross_entropy_sums(np.zeros((1, 3, 10), np.float32), np.zeros((1, 3), int), np.ones((1, 3)))
  assert float(sums["cross_entropy"]) / 3 == pytest.approx(np.log(10))


def test_correct_counts_the_target_at_the_row_maximum_ties_included():
  logits = np.array([[[0.0, 2.0, 1.0], [3.0, 3.0, 0.0], [1.0, 0.0, 5.0]]], np.float32)
  targets = np.array([[1, 1, 0]])  # the top; tied for the top; below the top
  sums = cross_entropy_sums(logits, targets, np.ones((1, 3), np.float32))
  assert float(sums["correct"]) == 2.0
