"""The `t5x-like` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback

import jax

from models.config import ConfigError, ModelConfig, first_line
from models.model_size import model_size, train_flops_per_token
from t5x_like.config import (apply_overrides, base_config, check_known_fields, fill_defaults, load_config,
                             load_run_config, nonempty_path)
from t5x_like.preemption import EXIT_STATUS as PREEMPTED_EXIT_STATUS, Preempted


def _info(args, overrides) -> None:
  """Prints the config, its parameter counts and training FLOPs per token."""
  config = load_run_config(args.config)
  apply_overrides(config, overrides)
  model = ModelConfig.from_dict(config.model)
  size = model_size(model)
  if model.arch == "encoder_decoder":
    lengths = (config.data.input_len, config.data.target_len)
    length_text = f"input length {lengths[0]}, target length {lengths[1]}"
  else:
    lengths = (config.data.seq_len, None)
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
  print(f"train FLOPs per token:  {flops:.4g} ({length_text}; 6 x matmul + attention, PaLM app. B)")


def _train(args, overrides) -> None:
  """Joins the run's other processes, if any, and trains with them: a failure on one host stops all."""
  from t5x_like import distributed  # it imports flax, which only training needs
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  with distributed.stop_together():
    _train_and_sample(args, overrides)


def _train_and_sample(args, overrides) -> None:
  """Trains (or resumes) in the workdir, then reports validation loss and samples."""
  from t5x_like import distributed

  def run_config():  # each host reads its own copy of the experiment file
    config = load_run_config(args.config)
    apply_overrides(config, overrides)
    return config
  config = distributed.check_on_every_process(run_config)
  from t5x_like.data.tokenizer import load_tokenizer
  from t5x_like.samples import sample_room, sample_texts
  from t5x_like.trainer import Trainer  # heavy imports only for the commands that need them
  trainer = Trainer(config, args.workdir)
  tokenizer = load_tokenizer(config.data.tokenizer)
  sample_room(trainer.model_config, tokenizer, args.sample_prompt)  # a prompt too long stops it now, not after
  result = trainer.train()
  validation = result.validation
  shown = [f"validation loss {validation['loss']:.4f}"]  # a mode reports perplexity and accuracy if it can
  shown += [f"perplexity {validation['perplexity']:.2f}"] if "perplexity" in validation else []
  shown += [f"token accuracy {validation['accuracy']:.3f}"] if "accuracy" in validation else []
  printing = jax.process_index() == 0
  if printing:
    print(f"step {result.step}: {', '.join(shown)}", flush=True)
  # Every process samples, on the model as training left it split over them.
  model = trainer.model_from(trainer.state["params"], trainer.rest)
  model.eval()
  with jax.set_mesh(trainer.mesh):
    samples = sample_texts(model, tokenizer, args.sample_prompt, prefix_lm=trainer.prefix_lm)
  for prompt, text in samples if printing else ():
    print(f"--- {prompt!r}\n{text}")


def _load(args, overrides):
  """(trainer with the newest checkpoint, tokenizer) for the inference commands."""
  from t5x_like.data.tokenizer import load_tokenizer
  from t5x_like.trainer import Trainer
  if overrides:
    raise ConfigError(f"{args.command} reads the run's saved config; unexpected arguments {overrides}")
  output = getattr(args, "output", None)
  if output and (os.path.isdir(output) or not os.path.isdir(os.path.dirname(os.path.abspath(output)))):
    # Named now, not once every prompt or item has been run.
    raise ConfigError(f"--output {output} is a directory or its directory does not exist")
  trainer = Trainer.from_workdir(args.workdir)
  return trainer, load_tokenizer(trainer.config.data.tokenizer)


# The decode flags that only one strategy reads (DecodeConfig's defaults where not given).
STRATEGY_FLAGS = {"sample": ("temperature", "top_k", "top_p"), "beam": ("num_beams", "length_penalty")}


