"""The `data` section of a config: its defaults, and validation that names the field."""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import ml_collections

from models.config import ConfigError
from t5x_like.data.objectives import OBJECTIVE_CLASSES, OBJECTIVES
from t5x_like.data.tokenizer import SHIPPED, absolute_tokenizer, tokenizer_path


def default_data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      dataset="austen",  # bundled name, comma-separated files/globs, or tfds:NAME (sources.py)
      data_dir="~/.cache/t5x_like/tfds",  # where local files are built as TFDS datasets
      tokenizer="austen_bpe_8k",  # a shipped tokenizer's name or a .model path
      objective="causal_lm",  # one of objectives.OBJECTIVES
      seq_len=256,  # row length of decoder-only and encoder-only objectives
      input_len=256,  # encoder-decoder (span_corruption) input length
      target_len=64,  # ... and target length
      batch_size=8,  # global: rows per step over all processes
      seed=0,  # shuffling, packing and the objectives' randomness
      pack=True,  # several examples per row (not for preference pairs)
      mlm_probability=0.15,  # mlm: share of tokens chosen (BERT)
      noise_density=0.15,  # span_corruption: share of tokens dropped (T5)
      mean_noise_span_length=3.0,  # span_corruption: mean dropped span (T5)
      worker_threads=0,  # extra threads tokenizing records; 0: the prefetch thread does it
                         # (fastest on 2 cores: SentencePiece gains little from threads)
      prefetch_batches=2,  # batches prepared ahead of the trainer
  ))


def resolve_data_config(config: ml_collections.ConfigDict | dict, process_count: int = 1
                        ) -> ml_collections.ConfigDict:
  """The defaults updated by `config` (experiment files set only what differs), validated."""
  resolved = default_data_config()
  unknown = sorted(set(config) - set(resolved))
  if unknown:
    raise ConfigError(f"data.{unknown[0]} is not a data field; fields: {sorted(resolved)}")
  for name in config:
    try:
      resolved[name] = config[name]
    except TypeError as error:
      raise ConfigError(f"data.{name}={config[name]!r}: {error}") from None
  _validate(resolved, process_count)
  return resolved


def absolute_paths(data: Mapping[str, Any]) -> dict[str, Any]:
  """The data section (or a loader's identity) with the paths it holds made absolute: a workdir's
  config.json then names the same files wherever eval or decode runs, and a position that a run
  from before saved with relative names compares equal where that run ran. A data_dir under ~
  stays so: each user's own cache."""
  from t5x_like.data.sources import absolute_dataset  # tfds: not for `info`, which reads only the defaults
  absolute = {"dataset": absolute_dataset, "tokenizer": absolute_tokenizer,
              "data_dir": lambda path: path if path.startswith("~") else str(pathlib.Path(path).absolute())}
  return {name: absolute[name](value) if name in absolute else value for name, value in data.items()}


def _validate(config: ml_collections.ConfigDict, process_count: int) -> None:
  if config.objective not in OBJECTIVES:
    raise ConfigError(f"data.objective={config.objective!r} is not one of {OBJECTIVES}")
  lengths = tuple(name for name in OBJECTIVE_CLASSES[config.objective].config_fields if name.endswith("_len"))
  for name in lengths + ("batch_size",):
    if config[name] <= 0:
      raise ConfigError(f"data.{name}={config[name]} must be a positive integer")
  for name in ("worker_threads", "prefetch_batches"):
    if config[name] < 0:
      raise ConfigError(f"data.{name}={config[name]} must be 0 or more")
  if config.batch_size % process_count:
    raise ConfigError(f"data.batch_size={config.batch_size} does not divide over "
                      f"{process_count} processes; make it a multiple of {process_count}")
  if not 0 <= config.seed < 2**32:
    raise ConfigError(f"data.seed={config.seed} must be in [0, 2**32)")
  for name in ("mlm_probability", "noise_density"):
    if not 0 < config[name] < 1:
      raise ConfigError(f"data.{name}={config[name]} must lie strictly between 0 and 1")
  if config.mean_noise_span_length < 1:
    raise ConfigError(f"data.mean_noise_span_length={config.mean_noise_span_length} must be at least 1")
  if config.pack and config.objective == "preference":
    raise ConfigError("data.pack=True: preference pairs are never packed (one pair per row); "
                      "set data.pack=False")
  if not config.dataset.strip():
    raise ConfigError("data.dataset is empty; name a bundled corpus, files, or tfds:NAME")
  if tokenizer_path(config.tokenizer) is None:
    raise ConfigError(f"data.tokenizer={config.tokenizer!r} is neither a shipped tokenizer "
                      f"({', '.join(SHIPPED)}) nor an existing .model file")
