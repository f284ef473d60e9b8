"""N x D sweeps: every point an ordinary training run in its own workdir.

Re-running a sweep skips points whose `result.json` exists and resumes interrupted ones
from their checkpoints (the trainer resumes by itself), so the command is restartable; a
point whose config changed since it ran (its `point.json`) is refused, not mixed in.
Model sizes follow one size parameter s at a fixed aspect ratio, as Kaplan et al. (2020,
sec. 3.1) found shape matters little at fixed N: num_layers = s,
emb_dim = aspect_ratio * s, num_heads = emb_dim / head_dim, mlp_dim = mlp_ratio * emb_dim.
"""

from __future__ import annotations

import concurrent.futures
import csv
import functools
import json
import logging
import math
import multiprocessing
import os
import pathlib
import signal
import time

import ml_collections
from flax import traverse_util
from tqdm import tqdm

from models.config import ConfigError, ModelConfig, first_line
from models.model_size import model_size, train_flops_per_sequence
from t5x_like.config import base_config
from t5x_like.preemption import Preempted
from t5x_like.scaling.report import RESULT_FIELDS, read_result

logger = logging.getLogger(__name__)


def default_sweep_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      sizes=(1, 2, 3, 4, 5),
      aspect_ratio=64,
      head_dim=32,
      mlp_ratio=4,
      token_budgets=(2**19, 2**20, 2**21, 2**22),
      seeds=(0,),
      # 'kaplan': LR(N) = 0.003239 - 0.0001395 ln N (Kaplan et al. eq. D.1); 'fixed': the base config's.
      learning_rate_rule="kaplan",
      executor="local",  # local | ray
      workers=1,  # the local executor's processes; under Ray the cluster's free resources decide
      # The GPUs each point's Ray task reserves. Ray hides every GPU from a task that reserves none,
      # so on a GPU cluster set it (a node's count for one point a node), or the points train on CPU.
      gpus_per_point=0.0,
  ))


def kaplan_learning_rate(non_embedding_params: int) -> float:
  return 0.003239 - 0.0001395 * math.log(non_embedding_params)


# The base config's fields that sweep_points sets for each point, and the sweep fields that decide
# them. The seeds are not among them: a point's seeds are the base's plus its replicate number.
POINT_FIELDS = {"model.num_layers": "sweep.sizes", "model.emb_dim": "sweep.aspect_ratio",
                "model.num_heads": "sweep.head_dim", "model.head_dim": "sweep.head_dim",
                "model.mlp_dim": "sweep.mlp_ratio", "train.steps": "sweep.token_budgets",
                "train.checkpoint_every": "sweep.token_budgets", "train.eval_every": "sweep.token_budgets",
                "train.log_every": "sweep.token_budgets"}


def check_overrides_apply(config: ml_collections.ConfigDict, overridden: list[str]) -> None:
  """Refuses `--config.base.FIELD` overrides that every point would replace: they changed nothing."""
  for name in overridden:
    if not name.startswith("base."):
      continue
    decided_by = POINT_FIELDS.get(name.removeprefix("base."))
    if name == "base.train.optimizer.learning_rate" and config.sweep.learning_rate_rule == "kaplan":
      decided_by = "sweep.learning_rate_rule='kaplan' (set it to 'fixed' to use base's)"
    if decided_by:
      raise ConfigError(f"--config.{name}: the sweep sets it for each point from {decided_by}; change that instead")


