"""The `t5x-like` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys

import jax

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


def _train(args, overrides) -> None:
  """Trains (or resumes) in the workdir, then reports validation loss and samples."""
  from t5x_like import distributed
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  config = load_config(args.config)
  apply_overrides(config, overrides)
  from t5x_like.trainer import Trainer  # heavy imports only for the commands that need them
  trainer = Trainer(config, args.workdir)
  result = trainer.train()
  if jax.process_index() != 0:
    return
  validation = result.validation
  print(f"step {result.step}: validation loss {validation['loss']:.4f}, "
        f"perplexity {validation['perplexity']:.2f}, token accuracy {validation['accuracy']:.3f}")
  from t5x_like.data.tokenizer import load_tokenizer
  from t5x_like.samples import sample_texts
  model = trainer.model_from(trainer.state["params"])
  model.eval()
  for prompt, text in sample_texts(model, load_tokenizer(config.data.tokenizer), args.sample_prompt):
    print(f"--- {prompt!r}\n{text}")


def _sweep(args, overrides) -> None:
  """Runs (or continues) every point of a scaling sweep."""
  from t5x_like.scaling.sweep import run_sweep
  config = load_config(args.config)
  apply_overrides(config, overrides)
  rows = run_sweep(config, args.workdir)
  print(f"{len(rows)} runs; results in {args.workdir}/results.csv and results.json")


def _fit(args, overrides) -> None:
  """Fits Kaplan and Chinchilla laws to a sweep's results; writes fit.json and plots."""
  import json
  import pathlib
  from t5x_like.scaling.report import fit_report, load_results, plot
  if overrides:
    raise ConfigError(f"fit takes no config overrides, got {overrides}")
  sweep_dir = pathlib.Path(args.sweep_dir)
  rows = load_results(sweep_dir)
  from t5x_like.scaling.laws import COARSE_GRID
  report = fit_report(rows, loss_key=args.loss, bootstrap_samples=args.bootstrap, holdout=args.holdout,
                      grid=COARSE_GRID if args.coarse_grid else None)
  (sweep_dir / "fit.json").write_text(json.dumps(report, indent=1))
  paths = plot(rows, report, sweep_dir / "plots", loss_key=args.loss)
  chinchilla = report["chinchilla"]
  ci = chinchilla["confidence_95"]
  print(f"Chinchilla: L = {chinchilla['e']:.3f} + {chinchilla['a']:.4g}/N^{chinchilla['alpha']:.3f} "
        f"+ {chinchilla['b']:.4g}/D^{chinchilla['beta']:.3f}  (R^2 {chinchilla['r_squared']:.3f})")
  print(f"  95% bootstrap: alpha [{ci['alpha'][0]:.3f}, {ci['alpha'][1]:.3f}], "
        f"beta [{ci['beta'][0]:.3f}, {ci['beta'][1]:.3f}], E [{ci['e'][0]:.3f}, {ci['e'][1]:.3f}]")
  joint = report["kaplan_joint"]
  print(f"Kaplan joint: alpha_N {joint['alpha_n']:.3f}, alpha_D {joint['alpha_d']:.3f} "
        f"(R^2 {joint['r_squared']:.3f})")
  if "extrapolation" in report:
    print(f"extrapolation to the {report['extrapolation']['held_out_runs']} largest-compute run(s): "
          f"max relative error {report['extrapolation']['max_abs_relative_error']:.2%}")
  print(f"wrote {sweep_dir / 'fit.json'} and {', '.join(str(p) for p in paths)}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="t5x-like", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  train = commands.add_parser("train", help="train or resume a model in --workdir",
                              epilog="Override fields with --config.FIELD=VALUE. Re-running the "
                                     "same command resumes from the newest checkpoint.")
  train.add_argument("--config", required=True, help="experiments/FILE.py or FILE.py:VARIANT")
  train.add_argument("--workdir", required=True, help="checkpoints, metrics and the resolved config")
  train.add_argument("--sample-prompt", action="append", default=[],
                     help="a prompt to continue after training (repeatable)")
  train.add_argument("--coordinator_address", help="host:port of process 0 in a multi-process run")
  train.add_argument("--num_processes", type=int)
  train.add_argument("--process_id", type=int)
  train.set_defaults(run=_train)
  info = commands.add_parser("info", help="parameter count and FLOPs per token of a config",
                             epilog="Override fields with --config.FIELD=VALUE.")
  info.add_argument("--config", required=True, help="experiments/FILE.py or FILE.py:VARIANT")
  info.add_argument("--show-config", action="store_true", help="print the resolved config too")
  info.set_defaults(run=_info)

  sweep = commands.add_parser("sweep", help="run or continue a scaling-law sweep")
  sweep.add_argument("--config", required=True, help="experiments/scaling/FILE.py")
  sweep.add_argument("--workdir", required=True, help="one subdirectory per point, plus results")
  sweep.set_defaults(run=_sweep)
  fit = commands.add_parser("fit", help="fit scaling laws to a sweep's results")
  fit.add_argument("sweep_dir")
  fit.add_argument("--loss", default="validation_loss", choices=("validation_loss", "train_loss"))
  fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
  fit.add_argument("--holdout", type=int, default=1, help="largest-compute runs held out to test extrapolation")
  fit.add_argument("--coarse-grid", action="store_true",
                   help="32 starting points instead of Hoffmann et al.'s 5400 (seconds instead of ~20 s)")
  fit.set_defaults(run=_fit)

  args, overrides = parser.parse_known_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes
  try:
    args.run(args, overrides)
  except ConfigError as error:
    print(f"t5x-like {args.command}: error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
