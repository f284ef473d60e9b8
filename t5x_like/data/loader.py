"""The grain pipeline a trainer iterates:
`make_loader(config.data, split, process_index=..., process_count=...)`.

  records of the split (tfds data source)
  -> this process's share: records process_index, process_index + process_count, ...
     (each process reads only its own records; the shares are disjoint and cover the split)
  -> shuffled (train only; a new order each epoch, a seed per process), repeated without end
  -> objective.examples, seeded by (seed, process, split, position), in the prefetch thread
     or on `worker_threads` more
  -> flattened (a document longer than a row gives several examples; `stats()` counts them)
  -> packed first-fit into rows (grain.experimental.FirstFitPackIterDataset; 3.4% padding
     for causal LM on Austen at seq_len 256), or padded, one example per row
  -> objective.features -> batches of batch_size / process_count rows
  -> prefetched `prefetch_batches` ahead on a background thread

Both splits repeat, so a trainer may draw any number of batches and every process yields
the same number. The position, `get_state()`, is a JSON-serialisable dict the trainer
stores in its checkpoint; `set_state()` makes a fresh loader yield exactly the batches the
uninterrupted one would have, whatever the thread counts.
"""

from __future__ import annotations

import itertools
import json
import weakref
from typing import Any, Callable

import grain
import ml_collections
import numpy as np

from models.config import ConfigError
from t5x_like.data import sources
from t5x_like.data.config import absolute_paths, resolve_data_config
from t5x_like.data.objectives import Objective, make_objective
from t5x_like.data.objectives.features import pad_example
from t5x_like.data.tokenizer import load_tokenizer

# Rows packed at once: more bins waste fewer tokens on padding but hold more examples in memory.
PACKING_BINS = 32


class _Flatten(grain.experimental.FlatMapTransform):
  """A record's list of examples -> the examples (grain's iterator version has no fan-out limit)."""

  def flat_map(self, examples):
    return examples


def process_share(records: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
  """Records process_index, process_index + process_count, ...: disjoint shares covering all."""
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} is not in [0, process_count={process_count})")
  return records[process_index::process_count]


def ordered_share(records: grain.MapDataset, split: str, seed: int, process_index: int,
                  process_count: int) -> grain.MapDataset:
  """This process's share, shuffled for training with a seed hashed from data.seed per process.

  With data.seed itself every share would take the same permutation, so each global batch
  would gather neighbouring records (adjacent paragraphs) from the shares; and grain shuffles
  epoch n with seed + n, so data.seed 0's second epoch would be data.seed 1's first.
  """
  share = process_share(records, process_index, process_count)
  if split != "train":
    return share
  return share.shuffle(seed=int(np.random.SeedSequence([seed, process_index, 2]).generate_state(1)[0]))


def _decode(record: dict[str, Any]) -> dict[str, str]:
  return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in record.items()}


class Loader:
  """Local batches, dicts of numpy arrays [batch_size / process_count, ...], and their position."""

  def __init__(self, dataset: grain.IterDataset, identity: dict[str, Any], objective: Objective,
               num_records: int, one_pass: Callable[[], grain.IterDataset]):
    self._holder = [iter(dataset)]
    self._one_pass = one_pass
    self.identity = identity
    self.objective = objective
    self.num_records = num_records  # this process's share of the split
    # Close and free the iterator at exit, before interpreter shutdown clears the modules
    # that grain's own __del__ would need (it would print errors otherwise).
    weakref.finalize(self, _close, self._holder)

  @property
  def _iterator(self):
    return self._holder[0]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    # The tokenizer's digest: Trainer.restore refuses a file replaced at the same path since.
    return {"pipeline": self.identity, "position": self._iterator.get_state(), "records": self.num_records,
            "tokenizer_sha256": self.objective.tokenizer.sha256}

  def set_state(self, state: dict[str, Any]) -> None:
    saved, current = (absolute_paths(json.loads(json.dumps(identity))) for identity in (state["pipeline"],
                                                                                         self.identity))
    changed = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if changed:
      raise ConfigError(
          "the saved data position belongs to another pipeline: "
          + ", ".join(f"data.{k} was {saved.get(k)!r}, now {current.get(k)!r}" for k in changed)
          + "; resume with the data config it was saved with, or start a new workdir")
    # Positions count records, so files that changed since (another record count) would resume
    # at an unrelated place. Positions saved before the count was kept are taken as they are.
    if state.get("records", self.num_records) != self.num_records:
      raise ConfigError(
          f"data.dataset={self.identity['dataset']!r} has {self.num_records} {self.identity['split']} records "
          f"for this process, but the saved data position counted {state['records']}: its files changed "
          f"since; restore them, or start a new workdir")
    self._iterator.set_state(state["position"])

  def rows_in_one_pass(self, limit: int) -> int:
    """Rows that one pass over this process's share makes, counting at most `limit`. The batches
    repeat the split, so rows beyond these have been seen before (packed, the pass's last few
    rows are filled up from the next pass instead)."""
    return sum(1 for _ in itertools.islice(self._one_pass(), limit))

  def stats(self) -> dict[str, int]:
    """Counts of documents read, split into chunks, empty or truncated (objectives.base)."""
    return self.objective.counts.snapshot()

  def close(self) -> None:
    _close(self._holder)


