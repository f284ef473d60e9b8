"""T5 v1.1 (Raffel et al. 2020) as our EncoderDecoder: T5ForConditionalGeneration's layout.

RMSNorm pre-norm blocks without biases, unscaled attention logits (T5 folds the
scale into its initialisation), one relative position bias per stack (HF keeps it on
block 0's self-attention), a token table shared by encoder, decoder and, when tied,
the output projection.
"""

from __future__ import annotations

from models.config import ModelConfig
from models.huggingface.common import Tensor, activation, copy, linear, norm, output_head, require
from models.transformer import EncoderDecoder, Stack

HF_CLASS = "T5ForConditionalGeneration"

FIXED = dict(arch="encoder_decoder", norm="rmsnorm", norm_position="pre", embedding_norm=False,
             position="relative", use_bias=False, scale_attn_logits=False, num_kv_heads=None,
             num_token_types=0)


def config_from_hf(hf_config) -> ModelConfig:
  """v1.1's lm_head is its own matrix; whether a given model ties it is read from its weights."""
  # transformers < 5 scaled exactly when tie_word_embeddings was true.
  if not hasattr(hf_config, "scale_decoder_outputs"):
    require(hf_config, "tie_word_embeddings", False, "original T5 scales decoder outputs by d_model**-0.5")
  require(hf_config, "scale_decoder_outputs", False,
          "original T5 multiplies decoder outputs by d_model**-0.5 before lm_head; "
          "EncoderDecoder._logits in models/transformer.py does not")
  return ModelConfig.from_dict(dict(
      FIXED, vocab_size=hf_config.vocab_size, emb_dim=hf_config.d_model,
      num_heads=hf_config.num_heads, head_dim=hf_config.d_kv, mlp_dim=hf_config.d_ff,
      num_layers=hf_config.num_layers, num_decoder_layers=hf_config.num_decoder_layers,
      norm_eps=hf_config.layer_norm_epsilon, mlp_activation=activation(hf_config, "dense_act_fn"),
      mlp_gated=hf_config.is_gated_act,
      relative_num_buckets=hf_config.relative_attention_num_buckets,
      relative_max_distance=hf_config.relative_attention_max_distance,
      tie_embeddings=False, dropout_rate=hf_config.dropout_rate,
      attention_dropout_rate=hf_config.dropout_rate, mlp_dropout_rate=hf_config.dropout_rate))


def tensors(model: EncoderDecoder) -> list[Tensor]:
  table = model.token_embed.embedding
  return ([copy("shared.weight", table), copy("encoder.embed_tokens.weight", table)]
          + _stack("encoder", model.encoder)
          + [copy("decoder.embed_tokens.weight", table)]
          + _stack("decoder", model.decoder)
          + output_head("lm_head", model))


def _stack(name: str, stack: Stack) -> list[Tensor]:
  out = []
  for i, layer in enumerate(stack.layers):
    prefix = f"{name}.block.{i}.layer"
    out += _attention(f"{prefix}.0.SelfAttention", layer.self_attention)
    if i == 0:
      out.append(copy(f"{prefix}.0.SelfAttention.relative_attention_bias.weight",
                      stack.relative_bias.embedding))
    out += norm(f"{prefix}.0.layer_norm", layer.self_attention_norm)
    mlp_index = 1
    if layer.cross_attention is not None:
      out += _attention(f"{prefix}.1.EncDecAttention", layer.cross_attention)
      out += norm(f"{prefix}.1.layer_norm", layer.cross_attention_norm)
      mlp_index = 2
    mlp, mlp_prefix = layer.mlp, f"{prefix}.{mlp_index}.DenseReluDense"
    if mlp.wi_linear is None:
      out += linear(f"{mlp_prefix}.wi", mlp.wi)
    else:
      out += linear(f"{mlp_prefix}.wi_0", mlp.wi)
      out += linear(f"{mlp_prefix}.wi_1", mlp.wi_linear)
    out += linear(f"{mlp_prefix}.wo", mlp.wo)
    out += norm(f"{prefix}.{mlp_index}.layer_norm", layer.mlp_norm)
  return out + norm(f"{name}.final_layer_norm", stack.final_norm)


def _attention(prefix: str, attention) -> list[Tensor]:
  return (linear(f"{prefix}.q", attention.query) + linear(f"{prefix}.k", attention.key)
          + linear(f"{prefix}.v", attention.value) + linear(f"{prefix}.o", attention.out))
