"""Experiment configs load, validate and override from the command line."""

import argparse
import errno
import logging
import pathlib

import jax
import pytest
from flax import nnx

from models.config import ConfigError, ModelConfig, first_line
from models.model_size import model_size
from models.transformer import build_model
from t5x_like import checkpoints, partitioning
from t5x_like.cli import _run, main
from t5x_like.config import apply_overrides, base_config, load_config, load_run_config
from t5x_like.scaling.sweep import sweep_points
from t5x_like.trainer import training_warnings, validate_config

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[2] / "experiments"

# Published parameter counts of the reference shapes (Hugging Face model cards and
# configs: google/t5-v1_1-small and -base, gpt2, TinyLlama-1.1B).
REFERENCE_SIZES = {
    "t5.py:small": 76_961_152,
    "t5.py:base": 247_577_856,
    "gpt2.py:small": 124_439_808,
    "llama_1b.py": 1_100_048_384,
}


@pytest.mark.parametrize("spec", sorted(REFERENCE_SIZES))
def test_reference_configs_have_the_published_sizes(spec):
  config = load_config(str(EXPERIMENTS / spec))
  assert model_size(ModelConfig.from_dict(config.model)).total_params == REFERENCE_SIZES[spec]


def test_every_experiment_config_and_sweep_point_validates_and_shards_over_eight_devices(caplog):
  """The whole config, with no warning, then each parameter's dims against the mesh axes its rules name."""
  specs = [file.name for file in sorted(EXPERIMENTS.glob("*.py"))] + sorted(REFERENCE_SIZES)
  configs = [load_config(str(EXPERIMENTS / spec)) for spec in specs]
  for sweep in sorted((EXPERIMENTS / "scaling").glob("*.py")):
    configs += [point for _, point in sweep_points(load_config(str(sweep)))]
  assert len(specs) >= 10 and len(configs) >= 30
  sharded = set()
  for config in configs:
    model_config = validate_config(config, num_devices=jax.device_count())
    assert training_warnings(config) == []
    shape = (repr(model_config), repr(config.partitioning))
    if shape in sharded:  # a sweep's points of one size differ in their data and steps only
      continue
    sharded.add(shape)
    abstract = nnx.state(nnx.eval_shape(lambda: build_model(model_config)))
    partitioning.logical_shardings(abstract, partitioning.make_mesh(config.partitioning), config.partitioning)
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_warmup_past_the_last_step_bfloat16_weights_and_a_zero_rate_are_warned_of(caplog):
  config = load_config(str(EXPERIMENTS / "decoder_tiny.py"))
  config.train.update(steps=50)
  config.model.param_dtype = "bfloat16"
  warmup, weights = training_warnings(config)
  assert "warmup_steps=60 is not below train.steps=50" in warmup
  assert "model.param_dtype='bfloat16'" in weights
  with caplog.at_level(logging.WARNING):
    validate_config(config, num_devices=jax.device_count())  # as decode, eval and score load a run
  assert not caplog.records
  config.train.optimizer.learning_rate = 0.0
  assert training_warnings(config)[0] == "train.optimizer.learning_rate=0: the weights never change"
  config.train.optimizer.update(name="adafactor", b2=0.999)
  assert ("train.optimizer.name='adafactor' takes optax's factored defaults and ignores b2=0.999, which set "
          "adamw's moments" in training_warnings(config))


def test_a_failure_recovered_from_is_logged_as_its_type_and_first_line():
  assert first_line(OSError("disk full\nmore detail")) == "OSError: disk full"
  assert first_line(RuntimeError("x" * 300)) == "RuntimeError: " + "x" * 200
  assert first_line(ValueError("")) == first_line(ValueError("\n")) == "ValueError"  # no message, no IndexError


