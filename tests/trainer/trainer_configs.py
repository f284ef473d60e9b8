"""Tiny trainer configs shared by the in-process and subprocess trainer tests."""

import ml_collections

from models.config import model_config_dict
from t5x_like.partitioning import default_partitioning_config
from t5x_like.trainer import default_train_config


def tiny_config(arch="decoder", steps=12, mesh_shape=(-1, 1, 1), schedule="rsqrt",
                **train) -> ml_collections.ConfigDict:
  """T5's rsqrt schedule by default (flat through warmup, then 1 / sqrt(step)), which the tests'
  numbers were written against; tests of rates that depend on train.steps name warmup_cosine."""
  config = ml_collections.ConfigDict()
  config.model = model_config_dict(arch=arch, vocab_size=64, emb_dim=32, num_heads=4, mlp_dim=64,
                                   num_layers=2, max_len=32, dropout_rate=0.1)
  if arch == "encoder_decoder":
    config.data = ml_collections.ConfigDict(dict(input_len=12, target_len=8, batch_size=8))
  else:
    config.data = ml_collections.ConfigDict(dict(seq_len=16, batch_size=8, pack=True))
  config.train = default_train_config()
  config.train.update(steps=steps, log_every=1, eval_every=1000, eval_steps=2, checkpoint_every=4)
  config.train.optimizer.update(warmup_steps=3, learning_rate=1e-2, schedule=schedule)
  config.train.update(train)
  config.partitioning = default_partitioning_config()
  config.partitioning.mesh_shape = tuple(mesh_shape)
  return config