def sweep_points(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(name, full training config) for every size x token budget x seed."""
  sweep, base = config.sweep, config.base
  if base.model.arch != "decoder":
    raise ConfigError(f"sweeps size decoders; base.model.arch={base.model.arch!r}")
  tokens_per_step = base.data.batch_size * base.data.seq_len
  for field in ("aspect_ratio", "head_dim", "mlp_ratio", "workers"):
    if isinstance(sweep[field], bool) or not isinstance(sweep[field], int) or sweep[field] < 1:
      raise ConfigError(f"sweep.{field}={sweep[field]!r} must be a positive integer")
  if isinstance(sweep.gpus_per_point, bool) or not isinstance(sweep.gpus_per_point, (int, float)) \
      or not sweep.gpus_per_point >= 0:
    raise ConfigError(f"sweep.gpus_per_point={sweep.gpus_per_point!r} must be a number, 0 or more")
  if sweep.learning_rate_rule not in ("kaplan", "fixed"):
    raise ConfigError(f"sweep.learning_rate_rule={sweep.learning_rate_rule!r} is not one of ('kaplan', 'fixed')")
  for field in ("sizes", "token_budgets", "seeds"):
    if not sweep[field]:  # the sweep would run nothing and write empty results
      raise ConfigError(f"sweep.{field} is empty; it must name at least one value")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < (0 if field == "seeds" else 1)
           for v in sweep[field]):
      kind = "non-negative" if field == "seeds" else "positive"
      raise ConfigError(f"sweep.{field}={tuple(sweep[field])} must hold {kind} integers")
    if len(set(sweep[field])) < len(sweep[field]):  # a point trained twice, into one workdir
      raise ConfigError(f"sweep.{field}={tuple(sweep[field])} names a value twice")
  points = []
  for size in sweep.sizes:
    emb_dim = sweep.aspect_ratio * size
    if emb_dim % sweep.head_dim:
      raise ConfigError(f"sweep.aspect_ratio * size = {emb_dim} is not a multiple of sweep.head_dim="
                        f"{sweep.head_dim}")
    num_heads = emb_dim // sweep.head_dim
    for tokens in sweep.token_budgets:
      if tokens % tokens_per_step:
        raise ConfigError(f"sweep.token_budgets entry {tokens} is not a whole number of batches "
                          f"({tokens_per_step} tokens each)")
      steps = tokens // tokens_per_step
      for seed in sweep.seeds:
        point = ml_collections.ConfigDict(base.to_dict())
        # The sweep's head_dim sets the heads; the base's grouping of kv heads stays.
        point.model.update(num_layers=size, emb_dim=emb_dim, num_heads=num_heads, head_dim=None,
                           mlp_dim=sweep.mlp_ratio * emb_dim)
        point.train.update(steps=steps, seed=base.train.seed + seed, checkpoint_every=max(steps // 4, 1),
                           eval_every=steps, log_every=max(steps // 20, 1))
        point.data.seed = base.data.seed + seed  # a replicate draws new weights and a new data order
        model_config = ModelConfig.from_dict(point.model)  # refuses, e.g., kv heads that do not divide the heads
        if sweep.learning_rate_rule == "kaplan":
          non_embedding = model_size(model_config).non_embedding_params
          point.train.optimizer.learning_rate = kaplan_learning_rate(non_embedding)
          if point.train.optimizer.learning_rate <= 0:  # the fit of Kaplan et al. reaches 0 near 1.2e10
            raise ConfigError(f"sweep.learning_rate_rule='kaplan' gives size {size} ({non_embedding:.3g} "
                              f"non-embedding parameters) a learning rate of "
                              f"{point.train.optimizer.learning_rate:.3g}; set it to 'fixed' and choose "
                              f"base.train.optimizer.learning_rate")
        points.append((f"s{size}_tokens{tokens}_seed{seed}", point))
  return points


def train_point(config_json: str, workdir: str) -> dict:
  """One point, in its own process: train (or resume), then write result.json."""
  from t5x_like.trainer import Trainer, updates_applied
  config = ml_collections.ConfigDict(json.loads(config_json))
  start = time.perf_counter()
  trainer = Trainer(config, workdir)
  result = trainer.train()
  model_config = ModelConfig.from_dict(config.model)
  size = model_size(model_config)
  # D counts the batches the model learned from: train.nonfinite='skip' drops a step's update.
  steps, batch, seq_len = int(updates_applied(trainer.state["opt_state"])), config.data.batch_size, config.data.seq_len
  if steps == 0:
    raise ConfigError(f"every update of {pathlib.Path(workdir).name} was skipped (non-finite); it measured nothing")
  if steps < config.train.steps:
    logger.warning("%s: %d of %d updates were skipped (non-finite); its tokens and FLOPs count the %d applied",
                   pathlib.Path(workdir).name, config.train.steps - steps, config.train.steps, steps)
  row = {"name": pathlib.Path(workdir).name, "non_embedding_params": size.non_embedding_params,
         "total_params": size.total_params, "tokens": steps * batch * seq_len,
         "flops": steps * batch * train_flops_per_sequence(model_config, seq_len),
         "train_loss": result.train_loss, "validation_loss": result.validation["loss"],
         "wall_seconds": time.perf_counter() - start}
  (pathlib.Path(workdir) / "result.json").write_text(json.dumps(row, indent=1))
  return row


class PointsFailed(ConfigError):
  """Some points of a sweep raised; the message names each, and the others' results are written."""


def _ray_submit(points, gpus_per_point: float):
  """(name, a function returning the point's row or raising its error) as each point ends."""
  import ray
  if not ray.is_initialized():
    ray.init()
  remote = ray.remote(num_gpus=gpus_per_point)(train_point)
  refs = {remote.remote(json.dumps(config.to_dict()), str(workdir)): name for name, config, workdir in points}
  pending = list(refs)
  while pending:
    finished, pending = ray.wait(pending, num_returns=1)
    yield refs[finished[0]], functools.partial(ray.get, finished[0])


def _share_accelerator_memory(workers: int) -> None:
  """Runs in each local worker before its JAX backend starts. JAX takes 75% of a GPU's memory up
  front, so a second worker on the same GPU would find too little to start; each takes its share
  of those 75% instead. A fraction already set in the environment wins; CPUs do not read it."""
  if workers > 1:
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.75 / workers:.4f}")


