"""Evaluation of a trained run: loss, perplexity and bits per byte; few-shot rank scoring.

Bits per byte (Gao et al. 2020, The Pile, sec. 4) divide the summed loss in nats by
ln 2 times the UTF-8 bytes of the text scored, so models with different tokenizers compare.
Few-shot rank scoring (Brown et al. 2020, sec. 2.4): each option's log-likelihood after a
prompt of k solved examples; the highest wins. The summed, the per-token mean and the
calibrated (minus the option's unconditional log-likelihood) scores are all reported: the
sum favours short options, and the calibrated score asks only how much the prompt helps.
"""

from __future__ import annotations

import functools
import itertools
import math
import pathlib
import random
import re
from typing import Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from models.config import ConfigError
from t5x_like.data.documents import jsonl_objects
from t5x_like.data.loader import feature_rows
from t5x_like.data.objectives.causal_lm import CausalLM
from t5x_like.data.tokenizer import PAD_ID
from t5x_like.decoding import check_eval_mode
from t5x_like.trainer import loss_means


def _summary(totals, num_bytes: int) -> dict[str, float]:
  """The trainer's per-token figures for the summed loss terms, plus bits per byte (NaN where the
  scored targets hold no text, as loss_means gives NaN for no targets)."""
  bits = float(totals["cross_entropy"]) / math.log(2)
  return {**loss_means(totals), "bits_per_byte": bits / num_bytes if num_bytes else math.nan,
          "tokens": float(totals["weight"]), "bytes": num_bytes}


def _target_bytes(tokenizer, batch: dict[str, np.ndarray], prefix: str) -> int:
  """UTF-8 bytes of the scored targets' text, counted token by token (tokenizer.byte_lengths), so a
  character that a row boundary cuts counts once. EOS, the mask and the span-corruption sentinels
  stand for no text."""
  targets, weights = batch[f"{prefix}_target_tokens"], batch[f"{prefix}_loss_weights"]
  return int(tokenizer.byte_lengths[targets[weights > 0]].sum())


def evaluate_split(trainer, tokenizer, split: str, num_batches: int) -> dict[str, float]:
  """Loss, perplexity, token accuracy and bits per byte over the first batches of a split."""
  prefix = "encoder" if trainer.model_config.arch == "encoder" else "decoder"
  batches = list(itertools.islice(trainer.loader(split), num_batches))
  local_bytes = sum(_target_bytes(tokenizer, batch, prefix) for batch in batches)
  # The loss sums cover every process's rows; so must the bytes.
  return _summary(trainer.eval_sums(batches), int(np.sum(multihost_utils.process_allgather(np.array(local_bytes)))))


def evaluate_documents(trainer, tokenizer, texts: Sequence[str]) -> dict[str, float]:
  """The same figures for a decoder on documents (a held-out file's), each scored once and read as
  training reads one: start token, text, eos, cut into pieces of data.seq_len, packed into rows."""
  if trainer.model_config.arch != "decoder":
    raise ConfigError("evaluating a text file needs a decoder; use --split for other architectures")
  data = trainer.config.data
  records = grain.MapDataset.source([{"text": text.encode("utf-8")} for text in texts])
  rows = list(feature_rows(records, CausalLM(tokenizer, data.seq_len), seed=0, pack=data.pack, shuffle_bins=False))
  if not rows:
    raise ConfigError("there is no text to evaluate")
  # Every process makes all rows and gives its share of each global batch, as a loader would;
  # rows of padding (segment 0, weight 0) fill the last batch.
  batch_size, local = data.batch_size, data.batch_size // jax.process_count()
  padding = {name: np.zeros_like(value) for name, value in rows[0].items()}
  rows += [padding] * (-len(rows) % batch_size)
  # A prefix LM's run reads this too: plain text has no prefix, all of it is continued.
  causal = np.zeros((local, data.seq_len), bool)

  def batches():
    for start in range(0, len(rows), batch_size):
      first = start + jax.process_index() * local
      batch = {name: np.stack([row[name] for row in rows[first:first + local]]) for name in rows[0]}
      batch["decoder_causal_attention"] = causal
      yield {feature: batch[feature] for feature in trainer.features}

  return _summary(trainer.eval_sums(batches()), sum(len(text.encode("utf-8")) for text in texts))


