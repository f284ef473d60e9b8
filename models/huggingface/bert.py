"""BERT (Devlin et al. 2019) as our EncoderMLM: BertForMaskedLM's checkpoint layout.

Post-norm LayerNorm blocks with biases, learned position and token type embeddings
summed then normalised, exact GELU, and the masked-LM head: dense + activation +
LayerNorm, then the (tied) vocabulary projection plus an output bias.
"""

from __future__ import annotations

from models.config import ModelConfig
from models.huggingface.common import (Tensor, UnsupportedCheckpoint, activation, copy, linear, norm,
                                      output_head, require)
from models.transformer import EncoderMLM

HF_CLASS = "BertForMaskedLM"

FIXED = dict(arch="encoder", norm="layernorm", norm_position="post", embedding_norm=True,
             position="learned", mlp_gated=False, use_bias=True, scale_attn_logits=True,
             mlm_head_transform=True, num_kv_heads=None, head_dim=None)


def config_from_hf(hf_config) -> ModelConfig:
  """hidden_dropout_prob is our dropout_rate; attention_probs_dropout_prob our attention_dropout_rate."""
  require(hf_config, "position_embedding_type", "absolute",
          "relative_key position embeddings are not implemented")
  require(hf_config, "is_decoder", False, "EncoderMLM attends bidirectionally")
  require(hf_config, "add_cross_attention", False, "EncoderMLM has no cross-attention")
  return ModelConfig.from_dict(dict(
      FIXED, vocab_size=hf_config.vocab_size, emb_dim=hf_config.hidden_size,
      num_heads=hf_config.num_attention_heads, mlp_dim=hf_config.intermediate_size,
      num_layers=hf_config.num_hidden_layers, max_len=hf_config.max_position_embeddings,
      norm_eps=hf_config.layer_norm_eps, mlp_activation=activation(hf_config, "hidden_act"),
      num_token_types=hf_config.type_vocab_size, tie_embeddings=hf_config.tie_word_embeddings,
      dropout_rate=hf_config.hidden_dropout_prob,
      attention_dropout_rate=hf_config.attention_probs_dropout_prob, final_dropout=False))


def tensors(model: EncoderMLM) -> list[Tensor]:
  stack = model.encoder
  if stack.token_type_embed is None:
    raise UnsupportedCheckpoint("BertForMaskedLM always has token type embeddings; this model has "
                                "model.num_token_types=0")
  out = [copy("bert.embeddings.word_embeddings.weight", model.token_embed.embedding),
         copy("bert.embeddings.position_embeddings.weight", stack.position_embed.embedding),
         copy("bert.embeddings.token_type_embeddings.weight", stack.token_type_embed.embedding)]
  out += norm("bert.embeddings.LayerNorm", stack.embedding_norm)
  for i, layer in enumerate(stack.layers):
    prefix = f"bert.encoder.layer.{i}"
    attention = layer.self_attention
    out += linear(f"{prefix}.attention.self.query", attention.query)
    out += linear(f"{prefix}.attention.self.key", attention.key)
    out += linear(f"{prefix}.attention.self.value", attention.value)
    out += linear(f"{prefix}.attention.output.dense", attention.out)
    out += norm(f"{prefix}.attention.output.LayerNorm", layer.self_attention_norm)
    out += linear(f"{prefix}.intermediate.dense", layer.mlp.wi)
    out += linear(f"{prefix}.output.dense", layer.mlp.wo)
    out += norm(f"{prefix}.output.LayerNorm", layer.mlp_norm)
  out.append(copy("cls.predictions.bias", model.output_bias))
  out += linear("cls.predictions.transform.dense", model.mlm_dense)
  out += norm("cls.predictions.transform.LayerNorm", model.mlm_norm)
  out += output_head("cls.predictions.decoder", model)
  # Tied to cls.predictions.bias; listed last so that, were the two untied, the bias
  # the decoder actually adds is the one imported.
  out.append(copy("cls.predictions.decoder.bias", model.output_bias))
  return out