def _decode(args, overrides) -> None:
  """Continues prompts (a decoder) or decodes inputs (an encoder-decoder) from a trained run."""
  import json
  from t5x_like.decoding import DecodeConfig, generate
  from t5x_like.samples import excluded_ids, generation_inputs, prompt_ids, vocab_limit
  trainer, tokenizer = _load(args, overrides)
  if trainer.model_config.arch == "encoder":
    raise ConfigError("decode needs a decoder or an encoder-decoder; this run trained an encoder")
  prompts = list(args.prompt) + (_read_prompts(args.input) if args.input else [])
  if not prompts:
    raise ConfigError("give --prompt TEXT (repeatable) or --input prompts.jsonl")
  chosen = {}
  for strategy, flags in STRATEGY_FLAGS.items():
    given = {flag: getattr(args, flag) for flag in flags if getattr(args, flag) is not None}
    if given and args.strategy != strategy:  # it would change nothing: say so, not ignore it
      raise ConfigError(f"{', '.join('--' + f.replace('_', '-') for f in given)} "
                        f"{'apply' if len(given) > 1 else 'applies'} to --strategy {strategy}, not {args.strategy}")
    chosen.update(given)
  if args.seed is not None and args.strategy != "sample":  # greedy and beam search draw nothing
    raise ConfigError(f"--seed applies to --strategy sample, not {args.strategy}")
  config = DecodeConfig(strategy=args.strategy, max_new_tokens=args.max_new_tokens,
                        repetition_penalty=args.repetition_penalty,
                        vocab_limit=vocab_limit(tokenizer, trainer.model_config.arch),
                        excluded_ids=excluded_ids(tokenizer, trainer.model_config.arch),
                        prefix_lm=trainer.prefix_lm, **chosen)
  model = trainer.model_from(trainer.state["params"])
  model.eval()
  arch = trainer.model_config.arch
  decoder_prompts, encoder_inputs = generation_inputs(arch, [prompt_ids(tokenizer, arch, p) for p in prompts])
  with jax.set_mesh(trainer.mesh):
    outputs = generate(model, decoder_prompts, config, seed=args.seed or 0, encoder_inputs=encoder_inputs)
  rows = [{"prompt": p, "completion": tokenizer.decode(o)} for p, o in zip(prompts, outputs)]
  if args.output:
    with open(args.output, "w", encoding="utf-8") as file:
      file.writelines(json.dumps(row) + "\n" for row in rows)
  else:
    for row in rows:
      print(f"--- {row['prompt']!r}\n{row['prompt'] if trainer.model_config.arch == 'decoder' else ''}"
            f"{row['completion']}")


def _read_prompts(path: str) -> list[str]:
  """The "prompt" of each line of a JSONL file, empty ones included; a bad line is named."""
  from t5x_like.data.documents import jsonl_objects
  prompts = []
  for number, record in jsonl_objects(path):
    if not isinstance(record.get("prompt"), str):
      raise ConfigError(f"{path}, line {number}: no string \"prompt\" field")
    prompts.append(record["prompt"])
  return prompts


def _eval(args, overrides) -> None:
  """Loss, perplexity, token accuracy and bits per byte on a split or a text file."""
  from t5x_like import evaluation
  if args.text_file and (args.split or args.batches):
    raise ConfigError("--split and --batches choose batches of a split; --text-file scores the whole file")
  trainer, tokenizer = _load(args, overrides)
  if args.text_file:
    from t5x_like.data import documents
    texts = [record["text"] for _, record in documents.records(args.text_file, ("text",))]
    result = evaluation.evaluate_documents(trainer, tokenizer, texts)
    where = args.text_file
  else:
    args.split, args.batches = args.split or "validation", args.batches or 20
    if warning := trainer.split_too_small(args.split, args.batches, "--batches"):
      logging.getLogger(__name__).warning(warning)
    result = evaluation.evaluate_split(trainer, tokenizer, args.split, args.batches)
    where = f"{args.split} split ({args.batches} batches)"
  print(f"{where}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
        f"bits per byte {result['bits_per_byte']:.4f}, token accuracy {result['accuracy']:.3f} "
        f"({int(result['tokens'])} tokens, {result['bytes']} bytes)")


