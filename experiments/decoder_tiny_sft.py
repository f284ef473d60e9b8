"""Instruction tuning of the README's main job on the bundled HHH pairs (prompt and chosen
response, loss on the response only), starting from that run's parameters:

    t5x-like train --config experiments/decoder_tiny.py --workdir workdirs/decoder_tiny
    t5x-like train --config experiments/decoder_tiny_sft.py --workdir workdirs/decoder_tiny_sft

The model and tokenizer are decoder_tiny's, so its checkpoint loads as it is; a fresh optimizer
warms up again to a lower rate, as fine-tuning usually does. One validation batch: HHH's
validation split makes 11 rows, and a second batch would count some twice.
"""

import pathlib

import ml_collections

from t5x_like.config import load_config


def get_config() -> ml_collections.ConfigDict:
  config = load_config(str(pathlib.Path(__file__).with_name("decoder_tiny.py")))
  config.data.update(dataset="hhh", objective="sft")
  config.train.update(init_from="workdirs/decoder_tiny", steps=100, log_every=10, eval_every=50, eval_steps=1,
                      checkpoint_every=50)
  config.train.optimizer.update(learning_rate=3e-4, warmup_steps=10)
  return config
