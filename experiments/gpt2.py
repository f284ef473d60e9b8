"""GPT-2 (Radford et al. 2019) for accelerators. Variants: `gpt2.py:small` (124M), `:medium` (355M)."""

import ml_collections

from t5x_like.config import base_config

SIZES = {
    "small": dict(emb_dim=768, num_heads=12, mlp_dim=3072, num_layers=12),
    "medium": dict(emb_dim=1024, num_heads=16, mlp_dim=4096, num_layers=24),
}


def get_config(size: str = "small") -> ml_collections.ConfigDict:
  if size not in SIZES:
    raise ValueError(f"gpt2.py variant {size!r} is not one of {sorted(SIZES)}")
  config = base_config(
      arch="decoder", vocab_size=50257, max_len=1024, norm="layernorm", norm_eps=1e-5,
      position="learned", mlp_activation="gelu_tanh", use_bias=True, tie_embeddings=True,
      **SIZES[size])
  config.data.update(objective="causal_lm", seq_len=1024, batch_size=256)
  config.partitioning.mesh_shape = (1, -1, 1)  # FSDP over every device
  return config