BUILT_IN_TASK_ITEMS = 200


def _score(args, overrides) -> None:
  """Few-shot rank scoring on a multiple-choice JSONL task; writes a JSON report."""
  import json
  from t5x_like import evaluation
  trainer, tokenizer = _load(args, overrides)
  if args.task == "austen_sentence_completion":
    from t5x_like.data import sources
    source = sources.open_split("austen", "validation", ("text",), trainer.config.data.data_dir)
    paragraphs = [source[i]["text"].decode("utf-8") for i in range(len(source))]
    items = evaluation.sentence_completion_task(paragraphs, size=args.items or BUILT_IN_TASK_ITEMS, seed=args.seed)
  else:
    items = evaluation.read_task(args.task)[:args.items]  # None: every item
  model = trainer.model_from(trainer.state["params"])
  model.eval()
  with jax.set_mesh(trainer.mesh):
    report = evaluation.few_shot_score(model, tokenizer, items, shots=args.shots, seed=args.seed,
                                       prefix_lm=trainer.prefix_lm)
  report.update(task=args.task, workdir=str(args.workdir))
  if args.output:
    with open(args.output, "w", encoding="utf-8") as file:
      json.dump(report, file, indent=1)
  print(f"{args.task}, {report['shots']}-shot, {report['items']} items: accuracy {report['accuracy']:.3f} "
        f"(per-token mean {report['accuracy_per_token']:.3f}, calibrated {report['accuracy_calibrated']:.3f}; "
        f"chance {report['chance']:.3f})")


def _tokenizer(args, overrides) -> None:
  from t5x_like.data import tokenizer
  if overrides:
    raise ConfigError(f"tokenizer: unexpected arguments {overrides}")
  tokenizer.run(args)


def _sweep(args, overrides) -> None:
  """Runs (or continues) every point of a scaling sweep."""
  import ml_collections
  from t5x_like.scaling.sweep import check_overrides_apply, default_sweep_config, run_sweep
  config = load_config(args.config)
  if "sweep" not in config:
    raise ConfigError(f"{args.config} has no sweep section; sweep configs live in experiments/scaling/")
  known = ml_collections.ConfigDict(dict(base=base_config(), sweep=default_sweep_config()))
  check_known_fields(config, args.config, known)
  if "base" not in config:
    raise ConfigError(f"{args.config} has no base section: the training config every point starts from")
  fill_defaults(config, known)
  apply_overrides(config, overrides)
  check_overrides_apply(config, [override.removeprefix("--config.").partition("=")[0] for override in overrides])
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
        f"+ {chinchilla['b']:.4g}/D^{chinchilla['beta']:.3f}  (R^2 {chinchilla['r_squared']:.3f}; N counts "
        f"non-embedding parameters, as Kaplan et al. do, where Hoffmann et al. count all)")
  e_interval = f"[{ci['e'][0]:.3f}, {ci['e'][1]:.3f}]" if ci["e"] else "none (fitted to 0: these losses fix no floor)"
  print(f"  95% bootstrap: alpha [{ci['alpha'][0]:.3f}, {ci['alpha'][1]:.3f}], "
        f"beta [{ci['beta'][0]:.3f}, {ci['beta'][1]:.3f}], E {e_interval}")
  joint = report["kaplan_joint"]
  print(f"Kaplan joint: alpha_N {joint['alpha_n']:.3f}, alpha_D {joint['alpha_d']:.3f} "
        f"(R^2 {joint['r_squared']:.3f})")
  check = report.get("extrapolation", {})
  if "skipped" in check:
    print(f"extrapolation check skipped: {check['skipped']}")
  elif check:
    print(f"extrapolation to the {check['held_out_points']} largest-compute point(s), {check['held_out_runs']} "
          f"run(s): max relative error {check['max_abs_relative_error']:.2%}")
  print(f"wrote {sweep_dir / 'fit.json'} and {', '.join(str(p) for p in paths)}")


def _at_least(minimum: int):
  """An argparse type: an integer no smaller than minimum."""
  def parse(text: str) -> int:
    value = int(text)
    if value < minimum:
      raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
    return value
  return parse


