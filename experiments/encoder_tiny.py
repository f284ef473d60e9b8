"""Tiny BERT-style masked-LM encoder on the bundled Austen corpus (CPU)."""

import ml_collections

from t5x_like.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config(
      arch="encoder", vocab_size=8192, emb_dim=256, num_heads=4, mlp_dim=1024, num_layers=4,
      max_len=256, norm="layernorm", norm_eps=1e-12, norm_position="post", embedding_norm=True,
      position="learned", mlp_activation="gelu", use_bias=True, num_token_types=2)
  config.data.update(objective="mlm", seq_len=256, batch_size=8)
  config.train.update(steps=600, log_every=20, eval_every=200, eval_steps=8, checkpoint_every=200)
  config.train.optimizer.update(learning_rate=1e-3, warmup_steps=60)
  return config
