"""A 6-point sweep, the fewest `fit` takes, that runs in seconds: for tests and for trying the sweep machinery."""

import ml_collections

from t5x_like.config import base_config
from t5x_like.scaling.sweep import default_sweep_config


def get_config() -> ml_collections.ConfigDict:
  base = base_config(arch="decoder", vocab_size=8192, max_len=32, position="rope")
  base.data.update(objective="causal_lm", seq_len=32, batch_size=8, worker_threads=0, prefetch_batches=0)
  base.train.update(eval_steps=2)
  base.train.optimizer.update(warmup_steps=2)
  sweep = default_sweep_config()
  sweep.update(sizes=(1, 2), aspect_ratio=16, head_dim=8, mlp_ratio=2, token_budgets=(2**11, 2**12, 2**13),
               seeds=(0,))
  return ml_collections.ConfigDict(dict(base=base, sweep=sweep))
