"""Steps the objectives share: chunking, T5X's shifted decoder inputs, padding one example per row.

Conventions (T5X): segment id 0 is padding and 1, 2, ... number the examples packed in a
row; positions restart at 0 in each example; token 0 (pad) starts every decoder input.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def chunks(ids: np.ndarray, length: int) -> list[np.ndarray]:
  """Consecutive pieces of at most `length` ids, every id in exactly one piece."""
  return [ids[start:start + length] for start in range(0, len(ids), length)]


def autoregressive_inputs(targets: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
  """Targets shifted right by one within each segment, 0 at each segment's start (T5X)."""
  shifted = np.zeros_like(targets)
  shifted[..., 1:] = targets[..., :-1]
  previous_segment = np.zeros_like(segment_ids)
  previous_segment[..., 1:] = segment_ids[..., :-1]
  return np.where(segment_ids == previous_segment, shifted, 0).astype(targets.dtype)


DECODER_FEATURES = ("target_tokens", "input_tokens", "segment_ids", "positions", "loss_weights")


def decoder_feature_names(prefix: str = "decoder") -> tuple[str, ...]:
  """The names of the features decoder_features makes."""
  return tuple(f"{prefix}_{name}" for name in DECODER_FEATURES)


def decoder_features(targets: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray,
                     loss_weights: np.ndarray | None = None,
                     prefix: str = "decoder") -> dict[str, np.ndarray]:
  """A decoder's features from a row of targets; loss on real tokens times `loss_weights`."""
  weights = (segment_ids > 0).astype(np.float32)
  if loss_weights is not None:
    weights *= loss_weights
  return {
      f"{prefix}_target_tokens": targets.astype(np.int32),
      f"{prefix}_input_tokens": autoregressive_inputs(targets, segment_ids).astype(np.int32),
      f"{prefix}_segment_ids": segment_ids.astype(np.int32),
      f"{prefix}_positions": positions.astype(np.int32),
      f"{prefix}_loss_weights": weights,
  }


def pad_example(example: Mapping[str, np.ndarray], lengths: Mapping[str, int]) -> dict[str, np.ndarray]:
  """One example per row, zero-padded, with the keys grain's packer writes."""
  row = {}
  for name, length in lengths.items():
    values = np.asarray(example[name])
    if len(values) > length:
      raise ValueError(f"example feature {name!r} has {len(values)} ids, more than its row of {length}")
    real = np.arange(length) < len(values)
    row[name] = np.zeros(length, values.dtype)
    row[name][:len(values)] = values
    row[f"{name}_segment_ids"] = real.astype(np.int32)
    row[f"{name}_positions"] = np.where(real, np.arange(length), 0).astype(np.int32)
  return row
