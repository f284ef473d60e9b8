"""HF checkpoints: our logits match transformers' on tiny random models, and export round-trips.

Nothing downloads: each HF model is built from a small config with a fixed seed, its
1-D parameters (norm scales and biases, zero or one at init) perturbed so that they
are actually checked.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch  # test dependencies (setup.py's "test" extra): a broken install fails, not skips
import transformers

from models.config import ModelConfig
from models.huggingface import UnsupportedCheckpoint, common, config_from_hf, export_to_hf, import_from_hf
from models.huggingface import gpt2 as gpt2_family
from models.layers import relative_position_bucket
from models.transformer import build_model

VOCAB, LENGTH, PADDED_LENGTH = 128, 12, 7
TOLERANCE = 1e-4
SMALL = dict(vocab_size=VOCAB)
# Wider than the default 0.02 so logits are O(1-10) and the tolerance means something.
WIDE = dict(initializer_range=0.2)


def perturb(hf_model):
  """Norm scales to 1 + noise, biases to noise: init leaves them at one and zero."""
  with torch.no_grad():
    for param in hf_model.parameters():
      if param.ndim == 1:
        param.add_(0.1 * torch.randn_like(param))
  return hf_model.eval()


def gpt2():
  config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                   eos_token_id=0, **SMALL, **WIDE)
  return transformers.GPT2LMHeadModel(config)


def llama(**overrides):
  config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=128, num_hidden_layers=2, rms_norm_eps=1e-5,
                                    rope_theta=500.0, **SMALL, **WIDE, **overrides)
  return transformers.LlamaForCausalLM(config)


def bert():
  config = transformers.BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                   num_hidden_layers=2, max_position_embeddings=64, **SMALL, **WIDE)
  return transformers.BertForMaskedLM(config)


def t5(feed_forward_proj="gated-gelu", untie=True):
  """v1.1 (tie_word_embeddings=False: unscaled decoder outputs), d_kv * heads != d_model.

  transformers 5 still ties lm_head to the shared table when built from a config, so
  `untie` gives it its own, as v1.1 checkpoints have.
  """
  config = transformers.T5Config(d_model=64, d_kv=8, num_heads=4, d_ff=96, num_layers=2,
                                 num_decoder_layers=3, feed_forward_proj=feed_forward_proj,
                                 tie_word_embeddings=False, relative_attention_num_buckets=8,
                                 relative_attention_max_distance=16, **SMALL)
  model = transformers.T5ForConditionalGeneration(config)
  if untie:
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
  return model


MODELS = {
    "gpt2": gpt2,
    "llama": llama,
    "llama_tied_biases": lambda: llama(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "bert": bert,
    "t5": t5,
    "t5_tied_relu": lambda: t5("relu", untie=False),
}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
  torch.manual_seed(0)
  hf_model = perturb(MODELS[request.param]())
  return hf_model, import_from_hf(hf_model)


def inputs(seed, length):
  """Random tokens [2, length] and an HF attention mask whose second row is right-padded."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (2, length))
  mask = np.ones((2, length), np.int64)
  mask[1, PADDED_LENGTH:] = 0
  return tokens, mask


def test_logits_match_on_a_right_padded_batch(pair):
  hf_model, model = pair
  tokens, mask = inputs(1, LENGTH)
  hf_kwargs = dict(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask))
  if model.config.arch == "encoder_decoder":
    targets, target_mask = inputs(2, LENGTH - 2)
    hf_kwargs.update(decoder_input_ids=torch.from_numpy(targets),
                     decoder_attention_mask=torch.from_numpy(target_mask))
    ours = model(tokens, targets, encoder_segment_ids=mask, decoder_segment_ids=target_mask)
    valid = target_mask.astype(bool)
  elif model.config.arch == "encoder":
    token_types = np.random.default_rng(3).integers(0, 2, tokens.shape)
    hf_kwargs.update(token_type_ids=torch.from_numpy(token_types))
    ours = model(tokens, segment_ids=mask, token_type_ids=token_types)
    valid = mask.astype(bool)
  else:
    ours = model(tokens, segment_ids=mask)
    valid = mask.astype(bool)
  with torch.no_grad():
    theirs = hf_model(**hf_kwargs).logits.numpy()
  assert ours.shape == theirs.shape
  error = np.max(np.abs(np.asarray(ours)[valid] - theirs[valid]))
  assert error < TOLERANCE, f"max abs logit difference {error:.2e}"


def test_export_reproduces_the_state_dict(pair):
  hf_model, model = pair
  reference = {name: value.numpy() for name, value in hf_model.state_dict().items()}
  exported = export_to_hf(model)
  assert list(exported) == list(reference)
  for name, value in reference.items():
    assert exported[name].dtype == value.dtype and exported[name].shape == value.shape, name
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  hf_model.load_state_dict({name: torch.from_numpy(value) for name, value in exported.items()})


def test_export_of_bfloat16_parameters_loads_into_torch(pair):
  hf_model, _ = pair
  exported = export_to_hf(import_from_hf(hf_model, param_dtype="bfloat16"))
  for name, value in hf_model.state_dict().items():
    rounded = value.to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(torch.from_numpy(exported[name]).numpy(), rounded, err_msg=name)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 40), (64, 256)])