# Ctrl-C's exit status (128 + SIGINT), as a shell reports a process SIGINT ended.
INTERRUPTED_EXIT_STATUS = 130

# What to lower when XLA cannot allocate a command's buffers.
OUT_OF_MEMORY = {
    "train": "lower data.batch_size (train.grad_accum_steps splits a batch into steps), set model.remat, or "
             "shard the model over more devices",
    "eval": "the run's data.batch_size does not fit this machine's memory; evaluate on a larger one",
    "score": "fewer --shots make shorter sequences",
    "decode": "lower --max-new-tokens, --num-beams or the number of prompts",
}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="t5x-like", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  train = commands.add_parser("train", help="train or resume a model in --workdir",
                              epilog="Override fields with --config.FIELD=VALUE. Re-running the "
                                     "same command resumes from the newest checkpoint.")
  train.add_argument("--config", required=True, type=nonempty_path, help="experiments/FILE.py or FILE.py:VARIANT")
  train.add_argument("--workdir", required=True, type=nonempty_path,
                     help="checkpoints, metrics and the resolved config")
  train.add_argument("--sample-prompt", action="append", default=[],
                     help="a prompt to continue after training (repeatable)")
  train.add_argument("--coordinator_address", help="host:port of process 0 in a multi-process run")
  train.add_argument("--num_processes", type=int)
  train.add_argument("--process_id", type=int)
  train.set_defaults(run=_train)
  info = commands.add_parser("info", help="parameter count and FLOPs per token of a config",
                             epilog="Override fields with --config.FIELD=VALUE.")
  info.add_argument("--config", required=True, type=nonempty_path, help="experiments/FILE.py or FILE.py:VARIANT")
  info.add_argument("--show-config", action="store_true", help="print the resolved config too")
  info.set_defaults(run=_info)

  decode = commands.add_parser("decode", help="generate from a trained run")
  decode.add_argument("--workdir", required=True, type=nonempty_path)
  decode.add_argument("--prompt", action="append", default=[],
                      help="repeatable; an encoder-decoder's may mark the spans to fill with <extra_id_N> "
                           "written against the word before it, as span corruption cuts before a word's space "
                           "('Mr. Darcy<extra_id_0> Elizabeth'); without one, <extra_id_0> is put at its end")
  decode.add_argument("--input", type=nonempty_path, help="JSONL with a 'prompt' field per line")
  decode.add_argument("--output", type=nonempty_path,
                      help="JSONL to write {prompt, completion} rows to (default: print)")
  decode.add_argument("--strategy", default="greedy", choices=("greedy", "sample", "beam"))
  decode.add_argument("--max-new-tokens", type=int, default=64)
  decode.add_argument("--temperature", type=float, help="sample only (default 1.0)")
  decode.add_argument("--top-k", type=int, help="sample only (default 0: off)")
  decode.add_argument("--top-p", type=float, help="sample only (default 1.0: off)")
  decode.add_argument("--repetition-penalty", type=float, default=1.0)
  decode.add_argument("--num-beams", type=int, help="beam only (default 4)")
  decode.add_argument("--length-penalty", type=float, help="beam only (default 0.6)")
  decode.add_argument("--seed", type=int, help="sample only (default 0)")
  decode.set_defaults(run=_decode)
  evaluate = commands.add_parser("eval", help="loss, perplexity and bits per byte of a trained run")
  evaluate.add_argument("--workdir", required=True, type=nonempty_path)
  evaluate.add_argument("--split", choices=("train", "validation"), help="default: validation")
  evaluate.add_argument("--batches", type=_at_least(1), help="default: 20")
  evaluate.add_argument("--text-file", type=nonempty_path,
                        help="evaluate on this file's documents instead of a split (decoders): a text file's "
                             "paragraphs or a JSONL file's `text` fields, read as training reads them")
  evaluate.set_defaults(run=_eval)
  score = commands.add_parser("score", help="few-shot rank scoring on a multiple-choice task (decoders)")
  score.add_argument("--workdir", required=True, type=nonempty_path)
  score.add_argument("--task", default="austen_sentence_completion", type=nonempty_path,
                     help="JSONL of {context, options, answer}, or austen_sentence_completion (built "
                          "in: Austen's validation sentences, which ending fits)")
  score.add_argument("--shots", type=_at_least(0), default=0)
  score.add_argument("--items", type=_at_least(1), help=f"score the first N items (default: a task file's every "
                     f"item; the built-in task makes {BUILT_IN_TASK_ITEMS})")
  score.add_argument("--seed", type=int, default=0)
  score.add_argument("--output", type=nonempty_path, help="JSON report path")
  score.set_defaults(run=_score)
  tokenizer = commands.add_parser("tokenizer", help="train SentencePiece tokenizers")
  from t5x_like.data import tokenizer as tokenizer_module
  tokenizer_module.add_arguments(tokenizer)
  tokenizer.set_defaults(run=_tokenizer)
  sweep = commands.add_parser("sweep", help="run or continue a scaling-law sweep")
  sweep.add_argument("--config", required=True, type=nonempty_path, help="experiments/scaling/FILE.py")
  sweep.add_argument("--workdir", required=True, type=nonempty_path, help="one subdirectory per point, plus results")
  sweep.set_defaults(run=_sweep)
  fit = commands.add_parser("fit", help="fit scaling laws to a sweep's results")
  fit.add_argument("sweep_dir", type=nonempty_path)
  fit.add_argument("--loss", default="validation_loss", choices=("validation_loss", "train_loss"))
  fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
  fit.add_argument("--holdout", type=int, default=1,
                   help="largest-compute (N, D) points held out to test extrapolation (0: none)")
  fit.add_argument("--coarse-grid", action="store_true",
                   help="32 starting points instead of Hoffmann et al.'s 4500: seconds instead of about a minute "
                        "per Chinchilla fit (2 for the fit and its extrapolation check)")
  fit.set_defaults(run=_fit)

  args, overrides = parser.parse_known_args(argv)
  if argv is None:  # `python -m t5x_like.cli`, or a console script installed before t5x_like/__main__.py
    from t5x_like.__main__ import start_command_process
    start_command_process()  # after jax's import here: the cache only takes effect if it restarts
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes
  if args.command != "train":  # the one command that joins other processes
    return _run(args, overrides)
  from t5x_like import distributed
  try:
    status = _run(args, overrides)
  except BaseException:
    if distributed.alone():
      traceback.print_exc()  # as Python would, before leaving without jax's shutdown barrier
      distributed.exit_if_alone(1)
    raise
  distributed.exit_if_alone(status)
  return status


