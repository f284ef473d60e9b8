"""The grain loader: T5X batches, determinism, exact resume, and disjoint per-process shares."""

import json
import pathlib

import grain
import numpy as np
import pytest

from models.config import ConfigError
from t5x_like.config import load_config
from t5x_like.data import documents, tfds_text
from t5x_like.data.config import default_data_config
from t5x_like.data.loader import make_loader, ordered_share, process_share
from t5x_like.data.objectives import OBJECTIVE_CLASSES, objective_model_inputs

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[2] / "experiments"
DECODER = {"decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids", "decoder_positions",
           "decoder_loss_weights"}
ENCODER = {"encoder_input_tokens", "encoder_segment_ids", "encoder_positions"}
FEATURES = {
    "causal_lm": DECODER,
    "prefix_lm": DECODER | {"decoder_causal_attention"},
    "mlm": ENCODER | {"encoder_target_tokens", "encoder_loss_weights"},
    "span_corruption": ENCODER | DECODER,
    "sft": DECODER,
}


def _config(data_dir, **fields):
  config = default_data_config()
  config.update(dict(data_dir=data_dir, seq_len=64, input_len=64, target_len=16, batch_size=4), **fields)
  return config


def _batches(loader, count):
  return [next(loader) for _ in range(count)]


def _assert_same(batches, others):
  assert len(batches) == len(others)
  for batch, other in zip(batches, others):
    assert batch.keys() == other.keys()
    for name in batch:
      np.testing.assert_array_equal(batch[name], other[name], err_msg=name)


@pytest.mark.parametrize("objective", sorted(FEATURES))
def test_batches_carry_the_t5x_features(data_dir, objective):
  dataset = "hhh" if objective == "sft" else "austen"
  batch = next(make_loader(_config(data_dir, objective=objective, dataset=dataset), "train",
                           process_index=1, process_count=2))
  assert set(batch) == FEATURES[objective] == set(OBJECTIVE_CLASSES[objective].feature_names)
  assert set(objective_model_inputs(objective)) <= set(batch)  # what the trainer will ask for
  for name, values in batch.items():
    length = 16 if objective == "span_corruption" and name.startswith("decoder") else 64
    assert values.shape == (2, length), name  # batch_size 4 over 2 processes


def test_same_seed_same_batches_other_seed_other_batches(data_dir):
  first = _batches(make_loader(_config(data_dir), "train"), 4)
  _assert_same(first, _batches(make_loader(_config(data_dir, worker_threads=2), "train"), 4))
  other = _batches(make_loader(_config(data_dir, seed=1), "train"), 4)
  assert not np.array_equal(first[0]["decoder_target_tokens"], other[0]["decoder_target_tokens"])
  # Validation is read in a fixed order, whatever the seed.
  _assert_same(_batches(make_loader(_config(data_dir), "validation"), 2),
               _batches(make_loader(_config(data_dir, seed=1), "validation"), 2))


@pytest.mark.parametrize("objective, dataset", [("causal_lm", "austen"), ("mlm", "austen"),
                                                ("span_corruption", "austen"), ("sft", "hhh")])
def test_a_resumed_loader_yields_the_uninterrupted_batches(data_dir, objective, dataset):
  config = _config(data_dir, objective=objective, dataset=dataset)
  uninterrupted = make_loader(config, "train")
  _batches(uninterrupted, 7)
  state = json.loads(json.dumps(uninterrupted.get_state()))  # what a checkpoint keeps
  expected = _batches(uninterrupted, 5)
  fresh = make_loader(dict(config, worker_threads=2), "train")  # thread counts may change
  fresh.set_state(state)
  _assert_same(_batches(fresh, 5), expected)
  used = make_loader(config, "train")
  _batches(used, 3)
  used.set_state(state)  # also a loader that has run ahead
  _assert_same(_batches(used, 5), expected)


def test_resuming_under_another_data_config_is_refused_unless_the_objective_ignores_the_change(data_dir):
  state = make_loader(_config(data_dir), "train").get_state()
  loader = make_loader(_config(data_dir, batch_size=8), "train")
  with pytest.raises(ConfigError, match=r"data.batch_size was 4, now 8; resume with the data config"):
    loader.set_state(state)
  with pytest.raises(ConfigError, match=r"data.seed was 0, now 1"):  # the same position in another order
    make_loader(_config(data_dir, seed=1), "train").set_state(state)
  make_loader(_config(data_dir, mlm_probability=0.3, noise_density=0.5), "train").set_state(state)  # causal LM
  state = make_loader(_config(data_dir, objective="mlm"), "train").get_state()
  with pytest.raises(ConfigError, match=r"data.mlm_probability was 0.15, now 0.3"):
    make_loader(_config(data_dir, objective="mlm", mlm_probability=0.3), "train").set_state(state)


