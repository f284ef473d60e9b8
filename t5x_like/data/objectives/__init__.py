"""Training objectives, one module each; `make_objective` picks one from the data config."""

from __future__ import annotations

import ml_collections

from t5x_like.data.objectives.base import Objective
from t5x_like.data.objectives.causal_lm import CausalLM
from t5x_like.data.objectives.mlm import MaskedLM
from t5x_like.data.objectives.preference import PreferencePairs
from t5x_like.data.objectives.prefix_lm import PrefixLM
from t5x_like.data.objectives.sft import SupervisedFineTuning
from t5x_like.data.objectives.span_corruption import SpanCorruption
from t5x_like.data.tokenizer import Tokenizer

OBJECTIVE_CLASSES = {"causal_lm": CausalLM, "prefix_lm": PrefixLM, "mlm": MaskedLM,
                     "span_corruption": SpanCorruption, "sft": SupervisedFineTuning, "preference": PreferencePairs}
OBJECTIVES = tuple(OBJECTIVE_CLASSES)


def objective_model_inputs(name: str | None) -> tuple[str, ...]:
  """The features beyond its architecture's own that objective `name` feeds the model."""
  return OBJECTIVE_CLASSES[name].model_inputs if name in OBJECTIVE_CLASSES else ()


def make_objective(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> Objective:
  """The objective `config.objective` names, sized by the config's lengths."""
  name = config.objective
  if name == "causal_lm":
    return CausalLM(tokenizer, config.seq_len)
  if name == "prefix_lm":
    return PrefixLM(tokenizer, config.seq_len)
  if name == "mlm":
    return MaskedLM(tokenizer, config.seq_len, config.mlm_probability)
  if name == "span_corruption":
    return SpanCorruption(tokenizer, config.input_len, config.target_len, config.noise_density,
                          config.mean_noise_span_length)
  if name == "sft":
    return SupervisedFineTuning(tokenizer, config.seq_len)
  if name == "preference":
    return PreferencePairs(tokenizer, config.seq_len)
  raise ValueError(f"unknown objective {name!r}; one of {OBJECTIVES}")
