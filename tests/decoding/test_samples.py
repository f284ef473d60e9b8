"""Samples and decode inputs framed as training framed them: an encoder fills its [MASK] with an
ordinary piece, an encoder-decoder's prompt marks the span it fills with a sentinel."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import ConfigError, ModelConfig
from models.transformer import build_model
from t5x_like.data.documents import DataError
from t5x_like.data.tokenizer import EOS_ID, PAD_ID, load_tokenizer
from t5x_like.decoding import DecodeConfig, generate
from t5x_like.samples import prompt_ids, sample_room, sample_texts


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer("austen_bpe_8k")


@pytest.fixture(scope="module")
def encoder():
  config = ModelConfig(arch="encoder", vocab_size=8192, emb_dim=32, num_heads=2, mlp_dim=64, num_layers=1,
                       position="learned", max_len=64, use_bias=True, norm="layernorm", norm_position="post")
  model = build_model(config, seed=0)
  model.eval()
  return model


def test_an_encoder_fills_its_mask_with_an_ordinary_piece_never_a_special_id(encoder, tokenizer):
  tokens = tokenizer.encode("Mr. Darcy").tolist()
  masked = tokens[:-1] + [tokenizer.mask_id, EOS_ID]  # the document's pieces, then eos, as trained
  bias = encoder.output_bias[...]
  for special in (tokenizer.mask_id, tokenizer.sentinel_id(0), EOS_ID, PAD_ID):
    encoder.output_bias[...] = bias.at[special].set(100.0)  # the special id is the top logit
    logits = np.asarray(encoder(np.array([masked], np.int32)))[0, len(tokens) - 1]
    ordinary = np.arange(tokenizer.vocab_size)
    ordinary = ordinary[(ordinary >= 3) & (ordinary < tokenizer.mask_id)]
    expected = tokenizer.decode(tokens[:-1] + [int(ordinary[np.argmax(logits[ordinary])])])
    assert int(np.argmax(logits)) == special
    assert sample_texts(encoder, tokenizer, ["Mr. Darcy"]) == [(tokenizer.decode(masked[:-1]), expected)]
  encoder.output_bias[...] = bias


def test_an_encoder_with_dropout_on_is_named_not_sampled_at_random(encoder, tokenizer):
  training = build_model(encoder.config.replace(dropout_rate=0.5), seed=0)
  with pytest.raises(ConfigError, match=r"training mode, with dropout on: call model.eval\(\)"):
    sample_texts(training, tokenizer, ["Mr. Darcy"])


def test_a_decoder_never_generates_the_mask_or_a_sentinel_it_never_trained_on(tokenizer):
  config = ModelConfig(arch="decoder", vocab_size=8192, emb_dim=32, num_heads=2, mlp_dim=64, num_layers=1)
  model = build_model(config, seed=0)
  model.eval()
  plain = sample_texts(model, tokenizer, ["Mr. Darcy"], max_new_tokens=4)
  model.output_bias = nnx.Param(jnp.zeros(8192).at[tokenizer.mask_id:].set(100.0))  # above every piece
  prompt = np.array([tokenizer.encode("Mr. Darcy").tolist()], np.int32)
  assert generate(model, prompt, DecodeConfig(max_new_tokens=1))[0][0] >= tokenizer.mask_id  # unless limited
  assert sample_texts(model, tokenizer, ["Mr. Darcy"], max_new_tokens=4) == plain


def test_an_encoder_decoder_never_generates_the_mask_but_may_write_sentinels(tokenizer):
  """The mask sits below the sentinels its targets hold: vocab_limit cannot cut it off, excluded_ids does."""
  config = ModelConfig(arch="encoder_decoder", vocab_size=tokenizer.vocab_size, emb_dim=32, num_heads=2, mlp_dim=64,
                       num_layers=1, position="relative")
  model = build_model(config, seed=0)
  model.eval()
  model.output_bias = nnx.Param(jnp.zeros(tokenizer.vocab_size).at[tokenizer.mask_id].set(100.0))
  inputs = [tokenizer.encode("Mr. Darcy").tolist() + [tokenizer.sentinel_id(0), 1]]
  assert generate(model, [[0]], DecodeConfig(max_new_tokens=1), encoder_inputs=inputs)[0] == [tokenizer.mask_id]
  (_, text), = sample_texts(model, tokenizer, ["Mr. Darcy"], max_new_tokens=4)
  assert "<mask>" not in text
  model.output_bias[...] = jnp.zeros(tokenizer.vocab_size).at[tokenizer.sentinel_id(1)].set(100.0)
  assert "<extra_id_1>" in sample_texts(model, tokenizer, ["Mr. Darcy"], max_new_tokens=4)[0][1]


def test_an_encoder_decoder_prompt_marks_its_spans_or_gets_sentinel_0_at_its_end(tokenizer):
  mr, darcy = tokenizer.encode("Mr.").tolist(), tokenizer.encode(" Darcy").tolist()
  assert prompt_ids(tokenizer, "encoder_decoder", "Mr. Darcy") == mr + darcy + [tokenizer.sentinel_id(0)]
  assert prompt_ids(tokenizer, "encoder_decoder", "Mr.<extra_id_3> Darcy<extra_id_0>") == (
      mr + [tokenizer.sentinel_id(3)] + darcy + [tokenizer.sentinel_id(0)])
  assert tokenizer.decode(prompt_ids(tokenizer, "encoder_decoder", "Mr.<extra_id_3> Darcy")) == "Mr.<extra_id_3> Darcy"
  assert prompt_ids(tokenizer, "decoder", "Mr.<extra_id_3>") == tokenizer.encode("Mr.<extra_id_3>").tolist()
  with pytest.raises(DataError, match="<extra_id_100> in 'a<extra_id_100>' names no sentinel"):
    prompt_ids(tokenizer, "encoder_decoder", "a<extra_id_100>")


def test_samples_of_a_learned_position_table_stop_where_it_ends(tokenizer):
  """40 new tokens after the default prompts would pass a 16-position table: they stop at it; a
  prompt with no room left is named (the train command checks before training)."""
  config = ModelConfig(arch="decoder", vocab_size=8192, emb_dim=32, num_heads=2, mlp_dim=64, num_layers=1,
                       position="learned", max_len=16)
  model = build_model(config, seed=0)
  model.eval()
  longest = max(len(tokenizer.encode(p)) for p in ("It is a truth universally acknowledged", "Mr. Darcy", "She was"))
  room = 16 - (longest + 1)
  assert sample_room(config, tokenizer) == room < 40
  for prompt, text in sample_texts(model, tokenizer):
    # The same continuation one prompt at a time: start token, pieces, then `room` greedy tokens
    # (fewer only at EOS) with the samples' mild repetition penalty and no mask or sentinel.
    [new] = generate(model, [[PAD_ID] + tokenizer.encode(prompt).tolist()],
                     DecodeConfig(max_new_tokens=room, repetition_penalty=1.2, vocab_limit=tokenizer.mask_id))
    assert text == prompt + tokenizer.decode(new) and (len(new) == room or new[-1] == EOS_ID)
  assert sample_room(config.replace(position="rope"), tokenizer) == 40
  words = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition"
  fits = next(words[:i] for i in range(len(words), 0, -1) if len(tokenizer.encode(words[:i])) == 14)
  assert sample_room(config, tokenizer, [fits]) == 1  # start token, 14 ids, one new token: 16
  with pytest.raises(ConfigError, match=f"the longest sample prompt with its start or end token "
                                        f"{len(tokenizer.encode(words)) + 2} exceeds model.max_len=16"):
    sample_room(config, tokenizer, [fits, words])
