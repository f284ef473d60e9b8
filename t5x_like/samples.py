"""Text samples from a model after training: the quickest check that it learned something."""

from __future__ import annotations

import numpy as np

from t5x_like.data.tokenizer import EOS_ID, PAD_ID
from t5x_like.decoding import DecodeConfig, generate

DEFAULT_PROMPTS = ("It is a truth universally acknowledged", "Mr. Darcy", "She was")


def generation_inputs(arch: str, ids: list[list[int]]) -> tuple[list[list[int]], list[list[int]] | None]:
  """(decoder prompts, encoder inputs or None) for `generate`, framed as in training: a
  decoder's documents start with the start token (PAD_ID); an encoder-decoder reads the
  ids and EOS, and its decoder starts from the start token alone."""
  if arch == "encoder_decoder":
    return [[PAD_ID]] * len(ids), [i + [EOS_ID] for i in ids]
  return [[PAD_ID] + i for i in ids], None


def sample_texts(model, tokenizer, prompts=None, *, max_new_tokens: int = 40,
                 prefix_lm: bool = False) -> list[tuple[str, str]]:
  """(prompt, text) pairs by architecture: a decoder continues the prompt greedily (a prefix
  LM reads it as its prefix); an encoder-decoder fills a span corruption sentinel appended
  to the prompt; an encoder fills a [MASK] put in place of the prompt's last token."""
  prompts = list(prompts or DEFAULT_PROMPTS)
  arch = model.config.arch
  ids = [tokenizer.encode(p).tolist() for p in prompts]
  # Greedy, with a mild repetition penalty: small models otherwise loop on "and, and, ...".
  config = DecodeConfig(max_new_tokens=max_new_tokens, repetition_penalty=1.2, vocab_limit=tokenizer.vocab_size,
                        prefix_lm=prefix_lm)
  if arch == "decoder":
    outputs = generate(model, generation_inputs(arch, ids)[0], config)
    return [(p, p + tokenizer.decode(o)) for p, o in zip(prompts, outputs)]
  if arch == "encoder_decoder":
    decoder_prompts, inputs = generation_inputs(arch, [i + [tokenizer.sentinel_id(0)] for i in ids])
    outputs = generate(model, decoder_prompts, config, encoder_inputs=inputs)
    return [(p + " <extra_id_0>", tokenizer.decode(o)) for p, o in zip(prompts, outputs)]
  results = []
  for prompt, tokens in zip(prompts, ids):
    masked = np.array([tokens[:-1] + [tokenizer.mask_id]], np.int32)
    predicted = int(np.argmax(np.asarray(model(masked))[0, -1, :tokenizer.vocab_size]))
    results.append((tokenizer.decode(masked[0]), tokenizer.decode(tokens[:-1] + [predicted])))
  return results
