"""Tiny T5 v1.1-style encoder-decoder with span corruption on the bundled Austen corpus (CPU)."""

import ml_collections

from t5x_like.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config(
      arch="encoder_decoder", vocab_size=8192, emb_dim=256, num_heads=4, head_dim=64, mlp_dim=512,
      num_layers=3, norm="rmsnorm", position="relative", mlp_activation="gelu_tanh",
      mlp_gated=True, tie_embeddings=False, scale_attn_logits=False)
  config.data.update(objective="span_corruption", input_len=256, target_len=64, batch_size=8)
  config.train.update(steps=600, log_every=20, eval_every=200, eval_steps=8, checkpoint_every=200)
  config.train.optimizer.update(learning_rate=3e-3, warmup_steps=60)
  return config
