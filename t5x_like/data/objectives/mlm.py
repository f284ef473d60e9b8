"""Masked language modelling (BERT; Devlin et al. 2019, §3.1): predict chosen tokens from both sides.

In each document piece (as in causal LM, eos included) round(rate * n) of its n ordinary
tokens (all but pad, eos and unk) are chosen, at least one; of the chosen, 80% become the
mask id, 10% a random ordinary token (any id from 3 up to the mask id) and 10% stay as
they were. The loss
covers exactly the chosen tokens. A new choice is drawn each epoch (RoBERTa's dynamic
masking; Liu et al. 2019).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from t5x_like.data.objectives.base import Example, Objective
from t5x_like.data.tokenizer import FIRST_PIECE_ID, Tokenizer


def mask_tokens(tokens: np.ndarray, rng: np.random.Generator, *, rate: float, mask_id: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """(corrupted tokens, chosen) for one sequence; ids below FIRST_PIECE_ID are never chosen
  and random replacements come from [FIRST_PIECE_ID, mask_id)."""
  candidates = np.flatnonzero(tokens >= FIRST_PIECE_ID)
  count = max(1, round(rate * len(candidates))) if len(candidates) else 0  # BERT's count: Python's round
  picked = rng.choice(candidates, size=count, replace=False)
  draw = rng.random(count)
  inputs = tokens.copy()
  inputs[picked[draw < 0.8]] = mask_id
  replaced = picked[(draw >= 0.8) & (draw < 0.9)]
  inputs[replaced] = rng.integers(FIRST_PIECE_ID, mask_id, size=len(replaced))
  chosen = np.zeros(len(tokens), bool)
  chosen[picked] = True
  return inputs, chosen


class MaskedLM(Objective):

  architectures = ("encoder",)
  config_fields = ("seq_len", "mlm_probability")
  feature_names = ("encoder_input_tokens", "encoder_target_tokens", "encoder_segment_ids", "encoder_positions",
                   "encoder_loss_weights")

  def __init__(self, tokenizer: Tokenizer, seq_len: int, mlm_probability: float):
    super().__init__(tokenizer)
    self.rate = mlm_probability
    self.lengths = {"inputs": seq_len, "targets": seq_len, "loss_weights": seq_len}

  def examples(self, record: Mapping[str, str], rng: np.random.Generator) -> list[Example]:
    examples = []
    for piece in self.document_chunks(record["text"], self.lengths["targets"]):
      inputs, chosen = mask_tokens(piece, rng, rate=self.rate, mask_id=self.tokenizer.mask_id)
      examples.append({"inputs": inputs, "targets": piece, "loss_weights": chosen.astype(np.float32)})
    return examples

  def features(self, row: Example) -> dict[str, np.ndarray]:
    segment_ids = row["targets_segment_ids"]
    return {
        "encoder_input_tokens": row["inputs"].astype(np.int32),
        "encoder_target_tokens": row["targets"].astype(np.int32),
        "encoder_segment_ids": segment_ids.astype(np.int32),
        "encoder_positions": row["targets_positions"].astype(np.int32),
        "encoder_loss_weights": row["loss_weights"] * (segment_ids > 0),
    }
