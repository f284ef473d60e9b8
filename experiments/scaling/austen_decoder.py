"""Scaling sweep on the bundled Austen corpus: 5 model sizes x 4 token budgets, about half an hour on 2 CPU cores.

    t5x-like sweep --config experiments/scaling/austen_decoder.py --workdir sweeps/austen
    t5x-like fit sweeps/austen --holdout 2

Sizes follow one parameter s at a fixed aspect ratio (t5x_like/scaling/sweep.py):
num_layers = s, emb_dim = 32 s, heads of 16, mlp_dim = 4 emb_dim. The 8k vocabulary
is shared by every size, so N (non-embedding) ranges over about two orders of magnitude.
"""

import ml_collections

from t5x_like.config import base_config
from t5x_like.scaling.sweep import default_sweep_config


def get_config() -> ml_collections.ConfigDict:
  base = base_config(arch="decoder", vocab_size=8192, max_len=128, norm="rmsnorm", position="rope",
                     mlp_activation="silu", mlp_gated=False, tie_embeddings=True)
  base.data.update(objective="causal_lm", seq_len=128, batch_size=16)
  base.train.update(eval_steps=8)
  base.train.optimizer.update(warmup_steps=20)
  sweep = default_sweep_config()
  sweep.update(sizes=(1, 2, 3, 4, 6), aspect_ratio=32, head_dim=16, mlp_ratio=4,
               token_budgets=(2**17, 2**18, 2**19, 2**20), seeds=(0,))
  return ml_collections.ConfigDict(dict(base=base, sweep=sweep))
