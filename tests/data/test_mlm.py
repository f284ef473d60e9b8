"""BERT masking: 15% chosen; of them 80% mask, 10% random, 10% kept; loss on the chosen only."""

import numpy as np
import pytest

from t5x_like.data.objectives.mlm import MaskedLM, mask_tokens
from t5x_like.data.tokenizer import EOS_ID, FIRST_PIECE_ID


def test_chosen_shares_over_many_sequences():
  rng = np.random.default_rng(0)
  mask_id, chosen_total, masked, replaced, kept = 5000, 0, 0, 0, 0
  for _ in range(400):
    tokens = np.append(rng.integers(FIRST_PIECE_ID, mask_id, size=100), EOS_ID).astype(np.int32)
    inputs, chosen = mask_tokens(tokens, rng, rate=0.15, mask_id=mask_id)
    assert chosen.sum() == 15 and not chosen[-1]  # round(0.15 * 100) of the non-eos tokens
    assert (inputs[~chosen] == tokens[~chosen]).all()
    assert ((inputs[chosen] >= FIRST_PIECE_ID) & (inputs[chosen] <= mask_id)).all()
    chosen_total += chosen.sum()
    masked += np.sum(inputs[chosen] == mask_id)
    kept += np.sum(inputs[chosen] == tokens[chosen])
    replaced += np.sum((inputs[chosen] != mask_id) & (inputs[chosen] != tokens[chosen]))
  # 6000 chosen tokens: three standard deviations are under 0.016 for 80% and 0.012 for 10%.
  assert masked / chosen_total == pytest.approx(0.8, abs=0.02)
  assert replaced / chosen_total == pytest.approx(0.1, abs=0.015)  # a random id may equal the token
  assert kept / chosen_total == pytest.approx(0.1, abs=0.015)


@pytest.mark.parametrize("candidates, count", [(100, 15), (30, 4), (70, 10), (10, 2), (7, 1), (2, 1)])
def test_the_count_chosen_is_berts(candidates, count):
  """BERT's create_pretraining_data: max(1, round(rate * n)) with Python's round, half to even
  (30 x 0.15 = 4.5 gives 4, 70 x 0.15 = 10.5 gives 10)."""
  tokens = np.append(np.arange(candidates) + FIRST_PIECE_ID, EOS_ID)
  _, chosen = mask_tokens(tokens, np.random.default_rng(0), rate=0.15, mask_id=500)
  assert chosen.sum() == count


def test_a_random_replacement_is_an_ordinary_piece_never_pad_eos_unk_or_the_mask():
  """With one ordinary id, a random replacement can only be that id: a draw from the special ids
  below would show at once, and one that took in the mask id would make 85% of the chosen masks."""
  rng = np.random.default_rng(3)
  mask_id, chosen_total, masked = FIRST_PIECE_ID + 1, 0, 0
  for _ in range(200):
    tokens = np.append(np.full(100, FIRST_PIECE_ID), EOS_ID)
    inputs, chosen = mask_tokens(tokens, rng, rate=0.5, mask_id=mask_id)
    assert np.isin(inputs[chosen], [FIRST_PIECE_ID, mask_id]).all()
    chosen_total += chosen.sum()
    masked += np.sum(inputs[chosen] == mask_id)
  assert masked / chosen_total == pytest.approx(0.8, abs=0.012)  # 10,000 chosen: 3 standard deviations


def test_at_least_one_token_and_none_in_an_eos_only_piece():
  rng = np.random.default_rng(1)
  _, chosen = mask_tokens(np.array([7, 8, EOS_ID]), rng, rate=0.15, mask_id=100)
  assert chosen.sum() == 1
  inputs, chosen = mask_tokens(np.array([EOS_ID]), rng, rate=0.15, mask_id=100)
  assert not chosen.any() and inputs.tolist() == [EOS_ID]


def test_examples_and_features_put_loss_on_the_chosen_positions(tokenizer):
  objective = MaskedLM(tokenizer, 64, 0.15)
  text = "She was the youngest of the two daughters of a most affectionate, indulgent father."
  (example,) = objective.examples({"text": text}, np.random.default_rng(2))
  row = dict(example, targets_segment_ids=np.ones(len(example["targets"]), np.int32),
             targets_positions=np.arange(len(example["targets"])))
  features = objective.features(row)
  chosen = features["encoder_loss_weights"] > 0
  assert tokenizer.decode(features["encoder_target_tokens"]) == text
  assert chosen.sum() == round(0.15 * (len(example["targets"]) - 1))
  np.testing.assert_array_equal(features["encoder_input_tokens"][~chosen],
                                features["encoder_target_tokens"][~chosen])
  assert set(features) == {"encoder_input_tokens", "encoder_target_tokens", "encoder_segment_ids",
                           "encoder_positions", "encoder_loss_weights"}
