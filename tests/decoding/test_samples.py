"""Samples and decode inputs framed as training framed them: an encoder fills its [MASK] with an
ordinary piece, an encoder-decoder's prompt marks the span it fills with a sentinel."""

import numpy as np
import pytest

from models.config import ModelConfig
from models.transformer import build_model
from t5x_like.data.documents import DataError
from t5x_like.data.tokenizer import EOS_ID, PAD_ID, load_tokenizer
from t5x_like.samples import prompt_ids, sample_texts


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


def test_an_encoder_decoder_prompt_marks_its_spans_or_gets_sentinel_0_at_its_end(tokenizer):
  mr, darcy = tokenizer.encode("Mr.").tolist(), tokenizer.encode(" Darcy").tolist()
  assert prompt_ids(tokenizer, "encoder_decoder", "Mr. Darcy") == mr + darcy + [tokenizer.sentinel_id(0)]
  assert prompt_ids(tokenizer, "encoder_decoder", "Mr.<extra_id_3> Darcy<extra_id_0>") == (
      mr + [tokenizer.sentinel_id(3)] + darcy + [tokenizer.sentinel_id(0)])
  assert tokenizer.decode(prompt_ids(tokenizer, "encoder_decoder", "Mr.<extra_id_3> Darcy")) == "Mr.<extra_id_3> Darcy"
  assert prompt_ids(tokenizer, "decoder", "Mr.<extra_id_3>") == tokenizer.encode("Mr.<extra_id_3>").tolist()
  with pytest.raises(DataError, match="<extra_id_100> in 'a<extra_id_100>' names no sentinel"):
    prompt_ids(tokenizer, "encoder_decoder", "a<extra_id_100>")
