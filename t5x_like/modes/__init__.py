"""Training modes: what a batch holds, what the loss is, which parameters train.

The trainer runs any mode; a new one (reward model, DPO, LoRA, ...) is a new module here
registered in MODES, never a change to the loop: it reads its settings from the train section
(TrainingMode.from_config), adds parameters of its own to the model (TrainingMode.build_model),
says what a row of its batch costs if not one sequence (TrainingMode.row_cost), and the trainer
reports whatever sums its loss returns.
Instruction tuning needs none: it is `pretrain` on the `sft` objective's rows, whose loss
weights cover only the responses.
"""

import ml_collections

from models.config import ConfigError
from t5x_like.modes.base import TrainingMode
from t5x_like.modes.pretrain import Pretrain

MODES = {"pretrain": Pretrain}


def make_mode(train: ml_collections.ConfigDict) -> TrainingMode:
  """The mode train.mode names, with its settings read from the train section."""
  if train.mode not in MODES:
    raise ConfigError(f"train.mode={train.mode!r} is not one of {sorted(MODES)}")
  return MODES[train.mode].from_config(train)
