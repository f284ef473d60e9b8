"""A tiny sweep end to end through the CLI: table, fit, plots; re-running skips finished
points; the Ray executor against a real local Ray instance."""

import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from models.config import ConfigError, ModelConfig
from models.transformer import build_model
from t5x_like.cli import main
from t5x_like.config import load_config
from t5x_like.data.loader import make_loader
from t5x_like.metrics import read_metrics
from t5x_like.scaling import sweep
from t5x_like.scaling.laws import COARSE_GRID
from t5x_like.scaling.report import fit_report, load_results
from t5x_like.scaling.sweep import check_overrides_apply, sweep_points
from t5x_like.trainer import Trainer

CONFIG = str(pathlib.Path(__file__).resolve().parents[2] / "experiments" / "scaling" / "tiny.py")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("sweep")
  assert main(["sweep", "--config", CONFIG, "--workdir", str(directory)]) == 0
  return directory


def palm_flops(model, seq_len: int, tokens: int) -> int:
  """PaLM's count (app. B) by hand for the sweep's blocks (multi-head, ungated MLP, tied output):
  6 x matmul parameters + 12 x layers x context x attention width, per token."""
  d, layers = model.emb_dim, model.num_layers
  assert model.head_dim is None and model.num_kv_heads is None and not model.mlp_gated
  matmul_params = layers * (4 * d * d + 2 * d * model.mlp_dim) + d * model.vocab_size
  return tokens * (6 * matmul_params + 12 * layers * seq_len * d)


def test_sweep_writes_one_row_per_point(sweep_dir):
  rows = json.loads((sweep_dir / "results.json").read_text())
  budgets = (2048, 4096, 8192)
  assert [r["name"] for r in rows] == [f"s{size}_tokens{tokens}_seed0" for size in (1, 2) for tokens in budgets]
  points = dict(sweep_points(load_config(CONFIG)))
  for row in rows:
    config = points[row["name"]]
    seq_len = config.data.seq_len
    assert row["tokens"] in budgets and row["tokens"] == config.train.steps * config.data.batch_size * seq_len
    assert row["flops"] == palm_flops(config.model, seq_len, row["tokens"])
    # N counted off the initialised parameters; the losses are the point's own logged figures.
    params = nnx.state(build_model(ModelConfig.from_dict(config.model)), nnx.Param)
    total = sum(leaf.size for leaf in jax.tree.leaves(params))
    embedding = params["token_embed"]["embedding"].size
    assert (row["total_params"], row["non_embedding_params"]) == (total, total - embedding)
    logged = {split: read_metrics(sweep_dir / row["name"], split) for split in ("train", "validation")}
    assert row["validation_loss"] == pytest.approx(logged["validation"][-1]["loss"], rel=1e-6)
    last = logged["train"][-config.train.log_every:]
    assert row["train_loss"] == pytest.approx(
        sum(r["loss"] * r["target_tokens"] for r in last) / sum(r["target_tokens"] for r in last), rel=1e-6)
    assert row["wall_seconds"] > 0
  # More data lowers the loss at each size.
  for size in (0, 3):
    assert rows[size]["train_loss"] > rows[size + 1]["train_loss"] > rows[size + 2]["train_loss"]
  assert (sweep_dir / "results.csv").read_text().count("\n") == 7


def test_each_size_is_shaped_by_the_sweep_rules_and_takes_kaplans_learning_rate():
  """experiments/scaling/tiny.py: size s has s layers of width 16 s (aspect ratio 16), heads of 8
  (so 2 s of them) and an MLP twice as wide; its rate is Kaplan et al.'s eq. D.1, 0.003239 -
  0.0001395 ln N, at its non-embedding parameter count N; 'fixed' keeps the base's rate."""
  config = load_config(CONFIG)
  tokens_per_step = config.base.data.batch_size * config.base.data.seq_len
  points = dict(sweep_points(config))
  assert len(points) == 2 * 3
  for size in (1, 2):
    for tokens in (2048, 4096, 8192):
      point = points[f"s{size}_tokens{tokens}_seed0"]
      model = point.model
      assert (model.num_layers, model.emb_dim, model.num_heads, model.mlp_dim) == (size, 16 * size, 2 * size,
                                                                                   32 * size)
      assert point.train.steps * tokens_per_step == tokens
      params = nnx.state(build_model(ModelConfig.from_dict(model)), nnx.Param)
      non_embedding = sum(leaf.size for leaf in jax.tree.leaves(params)) - params["token_embed"]["embedding"].size
      assert point.train.optimizer.learning_rate == pytest.approx(0.003239 - 0.0001395 * np.log(non_embedding))
  config.sweep.learning_rate_rule = "fixed"
  assert {p.train.optimizer.learning_rate for _, p in sweep_points(config)} == {
      config.base.train.optimizer.learning_rate}


