"""Causal language modelling (GPT; Radford et al. 2018): predict every token from those before it.

Each document ends with eos and is cut into pieces of at most `seq_len` tokens; pieces of
several documents share a row when packed, kept apart by segment ids. Every target token
has loss weight 1, and the decoder input is the target shifted right within its segment.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from t5x_like.data.objectives.base import Example, Objective
from t5x_like.data.objectives.features import decoder_feature_names, decoder_features
from t5x_like.data.tokenizer import Tokenizer


class CausalLM(Objective):

  feature_names = decoder_feature_names()

  def __init__(self, tokenizer: Tokenizer, seq_len: int):
    super().__init__(tokenizer)
    self.lengths = {"targets": seq_len}

  def examples(self, record: Mapping[str, str], rng: np.random.Generator) -> list[Example]:
    del rng  # deterministic
    return [{"targets": piece} for piece in self.document_chunks(record["text"], self.lengths["targets"])]

  def features(self, row: Example) -> dict[str, np.ndarray]:
    return decoder_features(row["targets"], row["targets_segment_ids"], row["targets_positions"])
