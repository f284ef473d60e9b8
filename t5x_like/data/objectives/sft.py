"""Supervised fine-tuning (Ouyang et al. 2022, §3.5): learn the response, not the prompt.

A record's prompt and response become one sequence, prompt + response + eos, with loss
weight 0 on the prompt and 1 on the response and eos. The tokenizer has no dummy prefix,
so the sequence decodes to exactly prompt + response. A pair longer than `seq_len` is
truncated and counted (`truncated`): the prompt keeps its end, the part nearest the
response, and at least half the row when it is that long; the response keeps its start.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from t5x_like.data.objectives.base import Counts, Example, Objective
from t5x_like.data.objectives.features import decoder_feature_names, decoder_features
from t5x_like.data.tokenizer import EOS_ID, Tokenizer


def fit_pair(prompt: np.ndarray, response: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompt and response cut to fit `length` together (see the module docstring)."""
  if len(prompt) + len(response) <= length:
    return prompt, response
  response_kept = min(len(response), length - min(len(prompt), length // 2))
  prompt_kept = length - response_kept
  return prompt[len(prompt) - prompt_kept:], response[:response_kept]


def response_ids(tokenizer: Tokenizer, response: str) -> np.ndarray:
  """The response's ids and eos, which the loss scores too."""
  return np.append(tokenizer.encode(response), np.int32(EOS_ID))


def prompt_response_sequence(prompt: np.ndarray, response: np.ndarray) -> Example:
  """{targets, loss_weights} of prompt + response ids, loss on the response only."""
  return {"targets": np.concatenate([prompt, response]).astype(np.int32),
          "loss_weights": np.concatenate([np.zeros(len(prompt), np.float32), np.ones(len(response), np.float32)])}


def prompt_response_example(tokenizer: Tokenizer, prompt: str, response: str, length: int,
                            counts: Counts) -> Example:
  """{targets, loss_weights} of prompt + response + eos, loss on the response and eos."""
  prompt_ids, answer = tokenizer.encode(prompt), response_ids(tokenizer, response)
  kept_prompt, kept_response = fit_pair(prompt_ids, answer, length)
  counts.add(truncated=int(len(kept_prompt) + len(kept_response) < len(prompt_ids) + len(answer)))
  return prompt_response_sequence(kept_prompt, kept_response)


class SupervisedFineTuning(Objective):

  fields = ("prompt", "response")
  feature_names = decoder_feature_names()

  def __init__(self, tokenizer: Tokenizer, seq_len: int):
    super().__init__(tokenizer)
    self.lengths = {"targets": seq_len, "loss_weights": seq_len}

  def examples(self, record: Mapping[str, str], rng: np.random.Generator) -> list[Example]:
    del rng  # deterministic
    self.counts.add(documents=1)
    return [prompt_response_example(self.tokenizer, record["prompt"], record["response"],
                                    self.lengths["targets"], self.counts)]

  def features(self, row: Example) -> dict[str, np.ndarray]:
    return decoder_features(row["targets"], row["targets_segment_ids"], row["targets_positions"],
                            row["loss_weights"])
