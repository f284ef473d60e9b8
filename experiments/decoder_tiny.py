"""Tiny LLaMA-style decoder on the bundled Austen corpus: the README's main job (CPU, minutes)."""

import ml_collections

from t5x_like.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config(
      arch="decoder", vocab_size=8192, emb_dim=256, num_heads=4, num_kv_heads=2, mlp_dim=768,
      num_layers=4, max_len=256, norm="rmsnorm", position="rope", mlp_activation="silu",
      mlp_gated=True, tie_embeddings=True)
  config.data.update(objective="causal_lm", seq_len=256, batch_size=8)
  config.train.update(steps=600, log_every=20, eval_every=200, eval_steps=8, checkpoint_every=200)
  config.train.optimizer.update(learning_rate=3e-3, warmup_steps=60)
  return config
