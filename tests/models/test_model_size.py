"""Parameter counts and FLOPs from the config, checked against the real model.

Counts against the parameter tree; FLOPs against every dot_general in the jaxpr of
the gradient of the loss (forward plus backward), counted independently here.
"""

import math

import jax
import jax.extend
import jax.numpy as jnp
import pytest
from flax import nnx

from models.config import ModelConfig
from models.model_size import model_size, train_flops_per_sequence
from models.transformer import build_model

EMBEDDING_MODULES = ("token_embed", "position_embed", "token_type_embed", "lm_head")

CONFIGS = {
    "gpt2_like": dict(arch="decoder", norm="layernorm", use_bias=True, position="learned",
                      mlp_activation="gelu_tanh", max_len=16),
    "llama_like": dict(arch="decoder", position="rope", num_kv_heads=2, mlp_activation="silu",
                       mlp_gated=True, tie_embeddings=False),
    "bert_like": dict(arch="encoder", norm="layernorm", norm_position="post", use_bias=True,
                      position="learned", num_token_types=2, embedding_norm=True, max_len=16),
    "t5_like": dict(arch="encoder_decoder", position="relative", mlp_gated=True, tie_embeddings=False,
                    scale_attn_logits=False, num_decoder_layers=3, num_kv_heads=1, head_dim=6),
    "sinusoidal_mqa": dict(arch="decoder", position="sinusoidal", num_kv_heads=1, norm_position="post"),
    "no_positions": dict(arch="decoder", position="none", max_len=16),
}


def small(**overrides) -> ModelConfig:
  base = dict(vocab_size=64, emb_dim=32, num_heads=4, mlp_dim=48, num_layers=2)
  return ModelConfig(**{**base, **overrides})


def dot_flops(jaxpr) -> int:
  """2 * output size * contracted size, summed over every dot_general, sub-jaxprs included.

  models.layers.token_sum's products are sums over tokens written as matmuls: not counted.
  """
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and "token_sum" not in str(eqn.source_info.name_stack):
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in lhs_contract)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      total += dot_flops(sub)
  return total


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_counts_match_the_tree(name):
  cfg = small(**CONFIGS[name])
  model = build_model(cfg)
  params = nnx.state(model, nnx.Param)
  total = embedding = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    total += leaf.size
    if any(getattr(key, "key", None) in EMBEDDING_MODULES for key in path):
      embedding += leaf.size
  size = model_size(cfg)
  assert size.total_params == total
  assert size.embedding_params == embedding
  assert size.non_embedding_params == total - embedding


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_train_flops_match_the_gradient_jaxpr(name):
  # The xla kernel's jaxpr holds each matmul once; the blocked kernel recomputes scores.
  cfg = small(**CONFIGS[name], attention_kernel="xla")
  model = build_model(cfg)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  length, target_length = 8, 5
  tokens = jnp.zeros((1, length), jnp.int32)

  def loss(params):
    m = nnx.merge(graphdef, params, rest)
    if cfg.arch == "encoder_decoder":
      return m(tokens, tokens[:, :target_length]).sum()
    return m(tokens).sum()

  jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
  expected = train_flops_per_sequence(cfg, length, target_length if cfg.arch == "encoder_decoder" else None)
  assert dot_flops(jaxpr.jaxpr) == expected


def test_reference_sizes_are_the_published_ones():
  """GPT-2 small has 124.44M parameters (tied, 1024 positions, vocab 50257)."""
  gpt2 = ModelConfig(arch="decoder", vocab_size=50257, emb_dim=768, num_heads=12, mlp_dim=3072,
                     num_layers=12, max_len=1024, norm="layernorm", use_bias=True, position="learned",
                     mlp_activation="gelu_tanh")
  assert model_size(gpt2).total_params == 124_439_808
  # Kaplan et al.'s non-embedding N for the same shape: 12 * layers * d^2 plus biases and norms.
  assert model_size(gpt2).non_embedding_params == 85_056_000
