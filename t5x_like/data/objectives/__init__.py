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
  """The objective `config.objective` names, built from the data fields it reads."""
  cls = OBJECTIVE_CLASSES[config.objective]
  return cls(tokenizer, *(config[name] for name in cls.config_fields))
