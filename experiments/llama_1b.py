"""A LLaMA-style 1.1B decoder (the TinyLlama shape: GQA 32/4, SwiGLU, RoPE) for accelerators."""

import ml_collections

from t5x_like.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config(
      arch="decoder", vocab_size=32000, emb_dim=2048, num_heads=32, num_kv_heads=4, mlp_dim=5632,
      num_layers=22, max_len=2048, norm="rmsnorm", norm_eps=1e-5, position="rope",
      rope_theta=10_000.0, mlp_activation="silu", mlp_gated=True, tie_embeddings=False,
      dtype="bfloat16")
  config.data.update(objective="causal_lm", seq_len=2048, batch_size=256)
  config.partitioning.mesh_shape = (1, -1, 1)  # FSDP over every device
  return config