# Few-shot rank scoring ------------------------------------------------------------------

WIDTH_BUCKET = 64


@functools.partial(nnx.jit, graph_updates=False)
def _next_token_log_probs(model, tokens, segments, prefix_mask):
  """log p(tokens[:, t + 1] | tokens[:, :t + 1]) at each position t, [options, width - 1]: one
  compiled call per shape (the model run op by op took 0.5 s an item on a tiny model), and
  the host gets these, not the whole [options, width, vocab] distribution. graph_updates=False:
  the call changes no state, so the parameters are not handed back (copied) as outputs."""
  prefix = {} if prefix_mask is None else {"prefix_mask": prefix_mask}
  log_probs = jax.nn.log_softmax(model(tokens, segment_ids=segments, **prefix), axis=-1)
  return jnp.take_along_axis(log_probs[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]


def option_log_likelihoods(model, tokenizer, prompt: str, options: list[str], *,
                           prefix_lm: bool = False) -> list[tuple[float, int]]:
  """(sum of log p(option tokens | prompt), number of option tokens) for each option; the
  prompt follows the start token, as documents do in training (an empty prompt scores the
  options unconditionally). With prefix_lm, the start token and prompt attend both ways,
  as a prefix LM's prefix did in training. The model is an nnx.Module in eval mode."""
  check_eval_mode(model)
  prompt_ids = [PAD_ID] + tokenizer.encode(prompt).tolist()
  sequences = [prompt_ids + tokenizer.encode(option).tolist() for option in options]
  width = max(len(s) for s in sequences)
  model.config.check_length(width, "a prompt with its option:")
  # Padded up to a multiple of WIDTH_BUCKET (not past the model's length), so the items of a
  # task share a few shapes and _next_token_log_probs compiles once for each (options, width);
  # pads are segment 0.
  bucket = -(-width // WIDTH_BUCKET) * WIDTH_BUCKET
  width = max(width, min(bucket, model.config.max_len))
  tokens = np.zeros((len(sequences), width), np.int32)
  segments = np.zeros_like(tokens)
  for row, sequence in enumerate(sequences):
    tokens[row, :len(sequence)] = sequence
    segments[row, :len(sequence)] = 1
  prefix_mask = np.arange(width)[None, :] < len(prompt_ids) if prefix_lm else None
  next_log_probs = np.asarray(_next_token_log_probs(model, tokens, segments, prefix_mask))
  results = []
  for row, sequence in enumerate(sequences):
    positions = range(len(prompt_ids), len(sequence))
    total = sum(float(next_log_probs[row, t - 1]) for t in positions)
    results.append((total, len(positions)))
  return results


def few_shot_score(model, tokenizer, items: list[dict], *, shots: int, seed: int = 0,
                   prefix_lm: bool = False) -> dict:
  """Accuracy of rank scoring on multiple-choice items {context, options, answer}; each item's
  examples are `shots` other items with their answers, separated by blank lines. The model
  and prefix_lm: see option_log_likelihoods."""
  if model.config.arch != "decoder":
    raise ConfigError("few-shot scoring needs a decoder")
  if not items:
    raise ConfigError("few-shot scoring got no items; the task file or --items left none")
  rng = random.Random(seed)
  correct = {"sum": 0, "per_token": 0, "calibrated": 0}
  for index, item in enumerate(items):
    others = [other for j, other in enumerate(items) if j != index]
    examples = rng.sample(others, min(shots, len(others)))
    prompt = "".join(f"{e['context']}{e['options'][e['answer']]}\n\n" for e in examples) + item["context"]
    try:
      scores = option_log_likelihoods(model, tokenizer, prompt, item["options"], prefix_lm=prefix_lm)
    except ConfigError as error:  # a learned position table too short for this item's prompt
      raise ConfigError(f"item {index + 1} with {len(examples)} shot(s): {error}; use fewer shots or shorter "
                        f"contexts") from None
    # Calibrated: log p(option | prompt) - log p(option), which removes the options' own
    # likelihood (Holtzman et al. 2021, "surface form competition"; Brown et al. 2020 sec. 2.4).
    priors = option_log_likelihoods(model, tokenizer, "", item["options"], prefix_lm=prefix_lm)
    choices = {"sum": [s for s, _ in scores], "per_token": [s / max(n, 1) for s, n in scores],
               "calibrated": [s - p for (s, _), (p, _) in zip(scores, priors)]}
    for name, values in choices.items():
      if not np.all(np.isfinite(values)):
        raise ConfigError(f"item {index + 1}'s option log-likelihoods are not finite ({values}): the model's "
                          f"weights are broken")
      best = np.flatnonzero(np.asarray(values) == np.max(values))
      correct[name] += (item["answer"] in best) / len(best)  # a tie shares the credit, not the first option
  chance = float(np.mean([1 / len(item["options"]) for item in items]))
  # An item has the others for examples: fewer items than shots + 1 give each fewer shots.
  return {"items": len(items), "shots": min(shots, len(items) - 1), "accuracy": correct["sum"] / len(items),
          "accuracy_per_token": correct["per_token"] / len(items),
          "accuracy_calibrated": correct["calibrated"] / len(items), "chance": chance}


def read_task(path: str | pathlib.Path) -> list[dict]:
  """Multiple-choice JSONL: {"context": str, "options": [str, ...], "answer": index} per line."""
  items = []
  for number, item in jsonl_objects(path):
    where = f"{path}, line {number}"
    missing = {"context", "options", "answer"} - set(item)
    if missing:
      raise ConfigError(f"{where}: missing field(s) {sorted(missing)}")
    options, answer = item["options"], item["answer"]
    if not isinstance(item["context"], str) or not isinstance(options, list) or len(options) < 2 or not all(
        isinstance(option, str) for option in options):  # one option is always ranked first
      raise ConfigError(f"{where}: context must be a string and options a list of 2 or more strings")
    if not all(options):  # no tokens: a log-likelihood of 0, which would beat every real option
      raise ConfigError(f"{where}: option {options.index('')} is empty; every option needs text")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
      raise ConfigError(f"{where}: answer {answer!r} is not an index of the options")
    if len(set(options)) < len(options):  # the same text scores the same: no ranking tells them apart
      twice = next(option for option in options if options.count(option) > 1)
      raise ConfigError(f"{where}: option {twice!r} is given twice")
    items.append(item)
  return items


SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def sentence_completion_task(paragraphs: list[str], *, size: int = 200, options: int = 4,
                             seed: int = 0) -> list[dict]:
  """Which of `options` endings completes this half sentence? Sentences of 8 or more words
  are cut in the middle; the distractors are the second halves of other sentences from the
  same texts, so every option is fluent prose and only the fit to the context tells."""
  halves = []
  for paragraph in paragraphs:
    for sentence in SENTENCE_END.split(paragraph):
      words = sentence.split()
      if len(words) >= 8:
        cut = len(words) // 2
        # The space starts the ending, as it does in running text: the tokenizer has no dummy
        # prefix, so a context ending in a space would end in a lone "▁" piece never seen in training.
        halves.append((" ".join(words[:cut]), " " + " ".join(words[cut:])))
  rng = random.Random(seed)
  rng.shuffle(halves)
  if len(halves) < size + options:
    raise ConfigError(f"only {len(halves)} sentences of 8 words or more; a task of {size} items with {options} "
                      f"options needs {size + options}")
  pool = [b for _, b in halves[size:]]
  distinct = set(pool)
  items = []
  for context, ending in halves[:size]:
    # A text that repeats a sentence could offer the true ending twice, or one distractor twice.
    if len(distinct - {ending}) < options - 1:
      raise ConfigError(f"fewer than {options - 1} distinct sentence endings other than {ending!r} "
                        f"to draw distractors from")
    distractors = rng.sample(pool, options - 1)
    while ending in distractors or len(set(distractors)) < options - 1:
      distractors = rng.sample(pool, options - 1)
    choices = distractors + [ending]
    rng.shuffle(choices)
    items.append({"context": context, "options": choices, "answer": choices.index(ending)})
  return items
