"""Tiny T5 v1.1-style encoder-decoder for CPU span-corruption runs on the bundled corpus."""

import ml_collections

from models.config import model_config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model_config_dict(
      arch="encoder_decoder", vocab_size=8192, emb_dim=256, num_heads=4, head_dim=64, mlp_dim=512,
      num_layers=3, norm="rmsnorm", position="relative", mlp_activation="gelu_tanh",
      mlp_gated=True, tie_embeddings=False, scale_attn_logits=False)
  config.data = ml_collections.ConfigDict(dict(input_len=256, target_len=64))
  return config
