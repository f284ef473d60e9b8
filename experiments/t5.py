"""T5 v1.1 (Raffel et al. 2020; gated GELU, untied, no dropout in pretraining) for accelerators.

Variants: `t5.py:small` (77M), `t5.py:base` (248M).
"""

import ml_collections

from t5x_like.config import base_config

SIZES = {
    "small": dict(emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024, num_layers=8),
    "base": dict(emb_dim=768, num_heads=12, head_dim=64, mlp_dim=2048, num_layers=12),
}


def get_config(size: str = "small") -> ml_collections.ConfigDict:
  if size not in SIZES:
    raise ValueError(f"t5.py variant {size!r} is not one of {sorted(SIZES)}")
  config = base_config(
      arch="encoder_decoder", vocab_size=32128, norm="rmsnorm", position="relative",
      mlp_activation="gelu_tanh", mlp_gated=True, tie_embeddings=False, scale_attn_logits=False,
      **SIZES[size])
  config.data.update(objective="span_corruption", input_len=512, target_len=114, batch_size=128)
  config.partitioning.mesh_shape = (1, -1, 1)  # FSDP over every device
  return config