def _close(holder: list) -> None:
  if holder:
    holder.pop().close()


def feature_rows(records: grain.MapDataset, objective: Objective, *, seed: int, pack: bool,
                 shuffle_bins: bool, worker_threads: int = 0,
                 num_bins: int = PACKING_BINS) -> grain.IterDataset:
  """Records -> the objective's examples -> packed (or padded) rows of T5X features."""
  examples = records.random_map(lambda record, rng: objective.examples(_decode(record), rng), seed=seed)
  dataset = examples.to_iter_dataset(grain.ReadOptions(
      num_threads=worker_threads, prefetch_buffer_size=4 * max(worker_threads, 1)))
  dataset = grain.experimental.FlatMapIterDataset(dataset, _Flatten())
  if pack:
    dataset = grain.experimental.FirstFitPackIterDataset(
        dataset, length_struct=objective.lengths, num_packing_bins=num_bins, seed=seed,
        shuffle_bins=shuffle_bins)
  else:
    dataset = dataset.map(lambda example: pad_example(example, objective.lengths))
  return dataset.map(objective.features)


def make_loader(config: ml_collections.ConfigDict, split: str, *, process_index: int = 0,
                process_count: int = 1) -> Loader:
  """This process's batches of `split` ('train' or 'validation') for the data config."""
  config = resolve_data_config(config, process_count)
  rows, objective, num_records = _share_rows(config, split, process_index, process_count, repeat=True)
  dataset = rows.batch(config.batch_size // process_count, drop_remainder=True)
  if config.prefetch_batches:
    dataset = grain.experimental.ThreadPrefetchIterDataset(
        dataset, prefetch_buffer_size=config.prefetch_batches)
  # What fixes the rows a position points at: the objective's own options, not the others'.
  fields = ("dataset", "tokenizer", "objective", "batch_size", "seed", "pack") + objective.config_fields
  identity = {name: config[name] for name in fields}
  identity.update(split=split, process_index=process_index, process_count=process_count)
  return Loader(dataset, identity, objective, num_records,
                one_pass=lambda: _share_rows(config, split, process_index, process_count, repeat=False)[0])


def _share_rows(config: ml_collections.ConfigDict, split: str, process_index: int, process_count: int, *,
                repeat: bool) -> tuple[grain.IterDataset, Objective, int]:
  """This process's rows of a split (once, or repeated without end), its objective and record count."""
  objective = make_objective(config, load_tokenizer(config.tokenizer))
  source = sources.open_split(config.dataset, split, objective.fields, config.data_dir)
  if len(source) < process_count:
    raise ConfigError(f"data.dataset={config.dataset!r} has {len(source)} {split} records, fewer "
                      f"than the {process_count} processes; use more data")
  records = ordered_share(grain.MapDataset.source(source), split, config.seed, process_index, process_count)
  # A seed per process and split, so equal positions in different shares draw differently.
  seed = int(np.random.SeedSequence([config.seed, process_index, split == "train"]).generate_state(1)[0])
  rows = feature_rows(records.repeat() if repeat else records, objective, seed=seed, pack=config.pack,
                      shuffle_bins=split == "train", worker_threads=config.worker_threads,
                      num_bins=max(PACKING_BINS, config.batch_size // process_count))
  return rows, objective, len(records)
