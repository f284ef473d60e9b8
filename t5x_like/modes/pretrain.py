"""Weighted cross-entropy on the target tokens: next-token (decoder: causal LM, prefix LM, SFT),
masked-token (encoder) or span (encoder-decoder); the objective's loss weights say which count.

Batches use T5X's feature names, produced by t5x_like.data's objectives.
"""

from __future__ import annotations

import ml_collections
from flax import nnx

from models.config import ModelConfig
from t5x_like.data.objectives import objective_model_inputs
from t5x_like.modes.base import TrainingMode

FEATURES = {
    "decoder": ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                "decoder_segment_ids", "decoder_positions"),
    "encoder": ("encoder_input_tokens", "encoder_target_tokens", "encoder_loss_weights",
                "encoder_segment_ids", "encoder_positions"),
    "encoder_decoder": ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
                        "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                        "decoder_segment_ids", "decoder_positions"),
}


class Pretrain(TrainingMode):
  """Cross-entropy on the weighted target tokens of the model's own architecture."""

  def __init__(self, z_loss: float = 0.0):
    self.z_loss = z_loss

  @classmethod
  def from_config(cls, train: ml_collections.ConfigDict) -> Pretrain:
    return cls(z_loss=train.z_loss)

  def batch_features(self, model_config: ModelConfig, objective: str | None) -> tuple[str, ...]:
    return FEATURES[model_config.arch] + objective_model_inputs(objective)

  def loss_sums(self, model: nnx.Module, batch):
    arch = model.config.arch
    if arch == "decoder":
      hidden = model.hidden(batch["decoder_input_tokens"], segment_ids=batch["decoder_segment_ids"],
                            positions=batch["decoder_positions"],
                            prefix_mask=batch.get("decoder_causal_attention"))
      prefix = "decoder"
    elif arch == "encoder":
      hidden = model.hidden(batch["encoder_input_tokens"], segment_ids=batch["encoder_segment_ids"],
                            positions=batch["encoder_positions"])
      prefix = "encoder"
    else:
      hidden = model.hidden(batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                            encoder_segment_ids=batch["encoder_segment_ids"],
                            encoder_positions=batch["encoder_positions"],
                            decoder_segment_ids=batch["decoder_segment_ids"],
                            decoder_positions=batch["decoder_positions"])
      prefix = "decoder"
    return model.loss_sums(hidden, batch[f"{prefix}_target_tokens"], batch[f"{prefix}_loss_weights"],
                           self.z_loss)