def test_seed_replicates_vary_the_weights_and_the_data_order(tmp_path):
  config = load_config(CONFIG)
  config.sweep.seeds = (0, 1)
  points = dict(sweep_points(config))
  first, second = points["s1_tokens2048_seed0"], points["s1_tokens2048_seed1"]
  assert (first.train.seed, first.data.seed) == (0, config.base.data.seed)
  assert (second.train.seed, second.data.seed) == (1, config.base.data.seed + 1)
  weights = [Trainer(point, tmp_path / str(seed)).state["params"] for seed, point in enumerate((first, second))]
  for ours, other in zip(jax.tree.leaves(weights[0]), jax.tree.leaves(weights[1]), strict=True):
    assert not np.array_equal(ours, other) or np.all(ours == 1)  # norm scales start at 1 for every seed
  batches = [next(make_loader(point.data, "train"))["decoder_target_tokens"] for point in (first, second)]
  assert not np.array_equal(*batches)


def test_fit_writes_report_and_plots(sweep_dir, capsys):
  assert main(["fit", str(sweep_dir), "--bootstrap", "5", "--coarse-grid"]) == 0
  report = json.loads((sweep_dir / "fit.json").read_text())
  assert {"chinchilla", "kaplan_joint", "kaplan_n", "kaplan_d", "compute_optimal"} <= set(report)
  for name in ("loss_vs_n.png", "loss_vs_d.png", "loss_vs_compute.png"):
    assert (sweep_dir / "plots" / name).stat().st_size > 10_000
  chinchilla, out = report["chinchilla"], capsys.readouterr().out
  assert f"Chinchilla: L = {chinchilla['e']:.3f} + {chinchilla['a']:.4g}/N^{chinchilla['alpha']:.3f}" in out
  e = chinchilla["confidence_95"]["e"]
  assert (f"E [{e[0]:.3f}, {e[1]:.3f}]" if e else "E none (fitted to 0: these losses fix no floor)") in out
  # The flags reach the fit: validation loss, 5 bootstrap refits, the coarse grid (deterministic, seed 0).
  expected = fit_report(load_results(sweep_dir), loss_key="validation_loss", bootstrap_samples=5, grid=COARSE_GRID)
  assert report == json.loads(json.dumps(expected))


def test_rerun_skips_finished_points_and_runs_the_missing_one(sweep_dir):
  finished = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/result.json")}
  missing = sweep_dir / "s2_tokens4096_seed0" / "result.json"
  lost = json.loads(missing.read_text())
  missing.unlink()
  assert main(["sweep", "--config", CONFIG, "--workdir", str(sweep_dir)]) == 0
  # Its final checkpoint was kept: it resumes there, trains nothing, and reports the same losses.
  rerun = json.loads(missing.read_text())
  assert rerun["train_loss"] == pytest.approx(lost["train_loss"], rel=1e-6)
  assert rerun["validation_loss"] == pytest.approx(lost["validation_loss"])
  for path, mtime in finished.items():
    if path != missing:
      assert path.stat().st_mtime_ns == mtime, f"{path.parent.name} was run again"


