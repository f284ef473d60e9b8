"""The `t5x-like` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import sys

from models.config import ConfigError, ModelConfig
from models.model_size import model_size, train_flops_per_token
from t5x_like.config import apply_overrides, load_config


def _info(args, overrides) -> None:
  """Prints the config, its parameter counts and training FLOPs per token."""
  config = load_config(args.config)
  apply_overrides(config, overrides)
  model = ModelConfig.from_dict(config.model)
  size = model_size(model)
  data = config.get("data", {})
  if model.arch == "encoder_decoder":
    lengths = (data.get("input_len", model.max_len), data.get("target_len", model.max_len))
    length_text = f"input length {lengths[0]}, target length {lengths[1]}"
  else:
    lengths = (data.get("seq_len", model.max_len), None)
    length_text = f"sequence length {lengths[0]}"
  flops = train_flops_per_token(model, *lengths)
  if args.show_config:
    print(config)
  print(f"config:                 {args.config}")
  print(f"architecture:           {model.arch}")
  print(f"parameters:             {size.total_params:,}")
  print(f"  non-embedding (N):    {size.non_embedding_params:,}")
  print(f"  embedding:            {size.embedding_params:,}")
  print(f"  matmul (for MFU):     {size.matmul_params:,}")
  print(f"train FLOPs per token:  {flops:.4g} ({length_text}; 6N + attention, PaLM app. B)")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="t5x-like", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  info = commands.add_parser("info", help="parameter count and FLOPs per token of a config",
                             epilog="Override fields with --config.FIELD=VALUE.")
  info.add_argument("--config", required=True, help="experiments/FILE.py or FILE.py:VARIANT")
  info.add_argument("--show-config", action="store_true", help="print the resolved config too")
  info.set_defaults(run=_info)

  args, overrides = parser.parse_known_args(argv)
  try:
    args.run(args, overrides)
  except ConfigError as error:
    print(f"t5x-like {args.command}: error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
