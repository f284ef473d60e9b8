"""Tiny BERT-style masked-LM encoder for CPU runs on the bundled corpus."""

import ml_collections

from models.config import model_config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model_config_dict(
      arch="encoder", vocab_size=8192, emb_dim=256, num_heads=4, mlp_dim=1024, num_layers=4,
      max_len=256, norm="layernorm", norm_eps=1e-12, norm_position="post", embedding_norm=True,
      position="learned", mlp_activation="gelu", use_bias=True, num_token_types=2)
  config.data = ml_collections.ConfigDict(dict(seq_len=256))
  return config