def test_resuming_after_the_files_changed_is_refused(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n".join(f"Paragraph number {i} of the corpus." for i in range(60)) + "\n")
  config = _config(str(tmp_path / "tfds"), dataset=str(corpus))
  loader = make_loader(config, "train")
  next(loader)
  state = loader.get_state()
  old_format = {key: value for key, value in state.items() if key != "records"}
  with corpus.open("a") as file:  # the dataset is rebuilt, with more records
    file.write("\n".join(f"\nAn added paragraph {i}.\n" for i in range(30)))
  grown = make_loader(config, "train")
  assert grown.num_records > loader.num_records
  with pytest.raises(ConfigError, match=rf"corpus\.txt' has {grown.num_records} train records for this process, "
                                        rf"but the saved data position counted {loader.num_records}: its files"):
    grown.set_state(state)
  grown.set_state(old_format)  # positions saved before the count was kept resume as before


def test_process_shares_are_disjoint_cover_and_are_all_a_process_reads():
  read = []

  class Recording:
    def __len__(self):
      return 10

    def __getitem__(self, index):
      read.append(index)
      return index

  shares = []
  for process in range(3):
    read.clear()
    shares.append(list(process_share(grain.MapDataset.source(Recording()), process, 3)))
    assert sorted(read) == shares[-1]
  assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
  with pytest.raises(ConfigError, match=r"process_index=3 is not in \[0, process_count=3\)"):
    process_share(grain.MapDataset.range(4), 3, 3)


def test_each_share_has_its_own_train_order_and_seeds_do_not_replay_each_other():
  records = grain.MapDataset.range(40)
  order = lambda seed, process: list(ordered_share(records, "train", seed, process, 2).repeat()[:40])  # noqa: E731
  zero, one = order(0, 0), order(0, 1)  # two epochs of each share
  assert sorted(zero[:20]) == list(range(0, 40, 2)) and zero[:20] != zero[20:]  # a new order each epoch
  assert [record - 1 for record in one[:20]] != zero[:20]  # not one permutation of neighbouring records
  assert order(1, 0)[:20] != zero[20:]  # data.seed 1's first epoch is not data.seed 0's second
  assert list(ordered_share(records, "validation", 0, 1, 2)) == list(range(1, 40, 2))  # in order


def test_masked_lm_draws_a_new_choice_each_time_a_document_comes_back(tmp_path):
  """RoBERTa's dynamic masking: the validation split, unpacked and in order, read over several epochs.

  Documents of 20 numbered words, so two draws choosing the same tokens by chance are vanishingly rare.
  """
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n".join(" ".join(f"d{i}w{j}" for j in range(20)) for i in range(100)) + "\n")
  config = _config(str(tmp_path / "tfds"), dataset=str(corpus), objective="mlm", pack=False)
  occurrences = {}
  for batch in _batches(make_loader(config, "validation"), 20):
    for targets, weights in zip(batch["encoder_target_tokens"], batch["encoder_loss_weights"]):
      occurrences.setdefault(targets.tobytes(), []).append(weights.tobytes())
  repeated = [choices for choices in occurrences.values() if len(choices) > 1]
  assert len(repeated) == len(occurrences) >= 2  # every validation document came back
  assert all(len(set(choices)) == len(choices) for choices in repeated)  # each time other tokens chosen


def test_two_processes_read_disjoint_documents_covering_the_split(small_corpus, tmp_path, tokenizer):
  config = _config(str(tmp_path / "tfds"), dataset=str(small_corpus))
  seen = []
  for process in range(2):
    loader = make_loader(config, "train", process_index=process, process_count=2)
    texts = set()
    for batch in _batches(loader, 30):  # several epochs of a share
      for row, segment_ids in zip(batch["decoder_target_tokens"], batch["decoder_segment_ids"]):
        texts.update(tokenizer.decode(row[segment_ids == s]) for s in range(1, segment_ids.max() + 1))
    seen.append(texts)
  train = {text for _, text in documents.paragraphs(small_corpus) if tfds_text.split_of(text) == "train"}
  short = lambda texts: {t for t in texts if "long" not in t}  # the two long ones arrive in chunks
  assert not seen[0] & seen[1]
  assert short(seen[0] | seen[1]) == short(train)
  for word in ("long0 ", "longer0 "):  # each long document is read by one process only
    assert [any(word in t for t in texts) for texts in seen].count(True) == int(any(word in t for t in train))


@pytest.mark.parametrize("pack", [False, True])
def test_one_pass_over_a_split_counts_its_rows(tmp_path, pack):
  """Unpacked, each short paragraph of the validation split is one row; packed, they share rows."""
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n".join(f"Paragraph number {i} of the corpus." for i in range(200)) + "\n")
  validation = [text for _, text in documents.paragraphs(corpus) if tfds_text.split_of(text) == "validation"]
  loader = make_loader(_config(str(tmp_path / "tfds"), dataset=str(corpus), pack=pack), "validation")
  rows = loader.rows_in_one_pass(limit=10 ** 6)
  if pack:
    assert 1 < rows < len(validation) / 2  # about 10 tokens each, 64 to a row
  else:
    assert rows == len(validation) > 2
  assert loader.rows_in_one_pass(limit=2) == 2


def test_fewer_records_than_processes_is_an_error(tmp_path):
  text = next(t for t in (f"Only paragraph {i}." for i in range(100)) if tfds_text.split_of(t) == "train")
  (tmp_path / "one.txt").write_text(text + "\n", encoding="utf-8")
  with pytest.raises(ConfigError, match=r"has 1 train records, fewer than the 2 processes"):
    make_loader(_config(str(tmp_path / "tfds"), dataset=str(tmp_path / "one.txt")), "train",
                process_index=0, process_count=2)


def test_long_documents_are_counted(data_dir):
  loader = make_loader(_config(data_dir), "train")
  _batches(loader, 20)
  stats = loader.stats()
  assert stats["split_documents"] > 0 and stats["chunks"] > stats["documents"]


@pytest.mark.parametrize("experiment", ["decoder_tiny.py", "decoder_tiny_sft.py", "encoder_tiny.py",
                                        "encoder_decoder_tiny.py"])
def test_a_shipped_experiment_evaluates_on_distinct_validation_rows(experiment, data_dir):
  """Its train.eval_steps batches fit in one pass over the bundled validation split, so the
  trainer does not warn that they go round it (HHH's split holds 11 SFT rows)."""
  config = load_config(str(EXPERIMENTS / experiment))
  config.data.data_dir = data_dir
  wanted = config.train.eval_steps * config.data.batch_size
  assert make_loader(config.data, "validation").rows_in_one_pass(limit=wanted) == wanted
