"""The interface every training mode implements."""

from __future__ import annotations

import abc

import jax
import ml_collections
from flax import nnx

from models.config import ModelConfig
from models.model_size import train_flops_per_sequence
from models.transformer import build_model


class TrainingMode(abc.ABC):
  """A loss over a batch, the batch's features, and a filter of trainable parameters."""

  # Parameters the optimizer updates (the trainer narrows it to nnx.Param); everything else
  # stays frozen (LoRA, prompt tuning and adapters narrow this).
  trainable = nnx.Param

  def build_model(self, model_config: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The module the mode trains: the config's model, or that model with parameters of the
    mode's own added (LoRA's low-rank weights, prompt embeddings, a reward head). Added beside
    the model's own, they leave its parameters' paths, and so train.init_from, as they are."""
    return build_model(model_config, rngs=rngs)

  @classmethod
  def from_config(cls, train: ml_collections.ConfigDict) -> TrainingMode:
    """The mode with its own settings (a DPO beta, a LoRA rank) read from the run's train section."""
    return cls()

  def row_cost(self, model_config: ModelConfig, lengths: tuple[int, ...]) -> tuple[float, int]:
    """(model FLOPs, tokens) a training step spends on one row of the batch, for the logged
    throughput and MFU: one sequence of the data's lengths, trained (PaLM app. B). A mode that
    runs the model on more than one sequence a row (a preference pair's two responses) or
    trains fewer weights says so here, or its tokens/s and MFU are misreported."""
    return train_flops_per_sequence(model_config, *lengths), sum(lengths)

  @abc.abstractmethod
  def batch_features(self, model_config: ModelConfig, objective: str | None) -> tuple[str, ...]:
    """Names of the features the mode reads from a batch made by the data objective
    (checked before compiling)."""

  @abc.abstractmethod
  def loss_sums(self, model: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Summed loss statistics (see models.losses.cross_entropy_sums): `loss`, which is
    minimised, and `weight`, by which the trainer divides every sum. `cross_entropy`,
    `correct` and `z_loss` are optional: the trainer reports the loss, perplexity, accuracy
    and z-loss from whichever are there, and any other sum per weight by its own name
    (trainer.loss_means)."""
