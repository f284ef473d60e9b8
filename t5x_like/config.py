"""Experiment configs: load `get_config()` from a file, apply command-line overrides.

A config is named `path/to/file.py` or `path/to/file.py:variant`; the variant string
is passed to `get_config(variant)`. Overrides look like `--config.model.num_layers=8`
and keep the field's type (ml_collections refuses a value of another type).
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import pathlib
from typing import Sequence

import ml_collections

from models.config import ConfigError, model_config_dict

OVERRIDE_PREFIX = "--config."


def base_config(**model_fields) -> ml_collections.ConfigDict:
  """Every section with its defaults; experiment files start here and change what differs."""
  from t5x_like.data.config import default_data_config
  from t5x_like.partitioning import default_partitioning_config
  from t5x_like.trainer import default_train_config
  return ml_collections.ConfigDict(dict(
      model=model_config_dict(**model_fields),
      data=default_data_config(),
      train=default_train_config(),
      partitioning=default_partitioning_config(),
  ))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Runs `get_config` from the file `spec` names (`file.py` or `file.py:variant`)."""
  path, _, variant = spec.rpartition(":") if ":" in spec else (spec, "", "")
  if pathlib.Path(spec).exists():  # a path with a colon of its own, and no variant
    path, variant = spec, ""
  file = pathlib.Path(path)
  if file.is_dir():
    raise ConfigError(f"config file {path} is a directory; name a .py file in it, such as experiments/decoder_tiny.py")
  if not file.is_file():
    raise ConfigError(f"config file {path} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"t5x_like_config_{file.stem}", file)
  if module_spec is None:
    raise ConfigError(f"config file {path} is not a Python file (.py) defining get_config()")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} defines no get_config()")
  try:
    config = module.get_config(variant) if variant else module.get_config()
  except (TypeError, ValueError, KeyError) as error:  # e.g. a variant the file does not know
    raise ConfigError(f"{spec}: get_config({variant!r}) failed: {error}" if variant
                      else f"{spec}: get_config() failed: {error}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict, "
                      f"got {type(config).__name__}")
  return config


def load_run_config(spec: str) -> ml_collections.ConfigDict:
  """load_config for a single run (train, info): a sweep's config is named as one."""
  config = load_config(spec)
  if "model" not in config:
    hint = "; it is a sweep config: use `t5x-like sweep`" if "sweep" in config else ""
    raise ConfigError(f"{spec} has no model section{hint}")
  check_known_fields(config, spec)
  missing = [section for section in base_config() if section not in config]
  if missing:
    raise ConfigError(f"{spec} has no {' or '.join(missing)} section; start from t5x_like.config.base_config()")
  fill_defaults(config, base_config())
  return config


def fill_defaults(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> None:
  """Adds every field of `defaults` that `config` lacks, at any depth: a file that sets a section
  to only the fields it changes (`config.data = ConfigDict(dict(batch_size=16))`) gets the others'
  defaults, so training, `info` and the saved config.json all read the same values. An int it
  gives a float field becomes a float, as base_config's field would have made it."""
  for name, default in defaults.items():
    value = config.get(name)
    if name not in config:
      config[name] = copy.deepcopy(default)
    elif isinstance(default, ml_collections.ConfigDict) and isinstance(value, ml_collections.ConfigDict):
      fill_defaults(config[name], default)
    elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
      del config[name]  # typed as the default is, so `--config.<field>=3e-3` can override a `1` given here
      config[name] = float(value)


def check_known_fields(config: ml_collections.ConfigDict, spec: str,
                       known: ml_collections.ConfigDict | None = None) -> None:
  """Refuses a field that `known` (base_config) lacks: a misspelt `train.stepz` would go unused."""
  def walk(node, known, path):
    for name in node:
      if name not in known:
        raise ConfigError(f"{spec}: {path}{name} is not a config field; the fields "
                          f"{'of ' + path[:-1] if path else 'at the top'} are {sorted(known)}")
      if isinstance(node[name], ml_collections.ConfigDict) and isinstance(known[name], ml_collections.ConfigDict):
        walk(node[name], known[name], f"{path}{name}.")
  walk(config, base_config() if known is None else known, "")


def _parse_value(text: str):
  """Python literals (8, 0.1, True, None, 'x', (1, 2)); anything else is a string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _may_be_none(name: str) -> bool:
  """Whether a field (a run's `model.head_dim`, a sweep's `base.model.head_dim`) takes None: those
  whose default is None, such as the model's optional sizes."""
  from t5x_like.scaling.sweep import default_sweep_config
  defaults = ml_collections.ConfigDict(dict(base_config(), sweep=default_sweep_config()))
  node = defaults
  for part in name.removeprefix("base.").split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return True  # a field the defaults do not have: its own checks decide
    node = node[part]
  return node is None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies `--config.a.b=value` arguments in place. Unknown fields, a whole section, None for a
  field that holds a value and True/False for a number are errors: each would train another model
  than the one named, or fail far from the flag."""
  for override in overrides:
    if not override.startswith(OVERRIDE_PREFIX) or "=" not in override:
      raise ConfigError(f"cannot read override {override!r}; write it as --config.FIELD=VALUE")
    name, _, text = override[len(OVERRIDE_PREFIX):].partition("=")
    *parents, leaf = name.split(".")
    node = config
    for i, parent in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{name}: {'.'.join(parents[:i])} is a value, not a section")
      if parent not in node:
        raise ConfigError(f"--config.{name}: config has no field {'.'.join(parents[:i + 1])}")
      node = node[parent]
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"--config.{name}: {'.'.join(parents)} is a value, not a section")
    if leaf not in node:
      raise ConfigError(f"--config.{name}: config has no field {name}; "
                        f"fields here: {sorted(node.keys())}")
    current, value = node[leaf], _parse_value(text)
    if isinstance(current, ml_collections.ConfigDict):  # it would replace every field, defaults and checks gone
      raise ConfigError(f"--config.{name} is a section; override its fields one at a time "
                        f"(--config.{name}.FIELD=VALUE)")
    if value is None and current is not None and not _may_be_none(name):
      raise ConfigError(f"--config.{name}=None: the field holds {current!r} and needs a value")
    if isinstance(current, str) and value is not None and not isinstance(value, str):
      value = text  # a text field takes what reads as a number or a set as written: a file named 2024
    if isinstance(value, bool) and isinstance(current, (int, float)) and not isinstance(current, bool):
      raise ConfigError(f"--config.{name}={text}: the field holds a number ({current!r}), not True/False")
    try:
      node[leaf] = value
    except TypeError as error:
      raise ConfigError(f"--config.{name}={text}: {' '.join(str(error).split())}") from error


def nonempty_path(text: str) -> str:
  """An argparse type for the commands' path flags: a path that is not empty ('' is the current
  directory to pathlib, so an unset shell variable trained into it, or evaluated a split in place
  of a file)."""
  if not text.strip():
    raise argparse.ArgumentTypeError("an empty path (an unset shell variable?)")
  return text
