"""Prefix language modelling (Raffel et al. 2020, §3.2.1; Liu et al. 2018): a decoder that
reads a prefix bidirectionally and predicts only the rest.

Each document piece (as in causal LM) is split at a uniformly random point s in [1, n-1]:
tokens [0, s) are the prefix (loss weight 0), tokens [s, n) the targets (loss weight 1).
`decoder_causal_attention` is True at decoder inputs 0..s (the start token and the
prefix), the positions that attend to each other bidirectionally, as in T5X's
PrefixLM feature converter: inputs [9 4 6] targets [3 9 1] give
decoder_input_tokens [0 9 4 6 3 9], decoder_causal_attention [1 1 1 1 0 0].
A piece of one token has no prefix.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from t5x_like.data.objectives.base import Example, Objective
from t5x_like.data.objectives.features import decoder_feature_names, decoder_features
from t5x_like.data.tokenizer import Tokenizer


def split_prefix(piece: np.ndarray, split: int) -> Example:
  """The example of a piece whose first `split` tokens are the prefix."""
  index = np.arange(len(piece))
  return {"targets": piece, "loss_weights": (index >= split).astype(np.float32),
          "causal_attention": (index <= split).astype(np.int32)}


class PrefixLM(Objective):

  model_inputs = ("decoder_causal_attention",)
  feature_names = decoder_feature_names() + model_inputs

  def __init__(self, tokenizer: Tokenizer, seq_len: int):
    super().__init__(tokenizer)
    self.lengths = {"targets": seq_len, "loss_weights": seq_len, "causal_attention": seq_len}

  def examples(self, record: Mapping[str, str], rng: np.random.Generator) -> list[Example]:
    pieces = self.document_chunks(record["text"], self.lengths["targets"])
    return [split_prefix(piece, int(rng.integers(1, len(piece))) if len(piece) > 1 else 0)
            for piece in pieces]

  def features(self, row: Example) -> dict[str, np.ndarray]:
    segment_ids = row["targets_segment_ids"]
    features = decoder_features(row["targets"], segment_ids, row["targets_positions"], row["loss_weights"])
    features["decoder_causal_attention"] = (row["causal_attention"] > 0) & (segment_ids > 0)
    return features