def _run(args, overrides) -> int:
  """The command's exit status: its own errors are one line each; others raise."""
  try:
    args.run(args, overrides)
  except ConfigError as error:
    print(f"t5x-like {args.command}: error: {error}", file=sys.stderr)
    return 2
  except FloatingPointError as error:
    from t5x_like.trainer import NonFiniteLossError  # imported by then: only training raises it
    if not isinstance(error, NonFiniteLossError):  # jax_debug_nans's, whose traceback is the point
      raise
    print(f"t5x-like {args.command}: error: {error}", file=sys.stderr)  # it says what to change
    return 1
  except Preempted as error:
    print(f"t5x-like {args.command}: {error}", file=sys.stderr)
    return PREEMPTED_EXIT_STATUS
  except KeyboardInterrupt:
    print(f"t5x-like {args.command}: interrupted", file=sys.stderr)
    return INTERRUPTED_EXIT_STATUS
  except OSError as error:
    if error.errno != errno.ENOSPC:  # a checkpoint's (checkpoints.OutOfSpaceError), the metrics', a dataset's
      raise
    print(f"t5x-like {args.command}: error: {error}", file=sys.stderr)
    return 1
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error) and "out of memory" not in str(error).lower():  # CPU, GPU, TPU
      raise
    hint = OUT_OF_MEMORY.get(args.command, "use a machine with more memory")
    print(f"t5x-like {args.command}: error: out of memory ({first_line(error)}); {hint}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
