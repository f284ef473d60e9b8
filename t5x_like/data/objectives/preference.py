"""Preference pairs for reward models (Ouyang et al. 2022, eq. 1) and DPO (Rafailov et al. 2023, eq. 7).

A record's prompt with its chosen and with its rejected response become two sequences,
each built as in sft.py (loss weights mark the response; truncation is counted), side by
side in one row: `chosen_decoder_*` and `rejected_decoder_*` features. A pair too long for
the row keeps the same end of the prompt on both sides, as much as the longer response
leaves, so that the two responses are compared after the same prompt. A reward model
scores the last weighted token of each; DPO sums the weighted log-probabilities. Pairs
are never packed, one pair per row. A pair whose two responses are the same as kept (equal
in the record, or cut to a shared start) prefers nothing, so it is dropped and counted as
`tied_pairs`: it gave DPO no gradient and the reward model a tie to score.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from t5x_like.data.objectives.base import Example, Objective
from t5x_like.data.objectives.features import decoder_feature_names, decoder_features
from t5x_like.data.objectives.sft import fit_pair, prompt_response_sequence, response_ids
from t5x_like.data.tokenizer import Tokenizer

SIDES = ("chosen", "rejected")


class PreferencePairs(Objective):

  fields = ("prompt", "chosen", "rejected")
  feature_names = decoder_feature_names("chosen_decoder") + decoder_feature_names("rejected_decoder")

  def __init__(self, tokenizer: Tokenizer, seq_len: int):
    super().__init__(tokenizer)
    self.lengths = {f"{side}{suffix}": seq_len for side in SIDES for suffix in ("", "_loss_weights")}

  def examples(self, record: Mapping[str, str], rng: np.random.Generator) -> list[Example]:
    del rng  # deterministic
    self.counts.add(documents=1)
    length = self.lengths["chosen"]
    prompt = self.tokenizer.encode(record["prompt"])
    responses = {side: response_ids(self.tokenizer, record[side]) for side in SIDES}
    kept_prompt, _ = fit_pair(prompt, max(responses.values(), key=len), length)
    kept = {side: response[:length - len(kept_prompt)] for side, response in responses.items()}
    if np.array_equal(kept["chosen"], kept["rejected"]):
      self.counts.add(tied_pairs=1)
      return []
    example = {}
    for side, response in kept.items():
      sequence = prompt_response_sequence(kept_prompt, response)
      example[side], example[f"{side}_loss_weights"] = sequence["targets"], sequence["loss_weights"]
    truncated = len(kept_prompt) < len(prompt) or any(len(kept[s]) < len(responses[s]) for s in SIDES)
    self.counts.add(truncated=int(truncated))
    return [example]

  def features(self, row: Example) -> dict[str, np.ndarray]:
    features = {}
    for side in SIDES:
      features.update(decoder_features(row[side], row[f"{side}_segment_ids"], row[f"{side}_positions"],
                                       row[f"{side}_loss_weights"], prefix=f"{side}_decoder"))
    return features
