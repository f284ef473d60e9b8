"""The one model config: every architecture option, validated before anything is built.

Experiment files fill in an `ml_collections.ConfigDict` (see `model_config_dict`),
which the command line can override field by field. `ModelConfig.from_dict` turns it
into this frozen dataclass and rejects configs that cannot work with a message that names
the field; fields left None (head_dim, num_kv_heads) are worked out where they are read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import ml_collections

ARCHITECTURES = ("encoder", "decoder", "encoder_decoder")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
POSITIONS = ("learned", "sinusoidal", "relative", "rope", "none")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_KERNELS = ("auto", "xla", "blocked", "cudnn")
LOSS_KERNELS = ("auto", "xla", "chunked")
REMAT_POLICIES = ("none", "full", "dots")


class ConfigError(ValueError):
  """A config that cannot work; the message names the field and the fix."""


def first_line(error: BaseException) -> str:
  """'Type: the message's first line' (at most 200 characters), for a log that names a failure it
  recovers from without printing the traceback."""
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of an encoder (BERT), decoder (GPT/LLaMA) or encoder-decoder (T5)."""

  arch: str = "decoder"
  vocab_size: int = 8192
  emb_dim: int = 256
  num_heads: int = 4
  # None: as many key/value heads as query heads (MHA); 1: MQA; in between: GQA.
  num_kv_heads: int | None = None
  # None: emb_dim // num_heads.
  head_dim: int | None = None
  mlp_dim: int = 1024
  # Layers of the decoder (decoder), the encoder (encoder) or both stacks
  # (encoder_decoder, unless num_decoder_layers is set).
  num_layers: int = 4
  num_decoder_layers: int | None = None
  # Longest sequence the learned position table covers (model.position='learned').
  max_len: int = 512

  norm: str = "rmsnorm"
  norm_eps: float = 1e-6
  norm_position: str = "pre"
  # A LayerNorm/RMSNorm right after the embeddings (BERT).
  embedding_norm: bool = False

  # SwiGLU = silu + gated; GeGLU = gelu (or gelu_tanh) + gated.
  mlp_activation: str = "gelu"
  mlp_gated: bool = False

  position: str = "rope"
  rope_theta: float = 10_000.0
  relative_num_buckets: int = 32
  relative_max_distance: int = 128
  # A decoder's T5 buckets in both directions, as Mesh TensorFlow gives a prefix LM (data.objective
  # 'prefix_lm'), whose prefix attends to later prefix tokens; a causal decoder's are one-directional.
  relative_bidirectional: bool = False

  use_bias: bool = False
  tie_embeddings: bool = True
  # Divide attention logits by sqrt(head_dim); T5 folds that into its query's init instead.
  scale_attn_logits: bool = True
  # Segment (token type) embeddings, as in BERT; 0 disables them.
  num_token_types: int = 0
  # BERT's masked-LM head: dense + activation + norm before the vocabulary projection.
  mlm_head_transform: bool = True

  # "xla": all scores at once; "blocked": cache-sized blocks (models/blocked_attention.py:
  # about twice as fast on CPU, no relative bias); "cudnn": cuDNN's flash attention (NVIDIA
  # GPUs, bf16/fp16); "auto": cudnn on a GPU where it fits, blocked on one CPU device past
  # 128 keys, else xla. Decoding with a KV cache and T5's relative bias always use xla.
  attention_kernel: str = "auto"
  # The training loss's vocabulary projection. "xla": all [b, t, v] logits at once;
  # "chunked": about 512 tokens at a time, with the gradient in the same pass
  # (models.losses.chunked_cross_entropy_sums: faster on CPU, less memory); "auto":
  # chunked on CPU, else xla.
  loss_kernel: str = "auto"
  # What the backward pass recomputes rather than keeps, per block: "none" keeps every
  # activation (fastest, when memory allows); "dots" keeps the projections' outputs and
  # recomputes attention and elementwise work; "full" keeps only each block's input.
  # Recomputation is not counted in model FLOPs, so MFU falls as remat rises.
  remat: str = "none"

  # Round the inputs of every projection matmul (forward, input gradient and weight
  # gradient) to bfloat16, accumulating in float32, as TPUs do by default for float32.
  # Faster float32 training on CPUs with bf16 matmul units (AVX512-BF16: docs/benchmarks.md;
  # AMX: docs/benchmarks_amx.md); about 0.8x as fast on CPUs without (docs/benchmarks_avx2.md).
  bf16_matmul_inputs: bool = False

  # Dropout on the embeddings, each sublayer's output and, with final_dropout, the final hidden
  # states (T5, T5X, MaxText; GPT-2 and BERT have none there).
  dropout_rate: float = 0.0
  final_dropout: bool = True
  # Dropout on the attention probabilities (GPT-2's attn_pdrop, BERT's
  # attention_probs_dropout_prob, T5's dropout_rate), which the xla kernel alone computes:
  # "auto" picks it while training with this on.
  attention_dropout_rate: float = 0.0
  # Dropout on the MLP's hidden activations, between wi and wo (T5; T5X's intermediate_dropout_rate).
  mlp_dropout_rate: float = 0.0
  param_dtype: str = "float32"
  dtype: str = "float32"

  @classmethod
  def from_dict(cls, values: Mapping[str, Any] | ml_collections.ConfigDict) -> "ModelConfig":
    """Builds and validates a config; unknown keys are an error, not ignored."""
    if isinstance(values, ml_collections.ConfigDict):
      values = values.to_dict()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"unknown model config field(s) {unknown}; known fields: {sorted(known)}")
    config = cls(**values)
    config.validate()
    return config

  def replace(self, **changes) -> "ModelConfig":
    config = dataclasses.replace(self, **changes)
    config.validate()
    return config

  # Derived fields -------------------------------------------------------------

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def dim_per_head(self) -> int:
    return self.emb_dim // self.num_heads if self.head_dim is None else self.head_dim

  @property
  def decoder_layers(self) -> int:
    return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def cudnn_misfit(self) -> str | None:
    """Why cuDNN's flash attention cannot take this model's operands, or None if it can."""
    if self.dtype == "float32":
      return "takes bfloat16 or float16 operands; set model.dtype, or use attention_kernel='auto'"
    if self.dim_per_head % 8 or self.dim_per_head > 256:
      return f"needs a head dimension that is a multiple of 8 and at most 256, got {self.dim_per_head}"
    return None

  # Validation -----------------------------------------------------------------

  def check_length(self, length: int, what: str) -> None:
    """Rejects sequences past the learned position table: jnp.take would embed them as NaN."""
    if self.position == "learned" and length > self.max_len:
      raise ConfigError(f"{what} {length} exceeds model.max_len={self.max_len} of the learned position table")

  def validate(self) -> None:
    def choice(name, options):
      value = getattr(self, name)
      if value not in options:
        raise ConfigError(f"model.{name}={value!r} is not one of {options}")

    def positive(name):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ConfigError(f"model.{name}={value!r} must be a positive integer")

    choice("arch", ARCHITECTURES)
    choice("norm", NORMS)
    choice("norm_position", NORM_POSITIONS)
    choice("mlp_activation", ACTIVATIONS)
    choice("position", POSITIONS)
    choice("param_dtype", DTYPES)
    choice("dtype", DTYPES)
    choice("attention_kernel", ATTENTION_KERNELS)
    choice("loss_kernel", LOSS_KERNELS)
    choice("remat", REMAT_POLICIES)
    for name in ("vocab_size", "emb_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                 "num_layers", "num_decoder_layers", "max_len", "relative_num_buckets",
                 "relative_max_distance"):
      positive(name)
    if self.head_dim is None and self.emb_dim % self.num_heads:
      raise ConfigError(
          f"model.num_heads={self.num_heads} does not divide model.emb_dim={self.emb_dim}; "
          "change one of them or set model.head_dim explicitly")
    if self.num_heads % self.kv_heads:
      raise ConfigError(
          f"model.num_kv_heads={self.kv_heads} does not divide model.num_heads={self.num_heads} "
          "(grouped-query attention shares each key/value head by a whole group of query heads)")
    if self.position == "rope" and self.dim_per_head % 2:
      raise ConfigError(f"model.position='rope' needs an even head dimension, got {self.dim_per_head}")
    # T5's buckets are exact below max_exact (half a direction's buckets), then log-spaced to
    # max_distance; an encoder stack, bidirectional, gives each direction half the buckets. Each
    # stack needs max_exact >= 1 and max_distance past it: an encoder-decoder has both kinds.
    if self.relative_bidirectional and (self.arch != "decoder" or self.position != "relative"):
      raise ConfigError(f"model.relative_bidirectional applies only to model.arch='decoder' with "
                        f"position='relative' (an encoder's buckets are bidirectional already); got "
                        f"arch={self.arch!r}, position={self.position!r}")
    decoder_share = 4 if self.relative_bidirectional else 2
    shares = {"decoder": (decoder_share,), "encoder": (4,), "encoder_decoder": (4, 2)}[self.arch]
    if self.position == "relative" and self.relative_num_buckets // max(shares) < 1:
      raise ConfigError(f"model.relative_num_buckets={self.relative_num_buckets} is too few for "
                        f"model.arch={self.arch!r}: {max(shares)} or more are needed")
    max_exact = self.relative_num_buckets // min(shares)
    if self.position == "relative" and self.relative_max_distance <= max_exact:
      raise ConfigError(f"model.relative_max_distance={self.relative_max_distance} must exceed {max_exact}, where "
                        f"model.relative_num_buckets={self.relative_num_buckets} stop being exact")
    if self.position == "sinusoidal" and self.emb_dim % 2:
      raise ConfigError(f"model.position='sinusoidal' needs an even model.emb_dim, got {self.emb_dim}")
    if self.attention_kernel in ("blocked", "cudnn") and self.position == "relative":
      raise ConfigError(f"model.attention_kernel={self.attention_kernel!r} takes no attention bias, "
                        "which model.position='relative' needs; use attention_kernel='auto' or 'xla'")
    if self.attention_kernel == "cudnn" and self.cudnn_misfit:
      raise ConfigError(f"model.attention_kernel='cudnn' {self.cudnn_misfit}")
    if self.num_decoder_layers is not None and self.arch != "encoder_decoder":
      raise ConfigError("model.num_decoder_layers applies only to model.arch='encoder_decoder'")
    for name in ("dropout_rate", "attention_dropout_rate", "mlp_dropout_rate"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ConfigError(f"model.{name}={getattr(self, name)} must be in [0, 1)")
    if self.attention_kernel in ("blocked", "cudnn") and self.attention_dropout_rate:
      raise ConfigError(f"model.attention_kernel={self.attention_kernel!r} never forms the attention probabilities "
                        f"that model.attention_dropout_rate drops; use attention_kernel='auto' or 'xla'")
    if self.num_token_types < 0:
      raise ConfigError(f"model.num_token_types={self.num_token_types} must be >= 0")
    if self.num_token_types and self.arch != "encoder":  # decode and encode take no token types
      raise ConfigError(f"model.num_token_types applies only to model.arch='encoder' (BERT's segment embeddings); "
                        f"a {self.arch}'s table would add one learned row to every token")
    if self.norm_eps <= 0:
      raise ConfigError(f"model.norm_eps={self.norm_eps} must be > 0")
    if not self.rope_theta > 0:  # the rotation frequencies are powers of it
      raise ConfigError(f"model.rope_theta={self.rope_theta} must be > 0")


def model_config_dict(**overrides) -> ml_collections.ConfigDict:
  """The defaults as a ConfigDict for experiment files; fields may be None (derived)."""
  values = dataclasses.asdict(ModelConfig())
  unknown = sorted(set(overrides) - set(values))
  if unknown:
    raise ConfigError(f"unknown model config field(s) {unknown}")
  values.update(overrides)
  return ml_collections.ConfigDict(values)
