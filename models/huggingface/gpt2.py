"""GPT-2 (Radford et al. 2019) as our DecoderLM: GPT2LMHeadModel's checkpoint layout.

Pre-norm LayerNorm blocks with biases on every projection, learned positions and a
tied output embedding. GPT-2's Conv1D stores Linear weights as [in, out], and c_attn
holds query, key and value side by side in one [d, 3d] matrix, which we split.
"""

from __future__ import annotations

import numpy as np

from models.config import ModelConfig
from models.huggingface.common import Tensor, activation, conv1d, copy, norm, output_head, require
from models.transformer import DecoderLM

HF_CLASS = "GPT2LMHeadModel"

# What every GPT-2 is in our terms; export recognises the family by these fields.
FIXED = dict(arch="decoder", norm="layernorm", norm_position="pre", embedding_norm=False,
             position="learned", mlp_gated=False, use_bias=True, num_kv_heads=None,
             head_dim=None, num_token_types=0)


def config_from_hf(hf_config) -> ModelConfig:
  """resid_pdrop is our dropout_rate, embeddings included (GPT-2's embd_pdrop is the same 0.1)."""
  require(hf_config, "scale_attn_by_inverse_layer_idx", False,
          "it divides layer i's attention logits by i + 1")
  require(hf_config, "add_cross_attention", False, "DecoderLM has no cross-attention")
  return ModelConfig.from_dict(dict(
      FIXED, vocab_size=hf_config.vocab_size, emb_dim=hf_config.n_embd, num_heads=hf_config.n_head,
      mlp_dim=hf_config.n_inner or 4 * hf_config.n_embd, num_layers=hf_config.n_layer,
      max_len=hf_config.n_positions, norm_eps=hf_config.layer_norm_epsilon,
      mlp_activation=activation(hf_config, "activation_function"),
      scale_attn_logits=hf_config.scale_attn_weights, tie_embeddings=hf_config.tie_word_embeddings,
      dropout_rate=hf_config.resid_pdrop, attention_dropout_rate=hf_config.attn_pdrop, final_dropout=False))


def tensors(model: DecoderLM) -> list[Tensor]:
  stack = model.decoder
  out = [copy("transformer.wte.weight", model.token_embed.embedding),
         copy("transformer.wpe.weight", stack.position_embed.embedding)]
  for i, layer in enumerate(stack.layers):
    prefix = f"transformer.h.{i}"
    attention = layer.self_attention
    out += norm(f"{prefix}.ln_1", layer.self_attention_norm)
    out += _fused_qkv(f"{prefix}.attn.c_attn", attention)
    out += conv1d(f"{prefix}.attn.c_proj", attention.out)
    out += norm(f"{prefix}.ln_2", layer.mlp_norm)
    out += conv1d(f"{prefix}.mlp.c_fc", layer.mlp.wi)
    out += conv1d(f"{prefix}.mlp.c_proj", layer.mlp.wo)
  out += norm("transformer.ln_f", stack.final_norm)
  return out + output_head("lm_head", model)


def _fused_qkv(prefix: str, attention) -> list[Tensor]:
  """c_attn weight [d, 3 * h * e] and bias [3 * h * e] <-> query, key, value [d, h, e], [h, e]."""
  dense = (attention.query, attention.key, attention.value)
  emb_dim = attention.query.kernel.shape[0]
  return [_fused(f"{prefix}.weight", tuple(d.kernel for d in dense), lead=(emb_dim,)),
          _fused(f"{prefix}.bias", tuple(d.bias for d in dense), lead=())]


def _fused(name: str, params, lead: tuple[int, ...]) -> Tensor:
  def to_ours(fused):
    return tuple(part.reshape(p.shape) for part, p in zip(np.split(fused, 3, axis=-1), params))

  def to_hf(*parts):
    return np.concatenate([part.reshape(*lead, -1) for part in parts], axis=-1)

  return Tensor(name, params, to_ours, to_hf)
