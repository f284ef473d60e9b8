"""Text samples from a model after training: the quickest check that it learned something."""

from __future__ import annotations

import numpy as np

from t5x_like.data.tokenizer import EOS_ID, FIRST_PIECE_ID, PAD_ID
from t5x_like.decoding import DecodeConfig, check_eval_mode, fetched, generate

DEFAULT_PROMPTS = ("It is a truth universally acknowledged", "Mr. Darcy", "She was")
NEW_TOKENS = 40


def prompt_ids(tokenizer, arch: str, prompt: str) -> list[int]:
  """A prompt's ids. An encoder-decoder's (span corruption trained it) read `<extra_id_N>` written
  in the text as that sentinel, and one without a sentinel gets sentinel 0 at its end: the span
  to fill, as every input it trained on marks at least one."""
  if arch != "encoder_decoder":
    return tokenizer.encode(prompt).tolist()
  ids = tokenizer.encode_marked(prompt).tolist()
  if not any(i > tokenizer.mask_id for i in ids):
    ids.append(tokenizer.sentinel_id(0))
  return ids


def generation_inputs(arch: str, ids: list[list[int]]) -> tuple[list[list[int]], list[list[int]] | None]:
  """(decoder prompts, encoder inputs or None) for `generate`, framed as in training: a
  decoder's documents start with the start token (PAD_ID); an encoder-decoder reads the
  ids and EOS, and its decoder starts from the start token alone."""
  if arch == "encoder_decoder":
    return [[PAD_ID]] * len(ids), [i + [EOS_ID] for i in ids]
  return [[PAD_ID] + i for i in ids], None


def sample_room(model_config, tokenizer, prompts=None, max_new_tokens: int = NEW_TOKENS) -> int:
  """The new tokens the samples take: max_new_tokens, or what a learned position table leaves
  after the longest prompt. A prompt it cannot hold is an error, raised before training by `train`."""
  arch = model_config.arch
  longest = max(len(prompt_ids(tokenizer, arch, p)) for p in list(prompts or DEFAULT_PROMPTS)) + 1  # start or eos
  # A decoder's prompt must leave room for one new token; an encoder reads the prompt alone.
  model_config.check_length(longest + (arch == "decoder"), "the longest sample prompt with its start or end token")
  if model_config.position != "learned" or arch == "encoder":
    return max_new_tokens
  return min(max_new_tokens, model_config.max_len - (1 if arch == "encoder_decoder" else longest))


def vocab_limit(tokenizer, arch: str) -> int:
  """How many leading ids generation may pick: a decoder's targets never hold the mask nor the
  sentinels, the tokenizer's last ids (greedy decoding picked `<extra_id_9>` once a small model put
  it first); an encoder-decoder's hold the sentinels."""
  return tokenizer.mask_id if arch == "decoder" else tokenizer.vocab_size


def excluded_ids(tokenizer, arch: str) -> tuple[int, ...]:
  """Ids below vocab_limit that generation may not pick: an encoder-decoder's mask, which its
  targets never hold and which sits just below the sentinels they do."""
  return (tokenizer.mask_id,) if arch == "encoder_decoder" else ()


def sample_texts(model, tokenizer, prompts=None, *, max_new_tokens: int = NEW_TOKENS,
                 prefix_lm: bool = False) -> list[tuple[str, str]]:
  """(prompt, text) pairs by architecture: a decoder continues the prompt greedily (a prefix
  LM reads it as its prefix); an encoder-decoder fills the span its prompt marks (prompt_ids);
  an encoder fills a [MASK] put in place of the prompt's last token, with an ordinary piece.
  A model split over processes samples on all of them: each calls this alike."""
  check_eval_mode(model)  # an encoder's prediction below runs the model directly
  prompts = list(prompts or DEFAULT_PROMPTS)
  arch = model.config.arch
  ids = [prompt_ids(tokenizer, arch, p) for p in prompts]
  max_new_tokens = sample_room(model.config, tokenizer, prompts, max_new_tokens)
  # Greedy, with a mild repetition penalty: small models otherwise loop on "and, and, ...".
  config = DecodeConfig(max_new_tokens=max_new_tokens, repetition_penalty=1.2,
                        vocab_limit=vocab_limit(tokenizer, arch), excluded_ids=excluded_ids(tokenizer, arch),
                        prefix_lm=prefix_lm)
  if arch == "decoder":
    outputs = generate(model, generation_inputs(arch, ids)[0], config)
    return [(p, p + tokenizer.decode(o)) for p, o in zip(prompts, outputs)]
  if arch == "encoder_decoder":
    decoder_prompts, inputs = generation_inputs(arch, ids)
    outputs = generate(model, decoder_prompts, config, encoder_inputs=inputs)
    return [(tokenizer.decode(i), tokenizer.decode(o)) for i, o in zip(ids, outputs)]
  results = []
  for tokens in ids:
    # A document as masked LM trained on it: its pieces, then eos; the mask is never a target,
    # nor are eos, pad, unk or the sentinels.
    masked = tokens[:-1] + [tokenizer.mask_id]
    logits = fetched(model(np.array([masked + [EOS_ID]], np.int32)))[0, len(masked) - 1]
    predicted = FIRST_PIECE_ID + int(np.argmax(logits[FIRST_PIECE_ID:tokenizer.mask_id]))
    results.append((tokenizer.decode(masked), tokenizer.decode(tokens[:-1] + [predicted])))
  return results