def worker_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
  """`workers` spawned processes (not this one's JAX runtime) that share the accelerators."""
  return concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_share_accelerator_memory, initargs=(workers,))


def _local_submit(points, workers: int):
  """As _ray_submit, in a worker_pool, each worker running points one after another: a worker
  imports and sets up JAX once for all its points. Only as many points as workers are handed to
  the pool at a time, so that a sweep stopped early (Ctrl-C, SIGTERM) has none queued: its running
  points get SIGTERM and save the step they reached for a rerun, and the workers end. The pool's
  own shutdown had waited for every queued point, and a worker outlived a sweep SIGTERM ended."""
  others = set(multiprocessing.active_children())  # a notebook's own, say: not the pool's to stop
  pool = worker_pool(workers)
  waiting, running = list(points), {}
  try:
    while waiting or running:
      while waiting and len(running) < workers:
        name, config, workdir = waiting.pop(0)
        running[pool.submit(train_point, json.dumps(config.to_dict()), str(workdir))] = name
      done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        yield running.pop(future), future.result
  except BaseException:
    pool_workers = [child for child in multiprocessing.active_children() if child not in others]
    for worker in pool_workers:
      worker.terminate()  # SIGTERM: a worker amid a point saves its step
    concurrent.futures.wait(running, timeout=STOP_SECONDS)
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in pool_workers:
      worker.kill()
      worker.join(timeout=5)
    raise
  pool.shutdown()


# How long a stopped sweep waits for each running point to save its step.
STOP_SECONDS = 120


def _stop_on_sigterm(signum, frame):
  """SIGTERM as an exception in the sweep's own process, which then stops its workers (_local_submit)."""
  raise Preempted("the sweep was stopped (SIGTERM): its running points saved the step they reached; rerun the "
                  "same command to go on")


