"""Causal LM: documents chunked, packed several to a row, nothing lost or duplicated."""

import collections

import grain
import numpy as np
import pytest

from t5x_like.data import documents
from t5x_like.data.loader import feature_rows
from t5x_like.data.objectives.causal_lm import CausalLM
from t5x_like.data.objectives.features import chunks
from t5x_like.data.objectives.mlm import MaskedLM
from t5x_like.data.tokenizer import EOS_ID


def segments(rows, tokens="decoder_target_tokens", segment_ids="decoder_segment_ids"):
  """Each row's token sequences, one per segment id > 0, in row order."""
  for row in rows:
    for segment in range(1, row[segment_ids].max() + 1):
      yield tuple(row[tokens][row[segment_ids] == segment].tolist())


def test_features_of_a_hand_packed_row(tokenizer):
  row = {"targets": np.array([5, 6, 1, 8, 9, 1, 0, 0]),
         "targets_segment_ids": np.array([1, 1, 1, 2, 2, 2, 0, 0]),
         "targets_positions": np.array([0, 1, 2, 0, 1, 2, 0, 0])}
  features = CausalLM(tokenizer, 8).features(row)
  np.testing.assert_array_equal(features["decoder_target_tokens"], [5, 6, 1, 8, 9, 1, 0, 0])
  np.testing.assert_array_equal(features["decoder_input_tokens"], [0, 5, 6, 0, 8, 9, 0, 0])
  np.testing.assert_array_equal(features["decoder_loss_weights"], [1, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(features["decoder_positions"], row["targets_positions"])


def test_a_long_document_is_chunked_and_counted(tokenizer):
  objective = CausalLM(tokenizer, 16)
  text = ("It is a truth universally acknowledged, that a single man in possession of a good "
          "fortune, must be in want of a wife.")
  examples = objective.examples({"text": text}, np.random.default_rng(0))
  ids = np.concatenate([e["targets"] for e in examples])
  assert len(examples) > 1 and all(len(e["targets"]) <= 16 for e in examples)
  assert ids[-1] == EOS_ID and tokenizer.decode(ids) == text
  assert objective.counts.snapshot() == {"documents": 1, "chunks": len(examples), "split_documents": 1,
                                         "empty_documents": 0}


@pytest.mark.parametrize("objective", ["causal_lm", "mlm"])
def test_an_empty_document_gives_no_example_and_is_counted(tokenizer, objective):
  """Not a lone end-of-sequence example: a JSONL or TFDS record with empty text has nothing to train on."""
  made = CausalLM(tokenizer, 16) if objective == "causal_lm" else MaskedLM(tokenizer, 16, 0.15)
  assert made.examples({"text": ""}, np.random.default_rng(0)) == []
  assert made.counts.snapshot() == {"documents": 1, "chunks": 0, "split_documents": 0, "empty_documents": 1}


def test_packing_keeps_every_token_once(tokenizer, small_corpus):
  texts = [text for _, text in documents.paragraphs(small_corpus)]
  objective = CausalLM(tokenizer, 64)
  records = grain.MapDataset.source([{"text": t.encode()} for t in texts])
  rows = list(feature_rows(records, objective, seed=3, pack=True, shuffle_bins=True, num_bins=4))
  pieces = {t: [tuple(p.tolist()) for p in chunks(np.append(tokenizer.encode(t), EOS_ID), 64)] for t in texts}
  # The segments are exactly the documents' pieces, each once ...
  assert collections.Counter(segments(rows)) == collections.Counter(p for t in texts for p in pieces[t])
  # ... and each document's pieces, concatenated, are the document and its eos.
  assert all(tokenizer.decode(np.concatenate(pieces[t])) == t for t in texts)
  assert sum(len(p) > 1 for p in pieces.values()) == objective.counts.snapshot()["split_documents"] == 2
  assert len(rows) < len(texts)  # documents share rows
  for row in rows:
    segment_ids, positions = row["decoder_segment_ids"], row["decoder_positions"]
    used = np.count_nonzero(segment_ids)
    assert (segment_ids[used:] == 0).all()  # padding only at the end
    assert segment_ids[0] == 1 and set(np.diff(segment_ids[:used])) <= {0, 1}  # 1, 2, ... in order
    for segment in range(1, segment_ids.max() + 1):
      in_segment = segment_ids == segment
      np.testing.assert_array_equal(positions[in_segment], np.arange(np.sum(in_segment)))
    np.testing.assert_array_equal(row["decoder_loss_weights"], (segment_ids > 0).astype(np.float32))
