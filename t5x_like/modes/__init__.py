"""Training modes: what a batch holds, what the loss is, which parameters train.

The trainer runs any mode; a new one (reward model, DPO, LoRA, ...) is a new module here
registered in MODES, never a change to the loop. Instruction tuning needs none: it is
`pretrain` on the `sft` objective's rows, whose loss weights cover only the responses.
"""

from models.config import ConfigError
from t5x_like.modes.base import TrainingMode
from t5x_like.modes.pretrain import Pretrain

MODES = {"pretrain": Pretrain}


def make_mode(name: str, **kwargs) -> TrainingMode:
  if name not in MODES:
    raise ConfigError(f"train.mode={name!r} is not one of {sorted(MODES)}")
  return MODES[name](**kwargs)