def run_sweep(config: ml_collections.ConfigDict, sweep_dir: pathlib.Path) -> list[dict]:
  """Runs every unfinished point; returns all results (also written as results.json/.csv)."""
  sweep_dir = pathlib.Path(sweep_dir)
  if sweep_dir.exists() and not sweep_dir.is_dir():
    raise ConfigError(f"the sweep's workdir {sweep_dir} is a file, not a directory")
  sweep_dir.mkdir(parents=True, exist_ok=True)
  points = sweep_points(config)
  results, todo = {}, []
  for name, point in points:
    check_same_point(sweep_dir / name, point)
    done_file = sweep_dir / name / "result.json"
    if done_file.exists():
      results[name] = read_result(done_file)
    else:
      todo.append((name, point, sweep_dir / name))
  progress = tqdm(total=len(points), initial=len(results), desc="sweep points", unit="run")
  if config.sweep.executor == "ray":
    finished = _ray_submit(todo, config.sweep.gpus_per_point)
  elif config.sweep.executor == "local":
    finished = _local_submit(todo, config.sweep.workers)
  else:
    raise ConfigError(f"sweep.executor={config.sweep.executor!r} is not one of ('local', 'ray')")
  failures = {}
  on_sigterm = None
  if config.sweep.executor == "local":  # a Ray cluster's tasks are its own to stop
    try:
      on_sigterm = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    except ValueError:  # not the main thread, where Python takes no signals
      pass
  try:
    for name, result in finished:
      try:
        results[name] = result()
      except Exception as error:  # one point's failure (a NaN loss, a crash) leaves the others running
        failures[name] = first_line(error)
      write_results(sweep_dir, [results[n] for n, _ in points if n in results])
      progress.update(1)
  finally:
    if on_sigterm is not None:
      signal.signal(signal.SIGTERM, on_sigterm)
    finished.close()  # a stopped sweep stops its workers now, not when the generator is collected
  progress.close()
  rows = [results[n] for n, _ in points if n in results]
  write_results(sweep_dir, rows)
  if failures:
    raise PointsFailed(f"{len(failures)} of {len(points)} sweep points failed ("
                       + "; ".join(f"{name}: {error}" for name, error in sorted(failures.items()))
                       + f"); {sweep_dir}/results.json holds the other {len(rows)}; rerun the sweep to retry")
  return rows


def check_same_point(workdir: pathlib.Path, point: ml_collections.ConfigDict) -> None:
  """Records a point's config in its workdir (point.json), or refuses one that differs from the
  recorded: a rerun under another base config would otherwise keep old results and resume old
  checkpoints under a name that says nothing of the change."""
  wanted = json.loads(json.dumps(point.to_dict()))
  recorded_file = workdir / "point.json"
  if not recorded_file.exists():
    workdir.mkdir(parents=True, exist_ok=True)
    recorded_file.write_text(json.dumps(wanted, indent=1))
    return
  try:
    recorded = json.loads(recorded_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError):
    recorded = None
  if not isinstance(recorded, dict):  # cut short, or not an object
    raise ConfigError(f"{recorded_file} is not the JSON object sweep writes; remove that point's directory "
                      f"to rerun it")
  recorded = traverse_util.flatten_dict(recorded, sep=".")
  wanted = traverse_util.flatten_dict(wanted, sep=".")
  # A field added to the code since the point was recorded counts as changed only if set off its default.
  defaults = traverse_util.flatten_dict(json.loads(json.dumps(base_config().to_dict())), sep=".")
  changed = sorted(key for key in recorded.keys() | wanted.keys()
                   if recorded.get(key, defaults.get(key)) != wanted.get(key))
  if changed:
    raise ConfigError(f"{workdir} was run with another config ({', '.join(changed[:5])} differ); "
                      f"sweep into a new directory, or remove that point's directory to rerun it")


def write_results(sweep_dir: pathlib.Path, rows: list[dict]) -> None:
  (sweep_dir / "results.json").write_text(json.dumps(rows, indent=1))
  with open(sweep_dir / "results.csv", "w", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=RESULT_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
