"""LLaMA (Touvron et al. 2023) as our DecoderLM: LlamaForCausalLM's checkpoint layout.

RMSNorm pre-norm blocks, RoPE in the split-halves layout our apply_rope uses (so q/k
need no permutation), SwiGLU (gate_proj -> wi, up_proj -> wi_linear, down_proj -> wo)
and grouped-query attention through num_key_value_heads.
"""

from __future__ import annotations

from models.config import ModelConfig
from models.huggingface.common import (Tensor, UnsupportedCheckpoint, activation, copy, linear, norm,
                                       output_head)
from models.transformer import DecoderLM

HF_CLASS = "LlamaForCausalLM"

FIXED = dict(arch="decoder", norm="rmsnorm", norm_position="pre", embedding_norm=False,
             position="rope", mlp_gated=True, scale_attn_logits=True, num_token_types=0)


def config_from_hf(hf_config) -> ModelConfig:
  rope = hf_config.rope_parameters
  if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise UnsupportedCheckpoint(
        f"llama config rope_parameters={rope!r} is not supported: models.layers.apply_rope "
        "rotates the whole head by positions * rope_theta^(-2i/e), without RoPE scaling")
  if hf_config.attention_bias != hf_config.mlp_bias:
    raise UnsupportedCheckpoint(
        f"llama config attention_bias={hf_config.attention_bias} with mlp_bias={hf_config.mlp_bias} "
        "is not supported: model.use_bias puts biases on all projections or on none")
  return ModelConfig.from_dict(dict(
      FIXED, vocab_size=hf_config.vocab_size, emb_dim=hf_config.hidden_size,
      num_heads=hf_config.num_attention_heads, num_kv_heads=hf_config.num_key_value_heads,
      head_dim=hf_config.head_dim, mlp_dim=hf_config.intermediate_size,
      num_layers=hf_config.num_hidden_layers, max_len=hf_config.max_position_embeddings,
      norm_eps=hf_config.rms_norm_eps, mlp_activation=activation(hf_config, "hidden_act"),
      rope_theta=rope["rope_theta"], use_bias=hf_config.attention_bias,
      tie_embeddings=hf_config.tie_word_embeddings, attention_dropout_rate=hf_config.attention_dropout))


def tensors(model: DecoderLM) -> list[Tensor]:
  stack = model.decoder
  out = [copy("model.embed_tokens.weight", model.token_embed.embedding)]
  for i, layer in enumerate(stack.layers):
    prefix = f"model.layers.{i}"
    attention, mlp = layer.self_attention, layer.mlp
    out += linear(f"{prefix}.self_attn.q_proj", attention.query)
    out += linear(f"{prefix}.self_attn.k_proj", attention.key)
    out += linear(f"{prefix}.self_attn.v_proj", attention.value)
    out += linear(f"{prefix}.self_attn.o_proj", attention.out)
    out += linear(f"{prefix}.mlp.gate_proj", mlp.wi)
    out += linear(f"{prefix}.mlp.up_proj", mlp.wi_linear)
    out += linear(f"{prefix}.mlp.down_proj", mlp.wo)
    out += norm(f"{prefix}.input_layernorm", layer.self_attention_norm)
    out += norm(f"{prefix}.post_attention_layernorm", layer.mlp_norm)
  out += norm("model.norm", stack.final_norm)
  return out + output_head("lm_head", model)