def test_relative_position_buckets_are_t5s_at_every_distance(bidirectional, num_buckets, max_distance):
  """Against transformers' T5 bucketing (key - query, as ours), over the exact range, the whole
  log-spaced range and past max_distance: a rounding in place of T5's floor would show."""
  relative = np.arange(-3 * max_distance, 3 * max_distance + 1)
  theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
      torch.from_numpy(relative), bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
  ours = relative_position_bucket(jnp.asarray(relative), bidirectional=bidirectional, num_buckets=num_buckets,
                                  max_distance=max_distance)
  np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_config_maps_eps_theta_activation_and_heads():
  cfg = config_from_hf(transformers.LlamaConfig(hidden_size=64, num_attention_heads=4,
                                                num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-5,
                                                rope_theta=5e5, tie_word_embeddings=True))
  assert (cfg.norm, cfg.norm_eps, cfg.rope_theta, cfg.mlp_activation, cfg.mlp_gated) == (
      "rmsnorm", 1e-5, 5e5, "silu", True)
  assert (cfg.kv_heads, cfg.dim_per_head, cfg.tie_embeddings) == (1, 32, True)
  cfg = config_from_hf(transformers.BertConfig(hidden_act="gelu_new", layer_norm_eps=1e-7, type_vocab_size=3))
  assert (cfg.norm_position, cfg.norm_eps, cfg.mlp_activation, cfg.num_token_types) == (
      "post", 1e-7, "gelu_tanh", 3)
  assert not config_from_hf(transformers.GPT2Config(scale_attn_weights=False)).scale_attn_logits
  # GPT-2's MLP width: n_inner where set, else 4 x n_embd.
  assert config_from_hf(transformers.GPT2Config(n_embd=64, n_head=4, n_inner=40)).mlp_dim == 40
  assert config_from_hf(transformers.GPT2Config(n_embd=64, n_head=4)).mlp_dim == 256
  # Dropout: T5 drops in all four places; GPT-2 and BERT name each rate, with no final dropout; LLaMA
  # drops only probabilities.
  def dropouts(cfg):
    return cfg.dropout_rate, cfg.attention_dropout_rate, cfg.mlp_dropout_rate, cfg.final_dropout
  assert dropouts(config_from_hf(transformers.LlamaConfig(attention_dropout=0.05)))[:3] == (0.0, 0.05, 0.0)
  assert dropouts(config_from_hf(transformers.GPT2Config(resid_pdrop=0.1, attn_pdrop=0.2))) == (0.1, 0.2, 0.0, False)
  assert dropouts(config_from_hf(transformers.BertConfig(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.3))
                  ) == (0.1, 0.3, 0.0, False)
  assert dropouts(config_from_hf(transformers.T5Config(dropout_rate=0.15, tie_word_embeddings=False))
                  ) == (0.15, 0.15, 0.15, True)


@pytest.mark.parametrize("config_class, options, message", [
    ("GPT2Config", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("GPT2Config", {"activation_function": "gelu_fast"}, "activation_function='gelu_fast'"),
    ("LlamaConfig", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
     "RoPE scaling"),
    ("LlamaConfig", {"attention_bias": True}, "attention_bias=True with mlp_bias=False"),
    ("BertConfig", {"is_decoder": True}, "is_decoder"),
    ("T5Config", {}, "scale_decoder_outputs=True"),  # original T5: tie_word_embeddings not False
    ("RobertaConfig", {}, "model_type='roberta'"),
])
def test_unrepresentable_options_are_rejected(config_class, options, message):
  hf_config = getattr(transformers, config_class)(**options)
  with pytest.raises(UnsupportedCheckpoint, match=message):
    config_from_hf(hf_config)


def test_overrides_that_would_change_the_weights_are_refused_and_shapes_checked_before_reshaping():
  hf_model = gpt2()
  # Same sizes, other heads: a reshape would load every projection in the wrong layout.
  for overrides in (dict(num_heads=2), dict(tie_embeddings=False), dict(mlp_dim=64)):
    with pytest.raises(UnsupportedCheckpoint, match=rf"cannot override \['{next(iter(overrides))}'\]"):
      import_from_hf(hf_model, **overrides)
  narrow = build_model(config_from_hf(hf_model.config).replace(mlp_dim=64))
  with pytest.raises(UnsupportedCheckpoint, match=r"transformer\.h\.0\.mlp\.c_fc\.weight has shape \(64, 256\); "
                                                  r"our parameters \[\(64, 64\)\] hold shape \(64, 64\)"):
    common.load(narrow, gpt2_family.tensors(narrow), common.hf_state_dict(hf_model))


def test_export_takes_default_heads_spelled_out():
  """num_kv_heads = num_heads and head_dim = emb_dim / num_heads build the same weights as None."""
  fields = dict(arch="decoder", norm="layernorm", position="learned", use_bias=True, vocab_size=16, emb_dim=8,
                num_heads=2, mlp_dim=16, num_layers=1, max_len=8)
  default = export_to_hf(build_model(ModelConfig(**fields), seed=1))
  spelled = export_to_hf(build_model(ModelConfig(**fields, num_kv_heads=2, head_dim=4), seed=1))
  assert default.keys() == spelled.keys()
  for name in default:
    np.testing.assert_array_equal(default[name], spelled[name], err_msg=name)


def test_export_rejects_a_config_no_family_has():
  model = build_model(ModelConfig(arch="decoder", position="sinusoidal", vocab_size=16, emb_dim=8,
                                  num_heads=2, mlp_dim=16, num_layers=1, max_len=8))
  with pytest.raises(UnsupportedCheckpoint, match="matches no Hugging Face family"):
    export_to_hf(model)


def test_export_of_a_bert_like_model_without_token_types_names_the_field():
  model = build_model(ModelConfig(arch="encoder", norm="layernorm", norm_position="post", embedding_norm=True,
                                  position="learned", mlp_gated=False, use_bias=True, mlm_head_transform=True,
                                  num_token_types=0, vocab_size=16, emb_dim=8, num_heads=2, mlp_dim=16,
                                  num_layers=1, max_len=8))
  with pytest.raises(UnsupportedCheckpoint, match="always has token type embeddings; .* model.num_token_types=0"):
    export_to_hf(model)