def test_rerun_under_another_base_config_is_refused_before_training(sweep_dir, capsys):
  assert main(["sweep", "--config", CONFIG, "--workdir", str(sweep_dir),
               "--config.base.train.optimizer.weight_decay=0.2"]) == 2
  assert "was run with another config (train.optimizer.weight_decay differ)" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
  return [int(status.parent.name) for status in pathlib.Path("/proc").glob("[0-9]*/status")
          if f"\nPPid:\t{pid}\n" in status.read_text(errors="replace")] if pathlib.Path("/proc").is_dir() else []


def _running(pid: int) -> bool:
  """Whether a process exists and has not ended (a zombie, ended but not yet reaped, has)."""
  try:
    return "\nState:\tZ" not in pathlib.Path(f"/proc/{pid}/status").read_text()
  except FileNotFoundError:
    return False


def test_a_sweep_stopped_by_sigterm_stops_its_workers_and_leaves_queued_points_unstarted(tmp_path):
  """The point running saves the step it reached and the next never starts; the pool's shutdown
  had waited for every queued point, and a worker outlived a sweep SIGTERM ended."""
  script = "import sys; from t5x_like.cli import main; sys.exit(main(sys.argv[1:]))"
  run = subprocess.Popen([sys.executable, "-c", script, "sweep", "--config", CONFIG, "--workdir", str(tmp_path),
                          "--config.sweep.sizes=(1,)", "--config.sweep.token_budgets=(2048, 262144, 524288)",
                          "--config.sweep.workers=1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
  second, third = tmp_path / "s1_tokens262144_seed0", tmp_path / "s1_tokens524288_seed0"
  deadline = time.monotonic() + 240
  while not ((second / "metrics.jsonl").exists() and (second / "metrics.jsonl").read_text().count("\n") >= 2):
    assert run.poll() is None and time.monotonic() < deadline, run.communicate()
    time.sleep(0.05)
  workers = _children(run.pid)
  run.send_signal(signal.SIGTERM)
  _, err = run.communicate(timeout=200)
  assert run.returncode == 143, err
  assert "t5x-like sweep: the sweep was stopped (SIGTERM): its running points saved the step" in err
  ended_by = time.monotonic() + 30  # multiprocessing's resource tracker ends once the sweep has
  while [pid for pid in workers if _running(pid)] and time.monotonic() < ended_by:
    time.sleep(0.1)
  assert workers and not [pid for pid in workers if _running(pid)]
  saved = [int(path.name) for path in (second / "checkpoints").iterdir() if path.name.isdigit()]
  assert saved and not (second / "result.json").exists()
  assert (tmp_path / "s1_tokens2048_seed0" / "result.json").exists() and not (third / "checkpoints").exists()


def test_a_sweep_workdir_that_is_a_file_is_named(tmp_path, capsys):
  (tmp_path / "s").write_text("notes\n")  # a FileExistsError's traceback before
  assert main(["sweep", "--config", CONFIG, "--workdir", str(tmp_path / "s")]) == 2
  assert f"the sweep's workdir {tmp_path / 's'} is a file, not a directory" in capsys.readouterr().err
  assert (tmp_path / "s").read_text() == "notes\n"


@pytest.mark.parametrize("override, decided_by", [
    ("base.train.steps=5", "sweep.token_budgets"), ("base.model.num_layers=3", "sweep.sizes"),
    ("base.train.eval_every=5", "sweep.token_budgets"),
    ("base.train.optimizer.learning_rate=0.1", "sweep.learning_rate_rule='kaplan'"),
])
def test_a_base_override_every_point_would_replace_is_named(override, decided_by, tmp_path, capsys):
  assert main(["sweep", "--config", CONFIG, "--workdir", str(tmp_path / "s"), f"--config.{override}"]) == 2
  name = override.partition("=")[0]
  assert f"--config.{name}: the sweep sets it for each point from {decided_by}" in capsys.readouterr().err
  assert not (tmp_path / "s").exists()


def test_a_point_recorded_before_a_field_existed_continues_unless_the_field_is_set_off_its_default(tmp_path):
  name, point = sweep_points(load_config(CONFIG))[0]
  sweep.check_same_point(tmp_path / name, point)  # records it
  recorded = json.loads((tmp_path / name / "point.json").read_text())
  del recorded["train"]["keep_checkpoints"]  # as code from before that field wrote it
  (tmp_path / name / "point.json").write_text(json.dumps(recorded))
  sweep.check_same_point(tmp_path / name, point)
  point.train.keep_checkpoints += 1
  with pytest.raises(ConfigError, match=r"was run with another config \(train.keep_checkpoints differ\)"):
    sweep.check_same_point(tmp_path / name, point)


def test_damaged_point_files_and_results_are_named_with_what_to_do(sweep_dir, tmp_path, capsys):
  """A point's files cut short, or a result missing a field, in a copy of the finished sweep."""
  damages = {"s1_tokens2048_seed0/result.json": ('{"name": "s1', r"result\.json is not valid JSON .*remove it and "),
             "s1_tokens4096_seed0/result.json": ("{}", r"result\.json: a result lacks \['flops', "),
             "s2_tokens2048_seed0/point.json": ('{"model": ', r"point\.json is not the JSON object sweep writes"),
             "s2_tokens4096_seed0/point.json": ("[]", r"point\.json is not the JSON object sweep writes")}
  for damaged, (text, message) in damages.items():
    copy = tmp_path / damaged.split("/")[0].replace("_", "")
    shutil.copytree(sweep_dir, copy)
    (copy / damaged).write_text(text)
    assert main(["sweep", "--config", CONFIG, "--workdir", str(copy)]) == 2
    assert re.search(message, capsys.readouterr().err)
  rows = json.loads((sweep_dir / "results.json").read_text())
  for changes, message in ((dict(validation_loss=None), r"validation_loss=None is not a number"),
                           (dict(tokens=0), r"tokens=0 is not a positive number")):
    (tmp_path / "results.json").write_text(json.dumps([dict(rows[0], **changes)] + rows[1:]))
    with pytest.raises(ConfigError, match=message):
      load_results(tmp_path)
  (tmp_path / "results.json").write_text('[{"name": ')
  with pytest.raises(ConfigError, match="results.json is not valid JSON .*rerun `t5x-like sweep`"):
    load_results(tmp_path)
  flat = [dict(row, validation_loss=5.0) for row in rows]  # models that did not learn
  with pytest.raises(ConfigError, match="the laws could not be fitted to these validation_loss values"):
    fit_report(flat, bootstrap_samples=2, grid=COARSE_GRID)


@pytest.mark.parametrize("changes, message", [
    (dict(token_budgets=(3000,)), "3000 is not a whole number of batches"),
    (dict(sizes=(1.5,)), r"sweep.sizes=\(1.5,\) must hold positive integers"),
    (dict(seeds=(-1,)), "must hold non-negative integers"),
    (dict(sizes=(1, 1)), r"sweep.sizes=\(1, 1\) names a value twice"),
    (dict(seeds=()), "sweep.seeds is empty; it must name at least one value"),
    (dict(sizes=(), learning_rate_rule="bogus"), r"sweep.learning_rate_rule='bogus' is not one of"),
    (dict(workers=0), "sweep.workers=0 must be a positive integer"),
    (dict(gpus_per_point=-1.0), "sweep.gpus_per_point=-1.0 must be a number, 0 or more"),
    (dict(head_dim=0), "sweep.head_dim=0 must be a positive integer"),
])
def test_sweep_points_refuse_budgets_and_sizes_that_cannot_be_run_as_given(changes, message):
  config = load_config(CONFIG)
  config.sweep.update(changes)
  with pytest.raises(ConfigError, match=message):
    sweep_points(config)


def test_a_failed_point_leaves_the_others_results_written_and_is_named(tmp_path, monkeypatch):
  config = load_config(CONFIG)
  names = [name for name, _ in sweep_points(config)]

  def submit(points, workers):  # in place of the process pool: the second point raises
    for index, (name, _, workdir) in enumerate(points):
      def result(name=name, index=index):
        if index == 1:
          raise FloatingPointError("the loss became NaN at step 3")
        return {"name": name, "validation_loss": 3.0}
      yield name, result

  monkeypatch.setattr(sweep, "_local_submit", submit)
  with pytest.raises(ConfigError, match=rf"1 of 6 sweep points failed \({names[1]}: FloatingPointError: the loss "
                                        rf"became NaN at step 3\); .*results.json holds the other 5"):
    sweep.run_sweep(config, tmp_path)
  assert [r["name"] for r in json.loads((tmp_path / "results.json").read_text())] == names[:1] + names[2:]


def test_local_workers_share_the_gpu_memory_jax_takes_up_front(monkeypatch):
  """Two workers on one GPU each take half of the 75% JAX takes (the second could not start
  otherwise); a fraction set in the environment wins. Read back from inside the workers."""
  fraction = "XLA_PYTHON_CLIENT_MEM_FRACTION"
  monkeypatch.delenv(fraction, raising=False)
  with sweep.worker_pool(2) as pool:
    assert float(pool.submit(os.getenv, fraction).result()) == 0.375
  monkeypatch.setenv(fraction, "0.2")
  with sweep.worker_pool(2) as pool:
    assert pool.submit(os.getenv, fraction).result() == "0.2"


def test_a_point_counts_the_tokens_and_flops_of_the_updates_it_applied(sweep_dir, tmp_path, monkeypatch, caplog):
  """With train.nonfinite='skip' a step's update may be dropped: D is what the model learned from."""
  name, point = sweep_points(load_config(CONFIG))[0]
  shutil.copytree(sweep_dir / name, tmp_path / name)  # finished: it resumes at its last step and reports
  monkeypatch.setattr("t5x_like.trainer.updates_applied", lambda opt_state: 3)  # as if the others were skipped
  with caplog.at_level(logging.WARNING):
    row = sweep.train_point(json.dumps(point.to_dict()), str(tmp_path / name))
  assert row["tokens"] == 3 * point.data.batch_size * point.data.seq_len
  assert row["flops"] == palm_flops(point.model, point.data.seq_len, row["tokens"])
  assert f"{name}: {point.train.steps - 3} of {point.train.steps} updates were skipped" in caplog.text


def test_points_keep_the_base_configs_kv_grouping_and_seed():
  config = load_config(CONFIG)
  config.base.model.num_kv_heads = 1
  config.base.train.seed = 7
  for _, point in sweep_points(config):
    assert point.model.num_kv_heads == 1 and point.train.seed == 7
  check_overrides_apply(config, ["base.train.seed", "base.data.seed"])  # so they may be given as flags


def test_a_size_the_kaplan_rate_rule_gives_no_positive_rate_is_named():
  config = load_config(CONFIG)
  config.sweep.sizes = (2000,)  # past 1e13 non-embedding parameters, where the rule's rate is below 0
  with pytest.raises(ConfigError, match=r"sweep.learning_rate_rule='kaplan' gives size 2000 .* a learning rate of -"):
    sweep_points(config)


def test_ray_executor_runs_points_as_ray_tasks_that_reserve_their_gpus(tmp_path):
  """Two points on a Ray instance of 2 CPUs and 1 (pretend) GPU: each task reserves the GPU, so
  they run one after the other. A task that reserved none would have run beside the other, with
  every GPU hidden from it by Ray."""
  import ray
  ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, configure_logging=False)
  try:
    assert main(["sweep", "--config", CONFIG, "--workdir", str(tmp_path), "--config.sweep.executor=ray",
                 "--config.sweep.token_budgets=(2048,)", "--config.sweep.sizes=(1,)", "--config.sweep.seeds=(0, 1)",
                 "--config.sweep.gpus_per_point=1"]) == 0
  finally:
    ray.shutdown()
  rows = json.loads((tmp_path / "results.json").read_text())
  assert [r["name"] for r in rows] == ["s1_tokens2048_seed0", "s1_tokens2048_seed1"]
  ends = [(tmp_path / r["name"] / "result.json").stat().st_mtime for r in rows]
  first, second = sorted((end - r["wall_seconds"], end) for r, end in zip(rows, ends))
  assert second[0] >= first[1], f"the points overlapped: {first} and {second}"