def test_overrides_keep_types_and_reject_unknown_fields():
  config = load_config(str(EXPERIMENTS / "decoder_tiny.py"))
  apply_overrides(config, ["--config.model.num_layers=8", "--config.model.norm=layernorm",
                           "--config.model.rope_theta=500000"])
  assert config.model.num_layers == 8 and config.model.norm == "layernorm"
  assert config.model.rope_theta == 500000.0
  with pytest.raises(ConfigError, match="no field model.num_layerz"):
    apply_overrides(config, ["--config.model.num_layerz=8"])
  with pytest.raises(ConfigError, match="model.num_layers=eight"):
    apply_overrides(config, ["--config.model.num_layers=eight"])
  with pytest.raises(ConfigError, match="--config.FIELD=VALUE"):
    apply_overrides(config, ["--model.num_layers=8"])


@pytest.mark.parametrize("override, message", [
    ("--config.model={'num_layers': 2}", r"--config.model is a section; override its fields one at a time"),
    ("--config.model.emb_dim=None", r"--config.model.emb_dim=None: the field holds 256 and needs a value"),
    ("--config.data.dataset=None", r"--config.data.dataset=None: the field holds 'austen'"),
    ("--config.model.num_layers.x=3", r"--config.model.num_layers.x: model.num_layers is a value, not a section"),
    ("--config.train.optimizer.learning_rate=True", r"the field holds a number \(0.003\), not True/False"),
    ("--config.model.num_layers={}", r"num_layers=\{\}: Could not override field 'num_layers' .* cannot be casted"),
])
def test_an_override_that_would_train_another_model_or_fail_later_is_named(override, message):
  config = load_config(str(EXPERIMENTS / "decoder_tiny.py"))
  with pytest.raises(ConfigError, match=message):
    apply_overrides(config, [override])


def test_optional_fields_take_none_and_a_float_field_given_an_int_takes_floats(tmp_path):
  config = load_config(str(EXPERIMENTS / "decoder_tiny.py"))
  assert config.model.num_kv_heads == 2
  apply_overrides(config, ["--config.model.num_kv_heads=None", "--config.model.head_dim=None",
                           "--config.data.dataset=2024", "--config.data.tokenizer='quoted'"])
  assert config.model.num_kv_heads is None and config.model.head_dim is None
  assert (config.data.dataset, config.data.tokenizer) == ("2024", "quoted")  # text, a number's included
  (tmp_path / "ints.py").write_text(
      "import ml_collections\nfrom t5x_like.config import base_config\ndef get_config():\n  c = base_config()\n"
      "  c.train = ml_collections.ConfigDict(dict(optimizer=dict(learning_rate=1)))\n  return c\n")
  config = load_run_config(str(tmp_path / "ints.py"))
  apply_overrides(config, ["--config.train.optimizer.learning_rate=3e-3"])  # refused as 'cannot be cast to int'
  assert config.train.optimizer.learning_rate == 3e-3


def test_info_prints_counts_and_names_the_bad_field(capsys):
  assert main(["info", "--config", str(EXPERIMENTS / "gpt2.py:small")]) == 0
  out = capsys.readouterr().out
  assert "124,439,808" in out and "85,056,000" in out
  # PaLM app. B by hand: 12 layers of 12 d^2 matmul weights plus the 50257 x 768 output projection,
  # 6 FLOPs each per token, and 12 x layers x context x width for attention.
  d, layers, context = 768, 12, 1024
  matmul = layers * 12 * d * d + 50257 * d
  assert f"matmul (for MFU):     {matmul:,}" in out
  assert f"train FLOPs per token:  {6 * matmul + 12 * layers * context * d:.4g} (sequence length 1024" in out
  assert main(["info", "--config", str(EXPERIMENTS / "decoder_tiny.py"), "--config.model.num_heads=6"]) == 2
  assert "model.num_heads=6 does not divide model.emb_dim=256" in capsys.readouterr().err


