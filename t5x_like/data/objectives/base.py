"""What an objective is: records -> token-id examples -> T5X features of one row.

The loader runs `examples` on each record with a generator seeded by (seed, process,
record position), so all of an objective's randomness is reproducible and resumes
exactly; the examples, variable-length 1-D arrays named by `lengths`, are then packed
(grain's first-fit packer) or padded (`features.pad_example`) into rows that carry
`{name}_segment_ids` and `{name}_positions`, and `features` turns one such row into the
model's T5X features.
"""

from __future__ import annotations

import abc
import collections
import threading
from typing import Mapping

import numpy as np

from t5x_like.data.objectives.features import chunks
from t5x_like.data.tokenizer import EOS_ID, Tokenizer

Example = dict[str, np.ndarray]


class Counts:
  """Event counts, safe to update from grain's worker threads. They count what the pipeline
  has processed, which runs a few batches ahead of what the trainer has consumed."""

  def __init__(self):
    self._lock = threading.Lock()
    self._counts = collections.Counter()

  def add(self, **events: int) -> None:
    with self._lock:
      self._counts.update(events)

  def snapshot(self) -> dict[str, int]:
    with self._lock:
      return dict(self._counts)


class Objective(abc.ABC):
  """A preprocessing step on token ids with T5X's output features."""

  fields: tuple[str, ...] = ("text",)  # record fields read
  architectures: tuple[str, ...] = ("decoder",)  # the model.arch values its rows train
  # The data config fields it is built from, in its constructor's order after the tokenizer;
  # they and no others fix the rows a saved data position points at.
  config_fields: tuple[str, ...] = ("seq_len",)
  # Features beyond the architecture's own that change what the model computes (a
  # prefix LM's bidirectional mask); training modes add them to the batch they read.
  model_inputs: tuple[str, ...] = ()
  # The features of its rows, which a training mode's needs are checked against before a
  # run builds anything.
  feature_names: tuple[str, ...]
  lengths: dict[str, int]  # example feature -> row length

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer
    # documents: records read; split_documents: records longer than a row, cut into
    # `chunks` pieces (never dropped); empty_documents: records without a token (nothing
    # to train on); truncated: prompt/response examples cut to fit a row; tied_pairs:
    # preference pairs dropped as their kept responses are the same.
    self.counts = Counts()

  @abc.abstractmethod
  def examples(self, record: Mapping[str, str], rng: np.random.Generator) -> list[Example]:
    """Variable-length examples, each no longer than `lengths`, from one record."""

  @abc.abstractmethod
  def features(self, row: Example) -> dict[str, np.ndarray]:
    """T5X features of one packed or padded row."""

  def document_chunks(self, text: str, length: int, *, eos: bool = True) -> list[np.ndarray]:
    """The document's ids (eos appended), cut into pieces of at most `length`, counted."""
    ids = self.tokenizer.encode(text)
    if eos and len(ids):  # an empty document has nothing to end
      ids = np.append(ids, np.int32(EOS_ID))
    pieces = chunks(ids, length)
    self.counts.add(documents=1, chunks=len(pieces), split_documents=int(len(pieces) > 1),
                    empty_documents=int(not pieces))
    return pieces
