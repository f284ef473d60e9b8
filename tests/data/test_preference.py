"""Preference pairs: chosen and rejected sequences side by side; the bundled HHH pairs load."""

import numpy as np
import pytest

from models.config import ConfigError
from t5x_like.data.config import default_data_config
from t5x_like.data.loader import make_loader
from t5x_like.data.objectives.preference import PreferencePairs
from t5x_like.data.objectives.features import pad_example


def test_pair_features(tokenizer):
  objective = PreferencePairs(tokenizer, 32)
  record = {"prompt": "Human: Is Bath far?\n\nAssistant:", "chosen": " A day's drive.",
            "rejected": " Who knows."}
  (example,) = objective.examples(record, np.random.default_rng(0))
  features = objective.features(pad_example(example, objective.lengths))
  prompt_length = len(tokenizer.encode(record["prompt"]))
  for side in ("chosen", "rejected"):
    targets, weights = features[f"{side}_decoder_target_tokens"], features[f"{side}_decoder_loss_weights"]
    assert tokenizer.decode(targets) == record["prompt"] + record[side]
    assert weights[:prompt_length].sum() == 0
    assert tokenizer.decode(targets[weights > 0]) == record[side]
    assert features[f"{side}_decoder_input_tokens"][0] == 0
    assert (features[f"{side}_decoder_segment_ids"] <= 1).all()


def test_a_long_pair_keeps_the_same_prompt_on_both_sides(tokenizer):
  """Cut to fit, each side alone would keep more of the prompt beside the short response."""
  objective = PreferencePairs(tokenizer, 32)
  prompt = " ".join(f"word{i}" for i in range(20))
  (example,) = objective.examples({"prompt": prompt, "chosen": " ok.", "rejected": " no" * 30},
                                  np.random.default_rng(0))
  chosen, rejected = (example[side][example[f"{side}_loss_weights"] == 0] for side in ("chosen", "rejected"))
  assert chosen.tolist() == rejected.tolist() == tokenizer.encode(prompt).tolist()[-16:]  # half the row
  assert len(example["rejected"]) == 32 and tokenizer.decode(example["chosen"][16:]) == " ok."
  assert objective.counts.snapshot()["truncated"] == 1


def test_a_pair_whose_kept_responses_are_the_same_is_dropped_and_counted(tokenizer):
  """Equal in the record, or cut to a shared start: the pair prefers nothing (DPO's gradient is 0)."""
  objective = PreferencePairs(tokenizer, 16)
  prompt = "Human: Is Bath far?\n\nAssistant:"
  shared = " It is a long day's drive from here, and more"
  assert objective.examples({"prompt": prompt, "chosen": " Yes.", "rejected": " Yes."}, None) == []
  assert objective.examples({"prompt": prompt, "chosen": shared + " by coach.", "rejected": shared + " on foot."},
                            None) == []
  assert len(objective.examples({"prompt": prompt, "chosen": " Yes.", "rejected": " No."}, None)) == 1
  assert objective.counts.snapshot()["tied_pairs"] == 2 and objective.counts.snapshot()["documents"] == 3


def test_bundled_hhh_pairs_batch_unpacked(data_dir):
  config = default_data_config()
  config.update(dataset="hhh", objective="preference", pack=False, seq_len=128, batch_size=4,
                data_dir=data_dir)
  loader = make_loader(config, "train")
  batch = next(loader)
  assert set(batch) == {f"{side}_decoder_{name}" for side in ("chosen", "rejected") for name in
                        ("input_tokens", "target_tokens", "loss_weights", "segment_ids", "positions")}
  assert set(batch) == set(PreferencePairs.feature_names)
  for side in ("chosen", "rejected"):
    assert batch[f"{side}_decoder_target_tokens"].shape == (4, 128)
    assert (batch[f"{side}_decoder_loss_weights"].sum(axis=1) > 0).all()
  validation = make_loader(config, "validation")
  assert loader.num_records + validation.num_records == 221
  with pytest.raises(ConfigError, match=r"data.pack=True: preference pairs are never packed"):
    make_loader(dict(config, pack=True), "train")