@pytest.mark.parametrize("changes,message", [
    (dict(num_kv_heads=3), "model.num_kv_heads=3 does not divide model.num_heads=4"),
    (dict(arch="gpt"), "model.arch='gpt'"),
    (dict(position="rope", head_dim=7), "even head dimension"),
    (dict(num_decoder_layers=2), "model.num_decoder_layers applies only"),
    (dict(num_token_types=2), "model.num_token_types applies only to model.arch='encoder'"),
    (dict(dropout_rate=1.0), "model.dropout_rate"),
    (dict(vocab_size=0), "model.vocab_size=0"),
    (dict(position="relative", relative_max_distance=16), "model.relative_max_distance=16 must exceed 16"),
    (dict(arch="encoder", position="relative", relative_max_distance=8), "model.relative_max_distance=8 must exceed 8"),
    # An encoder-decoder has a causal stack (half the buckets exact) and a bidirectional one (a quarter).
    (dict(arch="encoder_decoder", position="relative", relative_max_distance=16),
     "model.relative_max_distance=16 must exceed 16"),
    (dict(arch="encoder_decoder", position="relative", relative_num_buckets=3, relative_max_distance=8),
     "model.relative_num_buckets=3 is too few for model.arch='encoder_decoder': 4"),
    (dict(arch="encoder", position="relative", relative_num_buckets=3), "model.relative_num_buckets=3 is too few"),
    (dict(position="relative", relative_num_buckets=1),
     "model.relative_num_buckets=1 is too few for model.arch='decoder': 2"),
    (dict(rope_theta=0.0), "model.rope_theta=0.0 must be > 0"),
    (dict(emb_dim=True), "model.emb_dim=True must be a positive integer"),
])
def test_impossible_model_configs_name_the_field(changes, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    ModelConfig(**changes).validate()


def test_unknown_model_field_is_an_error():
  with pytest.raises(ConfigError, match="unknown model config field"):
    ModelConfig.from_dict({"num_layer": 3})


def test_a_variant_the_config_file_does_not_know_is_named(capsys):
  assert main(["info", "--config", str(EXPERIMENTS / "gpt2.py:huge")]) == 2
  assert main(["info", "--config", str(EXPERIMENTS / "decoder_tiny.py:small")]) == 2
  errors = capsys.readouterr().err.splitlines()
  assert len(errors) == 2 and "gpt2.py:huge: get_config('huge') failed" in errors[0]
  assert "decoder_tiny.py:small: get_config('small') failed" in errors[1]


def test_a_config_path_holding_a_colon_loads_with_or_without_a_variant_and_a_directory_is_named(tmp_path):
  """The variant follows the last colon; a colon in a directory's name had cut the path there."""
  directory = tmp_path / "run:2"
  directory.mkdir()
  (directory / "t5.py").write_text((EXPERIMENTS / "t5.py").read_text())
  for variant in ("", ":small"):
    copied, original = load_config(f"{directory / 't5.py'}{variant}"), load_config(f"{EXPERIMENTS / 't5.py'}{variant}")
    assert copied.to_dict() == original.to_dict()
  with pytest.raises(ConfigError, match=rf"config file {directory} is a directory; name a \.py file in it"):
    load_config(str(directory))


def test_a_sweep_config_given_to_train_or_info_and_a_run_config_to_sweep_are_named(tmp_path, capsys):
  sweep, run = str(EXPERIMENTS / "scaling" / "tiny.py"), str(EXPERIMENTS / "decoder_tiny.py")
  assert main(["info", "--config", sweep]) == 2
  assert main(["train", "--config", sweep, "--workdir", str(tmp_path)]) == 2
  assert main(["sweep", "--config", run, "--workdir", str(tmp_path)]) == 2
  (tmp_path / "no_base.py").write_text("import ml_collections\ndef get_config():\n"
                                       "  return ml_collections.ConfigDict(dict(sweep=dict(sizes=(1,))))\n")
  assert main(["sweep", "--config", str(tmp_path / "no_base.py"), "--workdir", str(tmp_path / "s")]) == 2
  errors = capsys.readouterr().err
  assert errors.count("has no model section; it is a sweep config: use `t5x-like sweep`") == 2
  assert "has no sweep section" in errors
  assert "no_base.py has no base section: the training config every point starts from" in errors


def test_a_section_set_to_some_fields_takes_the_defaults_of_the_others(tmp_path, capsys):
  (tmp_path / "partial.py").write_text(
      "import ml_collections\nfrom t5x_like.config import base_config\n"
      "def get_config():\n  c = base_config(num_layers=2)\n"
      "  c.data = ml_collections.ConfigDict(dict(batch_size=16))\n"
      "  c.train = ml_collections.ConfigDict(dict(steps=5, optimizer=dict(learning_rate=0.1)))\n  return c\n")
  config = load_run_config(str(tmp_path / "partial.py"))
  defaults = base_config()
  assert config.data.to_dict() == {**defaults.data.to_dict(), "batch_size": 16}
  assert config.train.to_dict() == {**defaults.train.to_dict(), "steps": 5,
                                    "optimizer": {**defaults.train.optimizer.to_dict(), "learning_rate": 0.1}}
  # info counts FLOPs at the length training reads (it took model.max_len for a missing seq_len).
  assert main(["info", "--config", str(tmp_path / "partial.py"), "--config.data.seq_len=64"]) == 0
  assert "sequence length 64;" in capsys.readouterr().out


def test_a_field_no_section_has_is_named_wherever_the_file_sets_it(tmp_path, capsys):
  """ConfigDict.update adds any key, so a misspelt field in a file would otherwise go unused."""
  header = "from t5x_like.config import base_config\n"
  files = {"train": "c.train.update(stepz=5)", "optimizer": "c.train.optimizer.lr = 0.1",
           "section": "c.partitoning = dict(mesh_shape=(-1, 1, 1))", "missing": "del c.partitioning"}
  for name, line in files.items():
    (tmp_path / f"{name}.py").write_text(f"{header}def get_config():\n  c = base_config()\n  {line}\n  return c\n")
  sweep = (EXPERIMENTS / "scaling" / "tiny.py").read_text().replace("seeds=(0,))", "seeds=(0,), sizez=(3,))")
  (tmp_path / "sweep.py").write_text(sweep)
  (tmp_path / "notes.md").write_text("# not a config\n")
  for name in files:
    assert main(["info", "--config", str(tmp_path / f"{name}.py")]) == 2
  assert main(["sweep", "--config", str(tmp_path / "sweep.py"), "--workdir", str(tmp_path / "run")]) == 2
  assert main(["info", "--config", str(tmp_path / "notes.md")]) == 2
  errors = capsys.readouterr().err.splitlines()
  assert len(errors) == 6 and not (tmp_path / "run").exists()
  assert "train.py: train.stepz is not a config field; the fields of train are [" in errors[0]
  assert "optimizer.py: train.optimizer.lr is not a config field" in errors[1]
  assert "section.py: partitoning is not a config field; the fields at the top are ['data', 'model'," in errors[2]
  assert "missing.py has no partitioning section; start from t5x_like.config.base_config()" in errors[3]
  assert "sweep.py: sweep.sizez is not a config field" in errors[4]
  assert "notes.md is not a Python file (.py) defining get_config()" in errors[5]


def test_a_full_device_is_one_line_naming_the_checkpoints_it_left(capsys):
  """Checkpointer's OutOfSpaceError, or any other full device's OSError, is one line; other OSErrors raise."""
  def stopped_by(error):
    def run(args, overrides):
      raise error
    return argparse.Namespace(command="train", run=run)

  full = checkpoints.OutOfSpaceError("no space left on the device of /w/checkpoints; steps 2, 4 are intact")
  assert _run(stopped_by(full), []) == 1
  assert capsys.readouterr().err == f"t5x-like train: error: {full}\n"
  assert _run(stopped_by(OSError(errno.ENOSPC, "No space left on device", "metrics.jsonl")), []) == 1
  assert capsys.readouterr().err == "t5x-like train: error: [Errno 28] No space left on device: 'metrics.jsonl'\n"
  with pytest.raises(PermissionError):
    _run(stopped_by(PermissionError(errno.EACCES, "Permission denied")), [])
