"""Tiny LLaMA-style decoder for CPU runs on the bundled corpus (the README's main job)."""

import ml_collections

from models.config import model_config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model_config_dict(
      arch="decoder", vocab_size=8192, emb_dim=256, num_heads=4, num_kv_heads=2, mlp_dim=768,
      num_layers=4, max_len=256, norm="rmsnorm", position="rope", mlp_activation="silu",
      mlp_gated=True, tie_embeddings=True)
  config.data = ml_collections.ConfigDict(dict(seq_len=256))
  return config
