"""Preference pairs for reward models (Ouyang et al. 2022, eq. 1) and DPO (Rafailov et al. 2023, eq. 7).

A record's prompt with its chosen and with its rejected response become two sequences,
each built as in sft.py (loss weights mark the response; truncation is counted), side by
side in one row: `chosen_decoder_*` and `rejected_decoder_*` features. A reward model
scores the last weighted token of each; DPO sums the weighted log-probabilities. Pairs
are never packed, one pair per row.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from t5x_like.data.objectives.base import Example, Objective
from t5x_like.data.objectives.features import decoder_features
from t5x_like.data.objectives.sft import prompt_response_example
from t5x_like.data.tokenizer import Tokenizer

SIDES = ("chosen", "rejected")


class PreferencePairs(Objective):

  fields = ("prompt", "chosen", "rejected")

  def __init__(self, tokenizer: Tokenizer, seq_len: int):
    super().__init__(tokenizer)
    self.lengths = {f"{side}{suffix}": seq_len for side in SIDES for suffix in ("", "_loss_weights")}

  def examples(self, record: Mapping[str, str], rng: np.random.Generator) -> list[Example]:
    del rng  # deterministic
    self.counts.add(documents=1)
    example = {}
    for side in SIDES:
      sequence = prompt_response_example(self.tokenizer, record["prompt"], record[side],
                                         self.lengths[side], self.counts)
      example[side], example[f"{side}_loss_weights"] = sequence["targets"], sequence["loss_weights"]
    return [example]

  def features(self, row: Example) -> dict[str, np.ndarray]:
    features = {}
    for side in SIDES:
      features.update(decoder_features(row[side], row[f"{side}_segment_ids"], row[f"{side}_positions"],
                                       row[f"{side}_loss_weights"], prefix=f"{side}_decoder"))
    return features
