"""SFT: prompt + response + eos in one sequence, loss on the response; counted truncation."""

import numpy as np

from t5x_like.data.objectives.sft import SupervisedFineTuning, fit_pair
from t5x_like.data.tokenizer import EOS_ID


def test_loss_is_masked_on_the_prompt(tokenizer):
  objective = SupervisedFineTuning(tokenizer, 128)
  prompt, response = "\n\nHuman: Who is Emma?\n\nAssistant:", " A heroine of Austen's."
  (example,) = objective.examples({"prompt": prompt, "response": response}, np.random.default_rng(0))
  n_prompt = len(tokenizer.encode(prompt))
  n_response = len(tokenizer.encode(response)) + 1
  np.testing.assert_array_equal(example["loss_weights"], [0] * n_prompt + [1] * n_response)
  assert example["targets"][-1] == EOS_ID
  assert tokenizer.decode(example["targets"]) == prompt + response
  row = dict(example, targets_segment_ids=np.ones(len(example["targets"]), np.int32),
             targets_positions=np.arange(len(example["targets"])))
  features = objective.features(row)
  np.testing.assert_array_equal(features["decoder_loss_weights"], example["loss_weights"])
  assert tokenizer.decode(features["decoder_target_tokens"][features["decoder_loss_weights"] > 0]) == response


def test_fit_pair_keeps_the_prompt_end_and_the_response_start():
  prompt, response = np.arange(100, 110), np.arange(200, 205)
  assert [a.tolist() for a in fit_pair(prompt, response, 20)] == [prompt.tolist(), response.tolist()]
  # Long prompt, short response: the prompt keeps its last tokens, the response everything.
  kept_prompt, kept_response = fit_pair(prompt, response[:2], 8)
  assert kept_prompt.tolist() == [104, 105, 106, 107, 108, 109] and kept_response.tolist() == [200, 201]
  # The prompt keeps at least half the row when it is that long.
  kept_prompt, kept_response = fit_pair(prompt, response, 8)
  assert kept_prompt.tolist() == [106, 107, 108, 109] and kept_response.tolist() == [200, 201, 202, 203]
  # Both long: the prompt keeps half the row, the response the start of the rest.
  kept_prompt, kept_response = fit_pair(np.arange(100, 130), np.arange(200, 230), 10)
  assert kept_prompt.tolist() == [125, 126, 127, 128, 129]
  assert kept_response.tolist() == [200, 201, 202, 203, 204]


def test_truncation_is_counted(tokenizer):
  objective = SupervisedFineTuning(tokenizer, 12)
  long = {"prompt": "Tell me about the Bennet sisters, all five of them, please.",
          "response": "Jane, Elizabeth, Mary, Kitty and Lydia."}
  (example,) = objective.examples(long, np.random.default_rng(0))
  assert len(example["targets"]) == 12 and example["loss_weights"].sum() == 6
  objective.examples({"prompt": "Hi.", "response": "Hello."}, np.random.default_rng(0))
  assert objective.counts.snapshot() == {"documents": 2, "truncated": 1}
