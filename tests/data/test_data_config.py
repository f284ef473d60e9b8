"""The data config: defaults, partial experiment configs, and errors that name the field."""

import ml_collections
import pytest

from models.config import ConfigError
from t5x_like.data.config import default_data_config, resolve_data_config
from t5x_like.data.objectives import OBJECTIVES


def test_defaults_are_valid_and_partial_configs_are_completed():
  defaults = resolve_data_config(default_data_config())
  assert (defaults.dataset, defaults.tokenizer) == ("austen", "austen_bpe_8k")
  assert defaults.objective == "causal_lm"
  resolved = resolve_data_config(ml_collections.ConfigDict(dict(seq_len=16, batch_size=8)), process_count=2)
  assert (resolved.seq_len, resolved.batch_size, resolved.pack) == (16, 8, True)
  assert resolve_data_config({"mean_noise_span_length": 2}).mean_noise_span_length == 2.0


@pytest.mark.parametrize("fields, process_count, message", [
    (dict(batch_size=6), 4, r"data.batch_size=6 does not divide over 4 processes; make it a multiple of 4"),
    (dict(objective="clm"), 1, r"data.objective='clm' is not one of \('causal_lm'"),
    (dict(seq_len=0), 1, r"data.seq_len=0 must be a positive integer"),
    (dict(objective="span_corruption", target_len=-1), 1, r"data.target_len=-1 must be a positive integer"),
    (dict(batch_size=0), 1, r"data.batch_size=0 must be a positive integer"),
    (dict(mlm_probability=1.5), 1, r"data.mlm_probability=1.5 must lie strictly between 0 and 1"),
    (dict(noise_density=0.0), 1, r"data.noise_density=0.0 must lie strictly between 0 and 1"),
    (dict(mean_noise_span_length=0.5), 1, r"data.mean_noise_span_length=0.5 must be at least 1"),
    (dict(objective="preference"), 1, r"data.pack=True: preference pairs are never packed"),
    (dict(tokenizer="/no/such.model"), 1, r"data.tokenizer='/no/such.model' is neither a shipped tokenizer"),
    (dict(dataset=" "), 1, r"data.dataset is empty"),
    (dict(worker_threads=-1), 1, r"data.worker_threads=-1 must be 0 or more"),
    (dict(seed=-3), 1, r"data.seed=-3 must be in \[0, 2\*\*32\)"),
    (dict(sequence_length=8), 1, r"data.sequence_length is not a data field; fields: \["),
    (dict(seq_len="long"), 1, r"data.seq_len='long': "),
])
def test_errors_name_the_field(fields, process_count, message):
  with pytest.raises(ConfigError, match=message):
    resolve_data_config(fields, process_count)


def test_every_objective_resolves_to_the_defaults_it_does_not_set():
  for objective in OBJECTIVES:
    fields = dict(objective=objective, pack=objective != "preference")
    assert resolve_data_config(fields).to_dict() == {**default_data_config().to_dict(), **fields}
