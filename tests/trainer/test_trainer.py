"""The trainer: losses fall, sharding follows the rules, runs resume exactly, guards hold."""

import dataclasses
import errno
import itertools
import json
import logging
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import portpicker
import pytest
import scipy.special
from flax import nnx
from jax._src import compiler as jax_compiler  # the one door every compile goes through
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint._src.serialization import replica_slices

from fake_data import CharacterTokenizer, PatternLoader, RaggedPatternLoader
from models.config import ConfigError, ModelConfig
from models.model_size import train_flops_per_sequence
from models.transformer import build_model
from t5x_like import checkpoints, evaluation, partitioning
from t5x_like import trainer as trainer_module
from t5x_like.checkpoints import MIN_REPLICA_SLICE_BYTES, Checkpointer, this_process_position
from t5x_like.decoding import DecodeConfig, generate
from t5x_like.metrics import MetricWriter, read_metrics
from t5x_like.modes import MODES
from t5x_like.modes.pretrain import Pretrain
from t5x_like.optimizers import decay_mask, make_optimizer
from t5x_like.preemption import Preempted, StopSignal
from t5x_like.trainer import (NonFiniteLossError, Trainer, changed_model_fields, learning_rate_change, loss_means,
                              read_run_config, stop_requested, updates_applied)
from trainer_configs import tiny_config

flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]  # noqa: E731
keystr = jax.tree_util.keystr
HERE = pathlib.Path(__file__).parent
ROOT = HERE.parents[1]


def train(config, workdir, devices=None, loader=PatternLoader):
  trainer = Trainer(config, workdir, make_loader=loader, devices=devices)
  return trainer, trainer.train()


def losses(workdir):
  """Per-step training losses; a resumed run's re-logged steps override the earlier rows."""
  return {row["step"]: row["loss"] for row in read_metrics(workdir, "train")}


def assert_same_training(run, reference, rtol):
  """Two runs' logged losses and gradient norms, step by step, and their final parameters.

  Adam normalises the gradient's scale away, so a gradient off by a constant factor barely
  moves the losses: the logged norm catches it.
  """
  (trainer, workdir), (reference_trainer, reference_workdir) = run, reference
  for key in ("loss", "grad_norm"):
    ours, theirs = ({row["step"]: row[key] for row in read_metrics(w, "train")} for w in (workdir, reference_workdir))
    np.testing.assert_allclose([ours[s] for s in sorted(ours)], [theirs[s] for s in sorted(theirs)], rtol=rtol)
  for ours, theirs in zip(jax.tree.leaves(trainer.state["params"]), jax.tree.leaves(reference_trainer.state["params"])):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder_decoder"])
def test_each_architecture_lowers_its_loss(arch, tmp_path):
  _, result = train(tiny_config(arch, steps=20), tmp_path)
  per_step = losses(tmp_path)
  assert per_step[20] < per_step[1] - 0.5
  assert result.validation["loss"] < per_step[1] - 0.5
  rows = read_metrics(tmp_path)
  assert {"train", "validation"} == {r["split"] for r in rows}
  for key in ("accuracy", "perplexity", "learning_rate", "grad_norm", "tokens_per_second", "mfu"):
    assert key in rows[0]
  assert (tmp_path / "config.json").exists() and list((tmp_path / "tensorboard").iterdir())


def test_eight_devices_shard_by_the_rules_and_match_one_device_in_training_and_decoding(tmp_path):
  config = tiny_config(mesh_shape=(2, 2, 2), schedule="warmup_cosine")  # rsqrt's later rates amplify float32 noise
  trainer, _ = train(config, tmp_path / "eight", loader=RaggedPatternLoader)
  params = trainer.state["params"]
  layer = params["decoder"]["layers"][0]
  assert layer["mlp"]["wi"]["kernel"].sharding.spec == PartitionSpec("fsdp", "tensor")
  assert layer["self_attention"]["query"]["kernel"].sharding.spec == PartitionSpec("fsdp", "tensor", None)
  assert params["token_embed"]["embedding"].sharding.spec == PartitionSpec("tensor", "fsdp")
  assert layer["mlp_norm"]["scale"].sharding.spec == PartitionSpec(None)
  adam_mu = trainer.state["opt_state"][1][0].mu["decoder"]["layers"][0]["mlp"]["wi"]["kernel"]
  assert adam_mu.sharding.spec == PartitionSpec("fsdp", "tensor")

  one, _ = train(tiny_config(mesh_shape=(1, 1, 1), schedule="warmup_cosine"), tmp_path / "one",
                 devices=jax.devices()[:1], loader=RaggedPatternLoader)
  # Same math, different reduction orders: float32 agreement to 1e-4 relative.
  assert_same_training((trainer, tmp_path / "eight"), (one, tmp_path / "one"), rtol=1e-4)
  # Decoding the sharded parameters under their mesh (as the decode command does) picks the tokens
  # that the same parameters gathered onto one device pick: the sampled draws and the beams too.
  sharded, gathered = trainer.model_from(params), one.model_from(jax.device_put(params, jax.devices()[0]))
  sharded.eval()
  gathered.eval()
  for strategy, options in (("sample", dict(top_k=5, temperature=0.7)), ("beam", dict(num_beams=3))):
    config = DecodeConfig(strategy=strategy, max_new_tokens=6, eos_id=-1, **options)
    with jax.set_mesh(trainer.mesh):
      tokens = generate(sharded, [[5, 9, 3, 7], [4, 8]], config, seed=1)
    with jax.set_mesh(one.mesh):
      assert tokens == generate(gathered, [[5, 9, 3, 7], [4, 8]], config, seed=1)


def test_adafactor_shards_its_factored_statistics_and_matches_one_device(tmp_path):
  def config(mesh_shape):
    config = tiny_config(steps=4, mesh_shape=mesh_shape, optimizer={"name": "adafactor"})
    config.model.update(emb_dim=128, mlp_dim=256)  # optax factors matrices whose two dims are >= 128
    return config

  eight, _ = train(config((2, 2, 2)), tmp_path / "eight")
  row_statistics = eight.state["opt_state"][1][0].v_row["decoder"]["layers"][0]["mlp"]["wi"]["kernel"]
  assert row_statistics.shape == (128,) and row_statistics.sharding.is_fully_replicated  # one per row of [128, 256]
  one, _ = train(config((1, 1, 1)), tmp_path / "one", devices=jax.devices()[:1])
  assert_same_training((eight, tmp_path / "eight"), (one, tmp_path / "one"), rtol=1e-4)


def test_initialising_on_the_host_gives_the_same_sharded_state(tmp_path):
  on_devices = Trainer(tiny_config(mesh_shape=(2, 2, 2)), tmp_path / "devices", make_loader=PatternLoader)
  on_host = Trainer(tiny_config(mesh_shape=(2, 2, 2), init_on_host=True), tmp_path / "host",
                    make_loader=PatternLoader)
  expected_tree, got_tree = (on_devices.state, on_devices.rest), (on_host.state, on_host.rest)
  assert jax.tree.structure(got_tree) == jax.tree.structure(expected_tree)
  for expected, got in zip(jax.tree.leaves(expected_tree), jax.tree.leaves(got_tree)):
    assert got.sharding == expected.sharding
    if jax.dtypes.issubdtype(got.dtype, jax.dtypes.prng_key):  # the dropout stream's key
      got, expected = jax.random.key_data(got), jax.random.key_data(expected)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  assert on_host.state["params"]["token_embed"]["embedding"].sharding.spec == PartitionSpec("tensor", "fsdp")


def test_initialisation_is_traced_with_threefry_as_gpu_kernels(tmp_path, monkeypatch):
  flag = "jax_threefry_gpu_kernel_lowering"
  seen = []
  new_model = Trainer._new_model
  monkeypatch.setattr(Trainer, "_new_model",
                      lambda self, keys: seen.append(getattr(jax.config, flag)) or new_model(self, keys))
  Trainer(tiny_config(), tmp_path, make_loader=PatternLoader)
  assert seen == [False, True]  # the abstract shapes, then the compiled initialisation
  assert getattr(jax.config, flag) is False


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
  def config(**train_changes):
    config = tiny_config(steps=6, **train_changes)
    config.data.batch_size = 32
    config.model.dropout_rate = 0.0  # dropout keys differ per micro-batch
    return config
  accum, _ = train(config(grad_accum_steps=4), tmp_path / "accum", loader=RaggedPatternLoader)
  full, _ = train(config(), tmp_path / "full", loader=RaggedPatternLoader)
  assert_same_training((accum, tmp_path / "accum"), (full, tmp_path / "full"), rtol=2e-3)


def _one_step_and_optax(config, workdir):
  """A trainer's first step on a ragged batch, and optax's clip and AdamW on jax.grad of the mean,
  over scored tokens, of optax's softmax cross-entropy of the model's logits: (params before,
  optax's gradients, updates and state; the trainer's state and metrics after)."""
  trainer = Trainer(config, workdir, make_loader=RaggedPatternLoader)
  local = next(RaggedPatternLoader(config.data, "train", process_index=0, process_count=1))
  params = jax.tree.map(np.asarray, trainer.state["params"])  # the step donates the state's buffers

  def mean_cross_entropy(params):
    logits = trainer.model_from(params)(local["decoder_input_tokens"], segment_ids=local["decoder_segment_ids"],
                                        positions=local["decoder_positions"])
    token_losses = optax.softmax_cross_entropy_with_integer_labels(logits, local["decoder_target_tokens"])
    return jnp.sum(token_losses * local["decoder_loss_weights"]) / np.sum(local["decoder_loss_weights"])

  grads = jax.jit(jax.grad(mean_cross_entropy))(params)
  c = config.train.optimizer
  reference = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), optax.adamw(
      trainer.schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask))
  updates, reference_state = reference.update(grads, reference.init(params), params)
  state, metrics = trainer.train_step(trainer.state, trainer.rest, trainer.global_batch(local), trainer.run_inputs)
  return params, grads, updates, reference_state, state, metrics


def test_a_step_is_optax_clipping_and_adamw_on_the_mean_cross_entropy_gradient(tmp_path):
  """One step against a reference outside the trainer's loss code: jax.grad of the mean, over
  scored tokens, of optax's softmax cross-entropy of the model's logits, through optax's own
  clip and AdamW. The trainer sums over tokens, divides, and clips with the norm it logs."""
  config = tiny_config()
  config.model.dropout_rate = 0.0
  config.train.optimizer.update(grad_clip_norm=0.05, schedule="constant")  # clipping acts; the step moves
  params, grads, updates, reference_state, state, metrics = _one_step_and_optax(config, tmp_path)
  c = config.train.optimizer
  assert float(metrics["grad_norm"]) > 2 * c.grad_clip_norm
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
  for ours, theirs in zip(jax.tree.leaves(state["opt_state"]), jax.tree.leaves(reference_state), strict=True):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-9)
  # Adam's first step moves each parameter by about the learning rate (1e-2); where a gradient
  # is near 0, float32 noise in it moves that step by a little: 2e-5 is 0.2% of it.
  for ours, theirs in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(optax.apply_updates(params, updates)),
                          strict=True):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=2e-5)


def _taking(clock: list[float], seconds: float, call):
  """`call`, moving a fake clock on by `seconds` each time; a jitted step still lowers ahead of time."""
  def timed(*args, **kwargs):
    clock[0] += seconds
    return call(*args, **kwargs)
  if hasattr(call, "lower"):
    timed.lower = call.lower
  return timed


class TwoSequencesARow(Pretrain):
  """Costs what a preference pair's two responses would: twice a sequence's FLOPs and tokens."""

  def row_cost(self, model_config, lengths):
    flops, tokens = super().row_cost(model_config, lengths)
    return 2 * flops, 2 * tokens


@pytest.mark.parametrize("sequences_a_row", [1, 2])
def test_a_run_keeps_its_last_checkpoints_evaluates_every_n_steps_and_reports_mfu(tmp_path, monkeypatch,
                                                                                  sequences_a_row):
  """On a clock where a step takes 1 s and each compile, save or evaluation 100 s: throughput
  counts steps only, the first interval's too, at what the mode says a row costs."""
  monkeypatch.setattr("t5x_like.trainer.peak_flops_per_device", lambda: (1e12, "a test's peak"))
  monkeypatch.setitem(MODES, "pairs", TwoSequencesARow)
  clock = [0.0]
  monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
  config = tiny_config(steps=8, keep_checkpoints=1, eval_every=4, log_every=2,
                       mode="pretrain" if sequences_a_row == 1 else "pairs")
  trainer = Trainer(config, tmp_path, make_loader=PatternLoader)
  trainer.train_step = _taking(clock, 1.0, trainer.train_step)
  trainer.evaluate = _taking(clock, 100.0, trainer.evaluate)
  monkeypatch.setattr(Checkpointer, "save", _taking(clock, 100.0, Checkpointer.save))
  # Every program jax compiles (or fetches from its cache) passes here, however it was called.
  monkeypatch.setattr(jax_compiler, "compile_or_get_cached",
                      _taking(clock, 100.0, jax_compiler.compile_or_get_cached))
  trainer.train()
  checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert checkpoints == ["8"]
  assert [row["step"] for row in read_metrics(tmp_path, "validation")] == [4, 8]
  tokens_per_step = sequences_a_row * config.data.batch_size * config.data.seq_len
  flops_per_step = sequences_a_row * config.data.batch_size * train_flops_per_sequence(trainer.model_config,
                                                                                       config.data.seq_len)
  for row in read_metrics(tmp_path, "train"):
    steps_per_second = row["tokens_per_second"] / tokens_per_step
    assert steps_per_second == pytest.approx(1.0), row["step"]
    assert row["model_flops_per_second"] == pytest.approx(flops_per_step * steps_per_second, rel=1e-6)
    assert row["mfu"] == pytest.approx(row["model_flops_per_second"] / (1e12 * jax.device_count()), rel=1e-6)


def test_logged_throughput_counts_the_steps_running_not_just_queued(tmp_path):
  """Steps run asynchronously: a clock read when they are queued would log a throughput many
  times the real one. Against the step timed directly after training."""
  config = tiny_config(steps=12, log_every=6, checkpoint_every=12)
  config.model.update(emb_dim=128, mlp_dim=512, max_len=64)  # steps long enough that queueing them is not
  config.data.update(seq_len=64, batch_size=16)
  trainer, _ = train(config, tmp_path, devices=jax.devices()[:1])  # one device queues steps furthest ahead
  logged = read_metrics(tmp_path, "train")[-1]["tokens_per_second"]  # the second interval: no compiling
  batch = trainer.global_batch(next(PatternLoader(config.data, "train", process_index=0, process_count=1)))
  with jax.set_mesh(trainer.mesh), partitioning.activation_rules(config.partitioning):
    state, metrics = trainer.train_step(trainer.state, trainer.rest, batch, trainer.run_inputs)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(6):
      state, metrics = trainer.train_step(state, trainer.rest, batch, trainer.run_inputs)
    jax.block_until_ready(metrics)
    measured = 6 * config.data.batch_size * config.data.seq_len / (time.perf_counter() - start)
  assert 1 / 3 < logged / measured < 3


def test_z_loss_is_the_scaled_mean_square_log_normaliser(tmp_path):
  """PaLM's z-loss against the model's logits; the reported loss stays the cross-entropy alone, and
  perplexity and token accuracy are its exponential and the argmax's rate."""
  config = tiny_config(z_loss=1e-2)
  trainer = Trainer(config, tmp_path, make_loader=RaggedPatternLoader)
  local = next(RaggedPatternLoader(config.data, "validation", process_index=0, process_count=1))
  means = loss_means(trainer.eval_sums([local]))
  model = trainer.model_from(trainer.state["params"])
  model.eval()
  logits = np.asarray(model(local["decoder_input_tokens"], segment_ids=local["decoder_segment_ids"],
                            positions=local["decoder_positions"]), np.float64)
  log_z = scipy.special.logsumexp(logits, axis=-1)
  target_logits = np.take_along_axis(logits, local["decoder_target_tokens"][..., None], axis=-1)[..., 0]
  weights = local["decoder_loss_weights"]
  assert means["z_loss"] == pytest.approx(1e-2 * np.sum(log_z ** 2 * weights) / np.sum(weights), rel=1e-4)
  assert means["loss"] == pytest.approx(np.sum((log_z - target_logits) * weights) / np.sum(weights), rel=1e-5)
  assert means["perplexity"] == pytest.approx(np.exp(means["loss"]), rel=1e-6)
  # A target sharing the row's top logit with k - 1 others counts 1 / k, argmax's expected rate.
  top = logits == logits.max(axis=-1, keepdims=True)
  ties = top.sum(axis=-1)
  hit = np.take_along_axis(top, local["decoder_target_tokens"][..., None], axis=-1)[..., 0]
  assert means["accuracy"] == pytest.approx(np.sum(hit / ties * weights) / np.sum(weights), rel=1e-5)
  assert 0 < means["accuracy"] < 1


def test_validation_loss_is_the_cross_entropy_of_the_validation_splits_first_batches(tmp_path):
  """The evaluation at the end of training, its logged row and evaluate() against numpy's
  cross-entropy of the trained model's logits on the loader's first train.eval_steps validation
  batches, weighted per scored token (rows from another split or batch would not agree)."""
  config = tiny_config(steps=2, eval_steps=2)
  trainer, result = train(config, tmp_path, loader=RaggedPatternLoader)
  model = trainer.model_from(trainer.state["params"], trainer.rest)
  model.eval()
  loss_sum = weight_sum = 0.0
  validation = RaggedPatternLoader(config.data, "validation", process_index=0, process_count=1)
  for local in itertools.islice(validation, 2):
    logits = np.asarray(model(local["decoder_input_tokens"], segment_ids=local["decoder_segment_ids"],
                              positions=local["decoder_positions"]), np.float64)
    target_logits = np.take_along_axis(logits, local["decoder_target_tokens"][..., None], axis=-1)[..., 0]
    cross_entropy = scipy.special.logsumexp(logits, axis=-1) - target_logits
    loss_sum += np.sum(cross_entropy * local["decoder_loss_weights"])
    weight_sum += np.sum(local["decoder_loss_weights"])
  expected = loss_sum / weight_sum
  assert result.validation["loss"] == pytest.approx(expected, rel=1e-5)
  assert read_metrics(tmp_path, "validation")[-1]["loss"] == pytest.approx(expected, rel=1e-5)
  assert trainer.evaluate(2)["loss"] == pytest.approx(expected, rel=1e-5)


def _run(workdir, overrides, *extra):
  return subprocess.Popen([sys.executable, str(HERE / "run_fake_training.py"), str(workdir),
                           json.dumps(overrides), *map(str, extra)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_sigkill_or_sigterm_then_rerun_gives_the_uninterrupted_losses(tmp_path):
  """SIGKILL loses the steps after the last periodic checkpoint; SIGTERM (a preemption notice)
  saves the step reached and exits with 143. Either way the rerun reproduces the losses."""
  overrides = dict(steps=24, checkpoint_every=4)
  kinds = (signal.SIGKILL, signal.SIGTERM)
  victims = {kind: _run(tmp_path / kind.name, overrides) for kind in kinds}
  deadline, waiting = time.time() + 240, set(kinds)
  while waiting and time.time() < deadline:  # each is stopped once its step-8 checkpoint exists
    for kind in [kind for kind in waiting if (tmp_path / kind.name / "checkpoints" / "8").exists()]:
      victims[kind].send_signal(kind)
      waiting.remove(kind)
    time.sleep(0.05)
  outputs = {kind: victim.communicate(timeout=240)[0] for kind, victim in victims.items()}
  stopped_at = {kind: max(losses(tmp_path / kind.name)) for kind in kinds}
  assert all(step < 24 for step in stopped_at.values()), "a run finished before it was stopped; nothing was tested"
  term = signal.SIGTERM
  assert victims[term].returncode == 143, outputs[term]
  assert f"stopped by SIGTERM after step {stopped_at[term]}" in outputs[term]
  assert max(int(step.name) for step in (tmp_path / term.name / "checkpoints").iterdir()) == stopped_at[term]
  resumed = [_run(tmp_path / kind.name, overrides) for kind in kinds]
  train(tiny_config(**overrides), tmp_path / "reference")  # meanwhile, uninterrupted
  assert [run.wait(timeout=240) for run in resumed] == [0, 0]
  for kind in kinds:
    assert losses(tmp_path / kind.name) == losses(tmp_path / "reference")


def test_a_run_preempted_at_an_evaluation_step_evaluates_it_when_resumed(tmp_path, monkeypatch):
  """SIGTERM noticed at a step that both saves and evaluates stops after the save: the resume
  evaluates that step first, so no validation row is missing."""
  train(tiny_config(steps=8, eval_every=4), tmp_path / "reference")
  monkeypatch.setattr(trainer_module, "stop_requested", lambda stop, step, log_every: step == 4)
  with pytest.raises(Preempted, match="after step 4"):
    train(tiny_config(steps=8, eval_every=4), tmp_path / "run")
  assert not read_metrics(tmp_path / "run", "validation")
  monkeypatch.undo()
  clock = [0.0]  # a step takes 1 s, an evaluation 100 s
  monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
  resumed = Trainer(tiny_config(steps=8, eval_every=4), tmp_path / "run", make_loader=PatternLoader)
  resumed.train_step = _taking(clock, 1.0, resumed.train_step)
  resumed.evaluate = _taking(clock, 100.0, resumed.evaluate)
  resumed.train()
  evaluated = {row["step"]: row["loss"] for row in read_metrics(tmp_path / "run", "validation")}
  reference = {row["step"]: row["loss"] for row in read_metrics(tmp_path / "reference", "validation")}
  assert evaluated.keys() == reference.keys() == {4, 8}
  assert evaluated[4] == pytest.approx(reference[4], rel=1e-6)
  # Evaluating step 4 again is no training time: the steps after it run at one a second.
  tokens_per_step = resumed.config.data.batch_size * resumed.config.data.seq_len
  assert [row["tokens_per_second"] / tokens_per_step for row in read_metrics(tmp_path / "run", "train")
          if row["step"] > 4] == pytest.approx([1.0] * 4)


def test_a_config_json_write_that_fails_leaves_the_old_one_whole(tmp_path, monkeypatch):
  """A disk that fills while config.json is rewritten (a resume's first save under a new config)
  left it truncated, and every later resume or inference refused the workdir."""
  train(tiny_config(steps=2), tmp_path)
  written = (tmp_path / "config.json").read_text()
  real_write = pathlib.Path.write_text

  def full_disk(path, text, *args, **kwargs):
    real_write(path, text[:len(text) // 2], *args, **kwargs)
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
  with pytest.raises(OSError, match="No space left"):
    train(tiny_config(steps=4, log_every=2), tmp_path)
  monkeypatch.undo()
  assert (tmp_path / "config.json").read_text() == written
  assert trainer_module.read_run_config(tmp_path).train.steps == 2


def test_a_failed_save_still_closes_the_checkpointer_and_the_metric_writer(tmp_path, monkeypatch):
  closed = []
  for kind in (Checkpointer, MetricWriter):
    monkeypatch.setattr(kind, "close", lambda self, close=kind.close: (closed.append(type(self)), close(self)))
  def failed_save(self):
    raise OSError("No space left on device")
  monkeypatch.setattr(Checkpointer, "wait", failed_save)
  with pytest.raises(OSError, match="No space left"):
    train(tiny_config(steps=4), tmp_path)
  assert sorted(kind.__name__ for kind in closed) == ["Checkpointer", "MetricWriter"]


def test_a_sigterm_during_the_final_evaluation_waits_for_the_final_save(tmp_path, monkeypatch):
  """The last save runs in the background while the run evaluates: a preemption notice then must
  not end the process (as the handler in place before training would) until the save is done."""
  before_training = []
  previous = signal.signal(signal.SIGTERM, lambda *_: before_training.append("SIGTERM"))
  try:
    evaluate = Trainer.evaluate
    def evaluate_after_a_sigterm(self, steps):
      os.kill(os.getpid(), signal.SIGTERM)
      return evaluate(self, steps)
    monkeypatch.setattr(Trainer, "evaluate", evaluate_after_a_sigterm)
    train(tiny_config(steps=4), tmp_path)
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert before_training == [] and (tmp_path / "checkpoints" / "4").is_dir()


def test_processes_stop_together_at_a_logging_step_once_any_received_sigterm(monkeypatch):
  stop = StopSignal()
  assert not stop_requested(stop, step=3, log_every=2)
  stop.received = True
  assert stop_requested(stop, step=3, log_every=2)  # one process: at once
  gathered, other = [], {"received": False}
  def allgather(flag):  # the flags of two processes: this one's and the other's
    gathered.append(flag)
    return np.array([flag, other["received"]])
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  assert not stop_requested(stop, step=3, log_every=2) and not gathered  # no collective between logging steps
  assert stop_requested(stop, step=4, log_every=2) and gathered == [True]
  stop.received = False
  assert not stop_requested(stop, step=6, log_every=2)
  other["received"] = True  # the other process's notice stops this one too
  assert stop_requested(stop, step=8, log_every=2)


def test_two_processes_give_the_one_process_losses_and_evaluation(tmp_path, monkeypatch, outputs_of):
  """Two processes train 4 steps; with the step-4 checkpoint corrupted they set it aside together
  and resume from step 2 to 6, each reading back its own data position. Then they evaluate:
  bits per byte count every process's bytes, and a text once. Gathering data positions of a
  new length compiles nothing new."""
  for steps in (4, 6):
    if steps == 6:
      monkeypatch.setenv("EVALUATION_OUT", str(tmp_path / "two.json"))
      for file in (tmp_path / "two" / "checkpoints" / "4" / "state").rglob("*"):
        if file.is_file():
          file.write_bytes(b"garbage")
    port = portpicker.pick_unused_port()
    workers = [_run(tmp_path / "two", dict(steps=steps, mesh_shape=[2, 2, 2], checkpoint_every=2), pid, 2, port)
               for pid in range(2)]
    outputs = outputs_of(workers, timeout=300)
    for worker, output in zip(workers, outputs):
      assert worker.returncode == 0, output  # PatternLoader refuses another process's position
      assert steps == 4 or f"resuming from checkpoint {tmp_path / 'two' / 'checkpoints' / '2'}" in output
  assert [path.name.split("-")[0] for path in (tmp_path / "two" / "corrupt").iterdir()] == ["4"]
  one, _ = train(tiny_config(steps=6, mesh_shape=(2, 2, 2)), tmp_path / "one")
  two_losses, one_losses = losses(tmp_path / "two"), losses(tmp_path / "one")
  np.testing.assert_allclose([two_losses[s] for s in range(1, 7)], [one_losses[s] for s in range(1, 7)], rtol=1e-5)
  two = json.loads((tmp_path / "two.json").read_text())
  tokenizer = CharacterTokenizer()
  assert two["text"]["tokens"] == len(CharacterTokenizer.TEXT) + 1  # the text once, its eos included
  assert two["gather_compiles"] == 0  # the saves compiled the gathers of every length here
  for name, result in (("split", evaluation.evaluate_split(one, tokenizer, "validation", num_batches=2)),
                       ("text", evaluation.evaluate_documents(one, tokenizer, [CharacterTokenizer.TEXT]))):
    assert two[name]["tokens"] == result["tokens"] and two[name]["bytes"] == result["bytes"], name
    for key in ("loss", "bits_per_byte"):
      assert two[name][key] == pytest.approx(result[key], rel=1e-5), (name, key)


def test_a_mode_that_sums_only_its_loss_and_weight_trains_and_reports_that_loss(tmp_path, monkeypatch):
  """A mode's loss need not be a cross-entropy (a reward model's is not): the trainer reports
  loss / weight and nothing it cannot compute, and any sum of its own per weight by its name."""
  class HalfLoss(Pretrain):
    def loss_sums(self, model, batch):
      sums = super().loss_sums(model, batch)
      return {"loss": sums["loss"] / 2, "weight": sums["weight"], "margin": sums["weight"] / 4}

  monkeypatch.setitem(MODES, "half_loss", HalfLoss)
  configs = tiny_config(steps=4, mode="half_loss"), tiny_config(steps=4)
  for config in configs:  # clipping at a fixed norm would scale the two runs' gradients apart
    config.train.optimizer.grad_clip_norm = 0.0
  _, half = train(configs[0], tmp_path / "half")
  _, full = train(configs[1], tmp_path / "full")
  rows = read_metrics(tmp_path / "half", "train")
  assert set(rows[0]) >= {"loss", "target_tokens"} and not {"accuracy", "perplexity", "z_loss"} & set(rows[0])
  assert [row["margin"] for row in rows + read_metrics(tmp_path / "half", "validation")] == [0.25] * 5
  # Adam divides the gradient's scale away: half the loss trains the same weights, reported halved.
  assert rows[0]["loss"] == pytest.approx(losses(tmp_path / "full")[1] / 2, rel=1e-5)
  assert half.validation["loss"] == pytest.approx(full.validation["loss"] / 2, rel=1e-3)


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrained")
  train(tiny_config(steps=8), workdir)  # checkpoints 4 and 8
  return workdir


def test_restore_onto_another_mesh_shape(tmp_path):
  first, first_result = train(tiny_config(steps=8, mesh_shape=(8, 1, 1), log_every=3), tmp_path,
                              loader=RaggedPatternLoader)
  # The train loss is per token over the last log_every steps, weighted by their target tokens.
  rows = [row for row in read_metrics(tmp_path, "train") if row["step"] > 5]
  assert first_result.train_loss == pytest.approx(
      sum(r["loss"] * r["target_tokens"] for r in rows) / sum(r["target_tokens"] for r in rows), rel=1e-6)
  assert len({r["target_tokens"] for r in rows}) > 1  # so a plain mean of the rows would differ
  second = Trainer(tiny_config(steps=8, mesh_shape=(2, 2, 2), log_every=3), tmp_path,
                   make_loader=RaggedPatternLoader)
  result = second.train()  # restores step 8 and has nothing left to train
  assert result.train_loss == pytest.approx(first_result.train_loss, rel=1e-6)
  assert second.state["params"]["token_embed"]["embedding"].sharding.spec == PartitionSpec("tensor", "fsdp")
  for a, b in zip(jax.tree.leaves(first.state["params"]), jax.tree.leaves(second.state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert result.validation["loss"] == pytest.approx(first.evaluate(2)["loss"], rel=1e-5)


def test_a_replicated_array_is_written_a_slice_per_device_only_if_the_slices_are_large(tmp_path, monkeypatch):
  """Orbax splits the write of an array replicated over n devices into n slices; below
  MIN_REPLICA_SLICE_BYTES a slice costs more to dispatch than it saves, and one device writes the
  whole array. Both read back exactly."""
  written = {}
  get_replica_slices = replica_slices.get_replica_slices

  def spy(array, *args, **kwargs):
    slices = get_replica_slices(array, *args, **kwargs)
    written[array.size] = slices.local_shape, len(slices.replica_slices)
    return slices
  monkeypatch.setattr(replica_slices, "get_replica_slices", spy)
  replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
  large = MIN_REPLICA_SLICE_BYTES // 4 * len(jax.devices())  # float32: a slice of exactly the floor per device
  state = {"small": jax.device_put(np.arange(64, dtype=np.float32), replicated),
           "large": jax.device_put(np.arange(large, dtype=np.float32), replicated)}
  checkpointer = Checkpointer(tmp_path, max_to_keep=1)
  checkpointer.save(1, state, None)
  checkpointer.wait()
  assert written == {64: ((64,), 1), large: ((large // len(jax.devices()),), len(jax.devices()))}
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
  step, restored, _ = checkpointer.restore_latest(abstract)
  checkpointer.close()
  assert step == 1
  for name in state:
    np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(state[name]))


def test_each_process_takes_its_own_data_position(tmp_path, monkeypatch):
  positions = {"0": {"position": 4, "process_index": 0}, "1": {"position": 4, "process_index": 1}}
  assert this_process_position(positions, tmp_path) == positions["0"]
  old_format = {"position": 4, "process_index": 0}  # one loader state, from before positions per process
  assert this_process_position(old_format, tmp_path) == old_format
  monkeypatch.setattr(jax, "process_index", lambda: 2)
  with pytest.raises(ConfigError, match=r"holds the data positions of processes \['0', '1'\], not of process 2"):
    this_process_position(positions, tmp_path)


def test_resuming_under_another_model_stops_and_keeps_every_checkpoint_and_a_longer_run_names_its_rate(
    tmp_path, caplog, pretrained_run):
  shutil.copytree(pretrained_run, tmp_path, dirs_exist_ok=True)  # tiny_config(steps=8), trained once per module
  saved_config = (tmp_path / "config.json").read_text()
  factored = tiny_config(steps=12)
  factored.train.optimizer.name = "adafactor"
  with pytest.raises(ConfigError, match=r"checkpoint .*/8 holds another train state than this config builds "
                                        r"\(.*opt_state.*: not in the checkpoint"):
    train(factored, tmp_path)
  same_shapes = tiny_config(steps=12)  # every array fits, but the saved weights were trained for another function
  same_shapes.model.update(mlp_activation="relu", position="sinusoidal")
  with pytest.raises(ConfigError, match=r"was trained with another model \(model\.mlp_activation 'gelu' -> 'relu'; "
                                        r"model\.position 'rope' -> 'sinusoidal'\); resume with"):
    train(same_shapes, tmp_path)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "8"]
  assert not (tmp_path / "corrupt").exists()
  assert (tmp_path / "config.json").read_text() == saved_config  # still the config the checkpoints fit

  # 4 more steps under a cosine decay over 12 steps: at update 8 the rate is 1e-3 + 9e-3 * (1 + cos(pi *
  # 5 / 9)) / 2 (3 warmup steps, peak 1e-2), where the run's rsqrt schedule gave 1e-2 * sqrt(3 / 8).
  with caplog.at_level(logging.WARNING, logger="t5x_like.trainer"):
    train(tiny_config(steps=12, schedule="warmup_cosine"), tmp_path)
  rebuilt = 1e-3 + 9e-3 * (1 + math.cos(math.pi * 5 / 9)) / 2
  assert (f"the learning rate after 8 updates is {rebuilt:.3g}, not the {1e-2 * math.sqrt(3 / 8):.3g} the run's "
          f"config.json gives (train.steps 8 -> 12, train.optimizer.schedule 'rsqrt' -> 'warmup_cosine')"
          ) in caplog.text
  assert next(row for row in read_metrics(tmp_path, "train") if row["step"] == 9)["learning_rate"] == (
      pytest.approx(rebuilt, rel=1e-5))


def _without_the_clip_step(config, inputs):
  """make_optimizer as it was before 1f5209f with clipping off: the state without the clip step's."""
  chained, schedule = make_optimizer(config, inputs)
  assert not config.grad_clip_norm

  def update(updates, state, params=None, **extra_args):
    updates, (_, state) = chained.update(updates, (optax.EmptyState(), state), params, **extra_args)
    return updates, state
  return optax.GradientTransformationExtraArgs(lambda params: chained.init(params)[1], update), schedule


def test_a_resume_may_turn_gradient_clipping_off_and_keeps_adams_moments(tmp_path, monkeypatch):
  """Clipping is a step of the optimizer chain, on or off, so the saved state fits both (without
  the step the moments moved and the checkpoint no longer fitted): a run clipped at a norm it never
  reaches, resumed unclipped, trains as a run never clipped, and so does a run saved unclipped
  by the version that left the step out."""
  def config(steps, clip):
    config = tiny_config(steps=steps, checkpoint_every=2)
    config.train.optimizer.grad_clip_norm = clip
    return config
  train(config(2, 1e9), tmp_path / "resumed")
  train(config(4, 0.0), tmp_path / "resumed")
  with monkeypatch.context() as older_version:
    older_version.setattr(trainer_module, "make_optimizer", _without_the_clip_step)
    older, _ = train(config(2, 0.0), tmp_path / "older")
  assert not isinstance(older.state["opt_state"][0], optax.EmptyState)
  train(config(4, 0.0), tmp_path / "older")
  train(config(4, 0.0), tmp_path / "unclipped")
  unclipped = losses(tmp_path / "unclipped")
  for run in ("resumed", "older"):
    resumed = losses(tmp_path / run)
    assert sorted(resumed) == [1, 2, 3, 4]
    np.testing.assert_allclose([resumed[s] for s in range(1, 5)], [unclipped[s] for s in range(1, 5)], rtol=1e-6,
                               err_msg=run)


# How the model computes, which a resume may change (the README's list); every other field is what it computes.
HOW_IT_COMPUTES = {"attention_kernel", "loss_kernel", "remat", "dtype", "bf16_matmul_inputs", "dropout_rate",
                   "final_dropout", "attention_dropout_rate", "mlp_dropout_rate"}


def test_a_resume_changing_any_model_field_but_how_it_computes_is_named():
  saved = tiny_config()
  # What the fields left None derive to: 4 heads of 32 // 4, one decoder layer per layer.
  derived = dict(num_kv_heads=4, head_dim=8, num_decoder_layers=2)
  for field in dataclasses.fields(ModelConfig):
    config = tiny_config()
    old = derived.get(field.name, config.model[field.name])
    new = {bool: lambda: not old, int: lambda: old + 1, float: lambda: old * 2 + 1, str: lambda: old + "x"}[
        type(old)]()
    config.model[field.name] = new
    changed = changed_model_fields(saved, config)  # with what a field derives from it (num_heads: head_dim)
    assert (changed == []) if field.name in HOW_IT_COMPUTES else (f"model.{field.name} {old!r} -> {new!r}" in changed)
    config.model[field.name] = old  # a field left None, set to what it derives to, is the same model
    assert changed_model_fields(saved, config) == [], field.name
  del saved.model["embedding_norm"]  # a field the saved run's version did not have reads as its default
  assert changed_model_fields(saved, tiny_config()) == []
  config = tiny_config()
  config.model.embedding_norm = True
  assert changed_model_fields(saved, config) == ["model.embedding_norm False -> True"]


def test_the_learning_rate_warning_names_the_schedules_fields():
  saved, config, same = (tiny_config(steps=8, schedule="warmup_cosine") for _ in range(3))
  config.train.optimizer.update(learning_rate=2e-2, b1=0.8)  # b1 moves no rate
  cosine = lambda peak: 0.1 * peak + 0.9 * peak * (1 + math.cos(math.pi * (5 - 3) / (8 - 3))) / 2  # noqa: E731
  assert learning_rate_change(saved, config, 5) == (
      f"the learning rate after 5 updates is {cosine(2e-2):.3g}, not the {cosine(1e-2):.3g} the run's config.json "
      f"gives (train.optimizer.learning_rate 0.01 -> 0.02); the schedule goes on from there")
  assert learning_rate_change(saved, same, 5) is None
  saved.train.optimizer.schedule = "linear"  # a schedule this version does not have: nothing to compare
  assert learning_rate_change(saved, config, 5) is None


def test_runs_that_differ_in_schedule_and_seed_share_their_compiled_init_and_train_step(tmp_path):
  """A sweep's token budgets and seeds, or a learning-rate scan, reach the initialisation and the
  train step as arguments: the second run loads both from the compilation cache, and each run
  keeps its own rates."""
  if not jax.config.jax_compilation_cache_dir:
    pytest.skip("JAX_COMPILATION_CACHE_DIR is set empty: no compilation cache to share through")
  first = tiny_config(steps=12, schedule="warmup_cosine")
  second = tiny_config(steps=40, seed=7, schedule="warmup_cosine")
  second.train.optimizer.update(learning_rate=3e-2, warmup_steps=1, end_learning_rate_fraction=0.5)
  events, hits, rates = [], [], []
  listener = lambda event, **_: events.append(event)  # noqa: E731
  # Every program cached, however fast a machine compiles it (the tests keep those taking 0.1 s or more).
  min_compile_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.monitoring.register_event_listener(listener)
  try:
    for name, config in (("first", first), ("second", second)):
      events.clear()
      trainer = Trainer(config, tmp_path / name, make_loader=PatternLoader)
      hits.append(events.count("/jax/compilation_cache/cache_hits"))
      events.clear()
      # Drawn from traced keys, the seed's weights are build_model's from that seed (op by op, which
      # differs from any compiled draw by a few 1e-9).
      jax.tree.map(lambda ours, seeds: np.testing.assert_allclose(ours, seeds, rtol=0, atol=1e-7),
                   trainer.state["params"],
                   nnx.as_pure(nnx.state(build_model(trainer.model_config, seed=config.train.seed), nnx.Param)))
      batches = PatternLoader(config.data, "train", process_index=0, process_count=1)
      state = trainer.state
      for update in range(3):
        state, metrics = trainer.train_step(state, trainer.rest, trainer.global_batch(next(batches)),
                                            trainer.run_inputs)
        rates.append((float(metrics["learning_rate"]), float(trainer.schedule(update))))
      hits.append(events.count("/jax/compilation_cache/cache_hits"))
  finally:
    jax.monitoring.unregister_event_listener(listener)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
  assert hits[2] >= 1 and hits[3] >= 1, f"the second run's init and step did not come from the cache: {hits}"
  assert [logged for logged, _ in rates] == pytest.approx([own for _, own in rates], rel=1e-6)
  # Warmup over 3 updates to 1e-2, and over 1 update to 3e-2 then a cosine down to 1.5e-2 over 39.
  cosine = 1.5e-2 + 1.5e-2 * (1 + math.cos(math.pi / 39)) / 2
  assert [own for _, own in rates] == pytest.approx([0.0, 1e-2 / 3, 2e-2 / 3, 0.0, 3e-2, cosine], rel=1e-6)


def test_a_resume_that_stops_before_saving_leaves_the_runs_config_and_checkpoints(tmp_path):
  train(tiny_config(steps=4), tmp_path)
  saved_config = (tmp_path / "config.json").read_text()
  diverging = tiny_config(steps=8)
  diverging.train.optimizer.update(learning_rate=1e39, schedule="constant")
  with pytest.raises(NonFiniteLossError):
    train(diverging, tmp_path)
  assert (tmp_path / "config.json").read_text() == saved_config  # eval and decode still read the right model
  with pytest.raises(ConfigError, match=r"checkpoints holds step 4, past train.steps=2; set train.steps to 4 or more"):
    train(tiny_config(steps=2), tmp_path)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]
  assert (tmp_path / "config.json").read_text() == saved_config


def test_a_workdir_another_train_holds_or_that_cannot_be_written_stops_before_training(tmp_path, monkeypatch):
  """Two runs in one workdir overwrote each other's checkpoints and both ended well; a read-only
  checkpoints/ met orbax's barrier timeout minutes into training. The claim ends with its run."""
  train(tiny_config(steps=2), tmp_path)
  saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  other = trainer_module._claim_workdir(tmp_path)  # another run's, as a second open file holds it
  resumed = Trainer(tiny_config(steps=4), tmp_path, make_loader=PatternLoader)
  with pytest.raises(ConfigError, match=rf"{tmp_path} is in use by another train \(process {os.getpid()} on .*, "
                                        r"started .*\); two runs in one workdir overwrite"):
    resumed.train()
  other.close()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == saved
  monkeypatch.setattr(os, "access", lambda path, mode: pathlib.Path(path).name != "checkpoints")
  with pytest.raises(ConfigError, match=rf"{tmp_path / 'checkpoints'} is not writable"):
    resumed.train()
  monkeypatch.undo()
  assert resumed.train().step == 4
  trainer_module._claim_workdir(tmp_path).close()  # free again once the run ended
  (tmp_path / "file").write_text("")
  with pytest.raises(ConfigError, match=rf"cannot make the workdir {tmp_path / 'file' / 'run'}"):
    trainer_module._claim_workdir(tmp_path / "file" / "run")


@pytest.mark.parametrize("content, message", [
    (b'{"model": ', r"is not valid JSON"),
    (b'{"model": {}}\xff', r"is not valid JSON \('utf-8' codec can't decode byte 0xff"),
    (b"[]", r"is not the config train writes: no model, data, train, partitioning section"),
    (b'{"model": {}, "data": {}, "train": 3, "partitioning": {}}', r"is not the config train writes: no train section"),
])
def test_a_workdir_whose_config_is_not_a_run_config_is_named(tmp_path, content, message):
  """Cut short or edited by hand: named, where a list or a missing section met an AttributeError."""
  (tmp_path / "config.json").write_bytes(content)
  with pytest.raises(ConfigError, match=r"config\.json " + message):
    Trainer.from_workdir(tmp_path)
  with pytest.raises(ConfigError, match=r"config\.json " + message):
    trainer_module.read_run_config(tmp_path)  # as a resume reads it


def test_a_run_loads_for_inference_on_fewer_devices_than_its_mesh(tmp_path, monkeypatch):
  trained, _ = train(tiny_config(steps=4, mesh_shape=(2, 2, 2)), tmp_path)
  loaded = Trainer.from_workdir(tmp_path, devices=jax.devices()[:2])
  assert loaded.mesh.shape == {"data": 2, "fsdp": 1, "tensor": 1}
  for a, b in zip(jax.tree.leaves(trained.state["params"]), jax.tree.leaves(loaded.state["params"]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Batch 8 over 2 data shards x 4 accumulation steps: 4 devices load it without accumulating, and
  # of 3 devices the 2 that the batch divides over.
  accumulated, _ = train(tiny_config(steps=4, grad_accum_steps=4), tmp_path / "accumulated",
                         devices=jax.devices()[:2])
  for count, data_axis in ((4, 4), (3, 2)):
    loaded = Trainer.from_workdir(tmp_path / "accumulated", devices=jax.devices()[:count])
    assert loaded.mesh.shape == {"data": data_axis, "fsdp": 1, "tensor": 1}
    for a, b in zip(jax.tree.leaves(accumulated.state["params"]), jax.tree.leaves(loaded.state["params"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A run whose mesh gave the rest of the devices to a model axis: 3 would split its 4 heads unevenly.
  split, _ = train(tiny_config(steps=4, mesh_shape=(1, 1, -1)), tmp_path / "tensor", devices=jax.devices()[:2])
  loaded = Trainer.from_workdir(tmp_path / "tensor", devices=jax.devices()[:3])
  assert loaded.mesh.shape == {"data": 2, "fsdp": 1, "tensor": 1}
  for a, b in zip(jax.tree.leaves(split.state["params"]), jax.tree.leaves(loaded.state["params"]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A run trained with cuDNN's kernel on a GPU loads on a CPU with the kernel it has; one whose
  # config.json predates some fields loads with their defaults.
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  saved = json.loads((tmp_path / "config.json").read_text())
  saved["model"].update(attention_kernel="cudnn", dtype="bfloat16")
  for section, field in (("train", "keep_checkpoints"), ("train", "z_loss"), ("partitioning", "rules")):
    del saved[section][field]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  loaded = Trainer.from_workdir(tmp_path)
  assert loaded.model_config.attention_kernel == "auto"
  assert loaded.config.train.keep_checkpoints == tiny_config().train.keep_checkpoints


def test_inference_loads_a_runs_parameters_without_its_optimizer_moments(tmp_path, pretrained_run, monkeypatch):
  """eval, decode and score need the parameters alone: from_workdir neither builds nor reads the
  optimizer's moments (Adam's two would triple its memory), so a run whose optimizer no longer
  matches its checkpoints still loads."""
  shutil.copytree(pretrained_run, tmp_path / "run")
  saved = Trainer(tiny_config(steps=8), tmp_path / "run", make_loader=PatternLoader)
  saved.restore()
  inits = []

  def counting_inits(*args):
    tx, schedule = make_optimizer(*args)
    return optax.GradientTransformation(lambda params: inits.append(1) or tx.init(params), tx.update), schedule
  monkeypatch.setattr(trainer_module, "make_optimizer", counting_inits)
  loaded = Trainer.from_workdir(tmp_path / "run")
  assert not inits
  assert loaded.state.keys() == {"step", "params"} and int(loaded.state["step"]) == 8
  for a, b in zip(jax.tree.leaves(saved.state["params"]), jax.tree.leaves(loaded.state["params"]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Adafactor's statistics have other shapes than the saved Adam moments: a resume would stop.
  config = json.loads((tmp_path / "run" / "config.json").read_text())
  config["train"]["optimizer"]["name"] = "adafactor"
  (tmp_path / "run" / "config.json").write_text(json.dumps(config))
  assert int(Trainer.from_workdir(tmp_path / "run").state["step"]) == 8
  with pytest.raises(ConfigError, match=r"holds another train state than this config builds \(.*opt_state"):
    Trainer(read_run_config(tmp_path / "run"), tmp_path / "run", make_loader=PatternLoader).restore()
  # A saved parameter the config does not build still stops it: a layer fewer would run another model.
  config["model"]["num_layers"] = 1
  (tmp_path / "run" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError, match=r"params\.decoder\.layers\.1\.[\w.]+: saved, but the config does not build"):
    Trainer.from_workdir(tmp_path / "run")
  with pytest.raises(ConfigError, match=r"holds no optimizer state \(params_only"):
    loaded.train()


def test_a_run_starts_from_another_runs_parameters_with_a_fresh_optimizer(tmp_path, monkeypatch):
  pretrained, _ = train(tiny_config(steps=4, mesh_shape=(2, 2, 2)), tmp_path / "pretrained")
  # Biases the pretrained run lacks stand for an adapter's new weights; they start at zero, so the
  # tuned model computes what the pretrained one does. At learning rate 0 nothing moves.
  monkeypatch.setenv("HOME", str(tmp_path))  # a path in a config is not the shell's to expand
  config = tiny_config(steps=4, mesh_shape=(8, 1, 1), init_from="~/pretrained")
  config.model.use_bias = True
  config.train.optimizer.learning_rate = 0.0
  tuned = Trainer(config, tmp_path / "tuned", make_loader=PatternLoader)
  # Copies: np.asarray's view of a CPU buffer would keep jax from donating it.
  initial = {keystr(path): np.array(leaf) for path, leaf in flat(tuned.state["params"])}
  # The initial state is freed as it is replaced: its optimizer state before the source's parameters
  # are read, its parameters by the time the new state is made.
  initial_state, read = tuned.state, trainer_module.read_params
  def reading(source, targets):
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(initial_state["opt_state"]))
    return read(source, targets)
  monkeypatch.setattr(trainer_module, "read_params", reading)
  result = tuned.train()
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves((initial_state["params"], initial_state["opt_state"])))
  saved = {keystr(path): np.asarray(leaf) for path, leaf in flat(pretrained.state["params"])}
  final = {keystr(path): np.asarray(leaf) for path, leaf in flat(tuned.state["params"])}
  assert saved.keys() < final.keys() and any("bias" in name for name in final.keys() - saved.keys())
  for name, value in final.items():
    np.testing.assert_array_equal(value, saved.get(name, initial[name]), err_msg=name)
  assert int(tuned.state["step"]) == 4 and int(updates_applied(tuned.state["opt_state"])) == 4  # not 8
  assert result.validation["loss"] == pytest.approx(pretrained.evaluate(2)["loss"], rel=1e-5)
  # Resuming reads the run's own checkpoint, never init_from again.
  shutil.rmtree(tmp_path / "pretrained" / "checkpoints")
  config.train.steps = 6
  assert Trainer(config, tmp_path / "tuned", make_loader=PatternLoader).train().step == 6


def test_parameters_a_mode_freezes_are_the_pretrained_ones_through_training_resume_and_loading(
    tmp_path, pretrained_run, monkeypatch):
  """A mode that trains only some parameters (LoRA, prompt tuning, adapters): the frozen ones come
  from init_from, training leaves them alone, and the run's checkpoints hold them, so a resume and
  from_workdir read them there instead of initialising them afresh."""
  class MlpOnly(Pretrain):
    trainable = nnx.All(nnx.Param, nnx.PathContains("mlp"))

  monkeypatch.setitem(MODES, "mlp_only", MlpOnly)
  source = Trainer.from_workdir(pretrained_run)
  pretrained = {keystr(path): np.asarray(leaf) for path, leaf in flat(source.state["params"])}
  config = tiny_config(steps=2, mode="mlp_only", init_from=str(pretrained_run))
  tuned = Trainer(config, tmp_path / "tuned", make_loader=PatternLoader)

  def frozen(trainer):
    return {keystr(path): np.asarray(leaf) for path, leaf in flat(trainer.rest) if keystr(path) in pretrained}

  def trained(trainer):
    return {keystr(path): np.asarray(leaf) for path, leaf in flat(trainer.state["params"])}

  tuned.train()
  assert frozen(tuned).keys() == {name for name in pretrained if "['mlp']" not in name} and trained(tuned).keys() == {
      name for name in pretrained if "['mlp']" in name}
  for trainer in (tuned, Trainer.from_workdir(tmp_path / "tuned")):
    for name, value in frozen(trainer).items():
      np.testing.assert_array_equal(value, pretrained[name], err_msg=name)
    assert all(not np.array_equal(value, pretrained[name]) for name, value in trained(trainer).items())
  config.train.steps = 4  # resumes from step 2: init_from is not read again
  resumed = Trainer(config, tmp_path / "tuned", make_loader=PatternLoader)
  resumed.train()
  for name, value in frozen(resumed).items():
    np.testing.assert_array_equal(value, pretrained[name], err_msg=name)
  # A run that starts from this one reads the frozen parameters as well as the trained ones.
  chained = Trainer(tiny_config(steps=2), tmp_path / "chained", make_loader=PatternLoader)
  chained.init_params_from(tmp_path / "tuned")
  expected = {**frozen(resumed), **trained(resumed)}
  assert trained(chained).keys() == expected.keys()
  for name, value in trained(chained).items():
    np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_a_mode_adds_its_own_parameters_and_trains_only_them_on_the_pretrained_model(tmp_path, pretrained_run,
                                                                                    monkeypatch):
  """A mode in the way of LoRA or prompt tuning, written without touching the trainer: build_model
  adds a gain on the final hidden states, the only parameter trained; the pretrained ones come
  from init_from and stay, and the run saves and reloads both."""
  class HiddenGain(Pretrain):
    trainable = nnx.PathContains("hidden_gain")

    def build_model(self, model_config, rngs):
      model = super().build_model(model_config, rngs)
      model.hidden_gain = nnx.Param(jnp.ones(model_config.emb_dim))
      return model

    def loss_sums(self, model, batch):
      hidden = model.hidden(batch["decoder_input_tokens"], segment_ids=batch["decoder_segment_ids"],
                            positions=batch["decoder_positions"]) * model.hidden_gain[...]
      return model.loss_sums(hidden, batch["decoder_target_tokens"], batch["decoder_loss_weights"])

  monkeypatch.setitem(MODES, "hidden_gain", HiddenGain)
  pretrained = {keystr(path): np.asarray(leaf) for path, leaf in flat(Trainer.from_workdir(pretrained_run)
                                                                      .state["params"])}
  tuned = Trainer(tiny_config(steps=2, mode="hidden_gain", init_from=str(pretrained_run)), tmp_path,
                  make_loader=PatternLoader)
  tuned.train()
  for trainer in (tuned, Trainer.from_workdir(tmp_path)):
    assert [keystr(path) for path, _ in flat(trainer.state["params"])] == ["['hidden_gain']"]
    gain = np.asarray(trainer.state["params"]["hidden_gain"])
    assert np.all(np.abs(gain - 1) > 1e-4), "Adam moves every element of the gain by about the rate"
    frozen = {keystr(path): np.asarray(leaf) for path, leaf in flat(trainer.rest) if keystr(path) in pretrained}
    assert frozen.keys() == pretrained.keys()
    for name, value in frozen.items():
      np.testing.assert_array_equal(value, pretrained[name], err_msg=name)


def test_a_mode_that_trains_nothing_or_freezes_what_its_source_lacks_is_refused(tmp_path, pretrained_run,
                                                                                monkeypatch, caplog):
  class Misspelled(Pretrain):
    trainable = nnx.PathContains("mpl")

  class MlpOnly(Pretrain):
    trainable = nnx.PathContains("mlp")  # the MLP's dropout keys too: the trainer keeps only parameters

  monkeypatch.setitem(MODES, "misspelled", Misspelled)
  monkeypatch.setitem(MODES, "mlp_only", MlpOnly)
  with pytest.raises(ConfigError, match="train.mode='misspelled' trains no parameter"):
    Trainer(tiny_config(mode="misspelled"), tmp_path / "none", make_loader=PatternLoader)
  # The source tied its head to the embedding: a frozen lm_head would never leave its random start.
  config = tiny_config(steps=2, mode="mlp_only", init_from=str(pretrained_run))
  config.model.tie_embeddings = False
  with pytest.raises(ConfigError, match=r"train.mode='mlp_only' freezes 1 parameters that .* does not hold: "
                                        r"lm_head.kernel; start from a run that has them"):
    train(config, tmp_path / "untied")
  assert not (tmp_path / "untied" / "config.json").exists()
  config = tiny_config(steps=1, mode="mlp_only")
  config.model.mlp_dropout_rate = 0.1
  with caplog.at_level(logging.WARNING):
    trainer, _ = train(config, tmp_path / "scratch")
  assert "train.mode='mlp_only' freezes" in caplog.text and "no train.init_from gives them" in caplog.text
  assert {type(v) for v in jax.tree.leaves(nnx.state(trainer.model_from(trainer.state["params"]), nnx.Param),
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))} == {nnx.Param}
  assert all("['mlp']" in keystr(path) for path, _ in flat(trainer.state["params"]))
  assert any("['mlp']" in keystr(path) and "dropout" in keystr(path) for path, _ in flat(trainer.rest))
  # A step that scored no token logs a NaN loss beside a finite gradient norm: applied, not skipped.
  assert not trainer_module._skipped({"loss": float("nan"), "target_tokens": 0.0, "grad_norm": 0.0})
  assert trainer_module._skipped({"loss": 2.0, "target_tokens": 8.0, "grad_norm": float("inf")})


def test_init_from_passes_over_a_source_step_without_metadata_and_warns_of_a_head_left_random(
    tmp_path, pretrained_run, caplog):
  source = tmp_path / "source"
  shutil.copytree(pretrained_run, source)
  (source / "checkpoints" / "8" / "state" / "_METADATA").unlink()  # orbax reads it as a step holding nothing
  positions = source / "checkpoints" / "4" / "data" / "metadata"
  good_positions = positions.read_bytes()
  positions.write_text("{")  # the step's parameters are still good
  files = {path: path.read_bytes() for path in source.rglob("*") if path.is_file()}
  config = tiny_config(steps=4)
  config.model.tie_embeddings = False  # the source tied its head to the embedding
  tuned = Trainer(config, tmp_path / "tuned", make_loader=PatternLoader)
  with caplog.at_level(logging.WARNING):
    tuned.init_params_from(source)
  assert f"checkpoint {source / 'checkpoints' / '8'} is unreadable" in caplog.text
  assert f"the data positions of checkpoint {source / 'checkpoints' / '4'} are unreadable" in caplog.text
  assert "1 trainable parameters are not in" in caplog.text and "lm_head.kernel" in caplog.text
  assert {path: path.read_bytes() for path in source.rglob("*") if path.is_file()} == files  # untouched
  positions.write_bytes(good_positions)
  shutil.rmtree(source / "checkpoints" / "8")
  step_4 = Trainer.from_workdir(source).state["params"]  # the run's own reader, at its step 4
  for name, value in {keystr(path): leaf for path, leaf in flat(step_4)}.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(
        {keystr(path): leaf for path, leaf in flat(tuned.state["params"])}[name]), err_msg=name)


@pytest.mark.parametrize("change, message", [
    (dict(mlp_dim=96), r"mlp\.wi\.kernel: saved \(32, 64\), this config builds \(32, 96\)"),
    (dict(num_layers=1), r"params\.decoder\.layers\.1\..*: saved, but this config does not build it"),
])
def test_init_from_a_run_of_another_shape_names_the_parameters_and_writes_nothing(change, message, tmp_path,
                                                                                   pretrained_run):
  config = tiny_config(steps=4, init_from=str(pretrained_run))
  config.model.update(change)
  with pytest.raises(ConfigError, match=r"train.init_from checkpoint .*/8 holds other parameters than this "
                                        r"config builds \(.*" + message):
    train(config, tmp_path / "tuned")
  assert not (tmp_path / "tuned" / "config.json").exists() and not any((tmp_path / "tuned" / "checkpoints").iterdir())
  with pytest.raises(ConfigError, match=r"train.init_from=.*empty' holds no checkpoint"):
    train(tiny_config(steps=4, init_from=str(tmp_path / "empty")), tmp_path / "other")


@pytest.mark.parametrize("damage", ["garbage", "metadata gone"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(damage, tmp_path, caplog):
  train(tiny_config(steps=8), tmp_path)
  newest = tmp_path / "checkpoints" / "8"
  if damage == "metadata gone":  # orbax reads the step as holding nothing, not as unreadable
    (newest / "state" / "_METADATA").unlink()
  for file in (newest / "state").rglob("*"):
    if file.is_file() and damage == "garbage":
      file.write_bytes(b"garbage")
  # Inference only reads, beside a run that may be saving: it skips the step and moves nothing.
  assert int(Trainer.from_workdir(tmp_path).state["step"]) == 4
  assert newest.exists() and not (tmp_path / "corrupt").exists()
  with caplog.at_level(logging.WARNING):
    trainer, _ = train(tiny_config(steps=8), tmp_path)
  assert f"checkpoint {newest} is unreadable" in caplog.text
  assert f"resuming from checkpoint {tmp_path / 'checkpoints' / '4'}, the newest readable one" in caplog.text
  assert list((tmp_path / "corrupt").iterdir()), "the unreadable checkpoint must be kept, not deleted"
  # The rerun resumed from step 4: steps 5..8 were trained (and logged) a second time.
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  logged = [row["step"] for row in rows if row["split"] == "train"]
  assert [logged.count(step) for step in range(1, 9)] == [1] * 4 + [2] * 4
  assert [row["step"] for row in read_metrics(tmp_path, "train")] == list(range(1, 9))  # the newest of each
  assert int(trainer.state["step"]) == 8 and (newest / "state").exists()
  for file in (tmp_path / "checkpoints").rglob("*"):  # now every checkpoint: no silent start from step 0
    if file.is_file() and file.parent.name == "d":
      file.write_bytes(b"garbage")
  for _ in range(2):  # a restart stops too, and trains nothing
    with pytest.raises(ConfigError, match=r"no checkpoint in .*checkpoints is readable \(steps \[8, 4\]; step 8: "
                                          r".*\); nothing was moved. Fix the cause and rerun, or if the files "
                                          r"themselves are damaged, move .*checkpoints aside to train from step 0"):
      train(tiny_config(steps=8), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "8"]
    assert len(list((tmp_path / "corrupt").iterdir())) == 1  # the first damage's step 8
  # A workdir whose every step an older version set aside: a rerun stops rather than start at step 0.
  for step in ("4", "8"):
    shutil.move(tmp_path / "checkpoints" / step, tmp_path / "corrupt" / f"{step}-0")
  with pytest.raises(ConfigError, match=r"corrupt holds the steps set aside as unreadable"):
    train(tiny_config(steps=8), tmp_path)
  assert not any((tmp_path / "checkpoints").iterdir())


def test_a_failure_that_every_step_meets_moves_none_of_them(tmp_path, monkeypatch):
  """A restore that fails for the machine's reasons (here, permissions) fails for every step: setting
  them aside one by one emptied checkpoints/ of good work."""
  train(tiny_config(steps=8), tmp_path)

  def no_permission(*args, **kwargs):
    raise PermissionError(13, "Permission denied", str(tmp_path / "checkpoints"))
  monkeypatch.setattr(checkpoints, "_restore_here", no_permission)
  with pytest.raises(ConfigError, match=r"is readable \(steps \[8, 4\]; step 8: .*Permission denied"):
    train(tiny_config(steps=12), tmp_path)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "8"]
  assert not (tmp_path / "corrupt").exists()


def test_running_out_of_memory_while_restoring_sets_nothing_aside(tmp_path, monkeypatch):
  """Only a failure that points at the files sets a step aside; the initial state is freed
  before reading, so that a resume holds one train state, not two."""
  trained, _ = train(tiny_config(steps=4), tmp_path)

  def out_of_memory(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1234 bytes.")
  monkeypatch.setattr(checkpoints, "_restore_here", out_of_memory)
  with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
    train(tiny_config(steps=8), tmp_path)
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["4"] and not (tmp_path / "corrupt").exists()
  monkeypatch.undo()
  resumed = Trainer(tiny_config(steps=8), tmp_path, make_loader=PatternLoader)
  initial = jax.tree.leaves(resumed.state)
  resumed.restore()
  assert all(leaf.is_deleted() for leaf in initial)
  for a, b in zip(jax.tree.leaves(trained.state), jax.tree.leaves(resumed.state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class NanAtStep(PatternLoader):
  """Poisons the loss weights of the batches at `bad_positions`."""
  bad_positions = (6,)

  def __next__(self):
    batch = super().__next__()
    if self.position in self.bad_positions and self.split == "train":
      batch = dict(batch, decoder_loss_weights=np.full_like(batch["decoder_loss_weights"], np.nan))
    return batch


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
  with pytest.raises(NonFiniteLossError, match="at step 6"):
    train(tiny_config(steps=12, checkpoint_every=4, log_every=4), tmp_path, loader=NanAtStep)
  # The interval's steps up to the bad one are logged, though 6 stopped it before step 8's log.
  assert [row["step"] for row in read_metrics(tmp_path, "train")] == [1, 2, 3, 4, 5, 6]
  assert (tmp_path / "checkpoints" / "4").exists()
  assert not (tmp_path / "checkpoints" / "8").exists()
  # Once the bad data is fixed, the rerun resumes from step 4 and trains on past step 6.
  resumed = Trainer(tiny_config(steps=12, checkpoint_every=4), tmp_path, make_loader=PatternLoader)
  resumed.train()
  assert int(resumed.state["step"]) == 12 and all(np.isfinite(losses(tmp_path)[step]) for step in range(5, 13))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(resumed.state["params"]))


def test_parameters_an_update_made_non_finite_are_never_saved(tmp_path):
  # A rate past float32's range: the loss and gradient of step 1 are finite, its update is not.
  config = tiny_config(steps=4, checkpoint_every=1)
  config.train.optimizer.update(learning_rate=1e39, schedule="constant")
  with pytest.raises(NonFiniteLossError, match=r"the parameters became non-finite by step 1 \(.*\); no checkpoint"):
    train(config, tmp_path)
  assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


def test_bfloat16_weights_take_optax_adamws_step(tmp_path):
  """bfloat16 weights, gradients and moments: every weight moves (a rate of 0.05 is above their
  rounding) and lands where optax's AdamW in bfloat16 puts it, to within bfloat16's rounding."""
  config = tiny_config()
  config.model.update(dropout_rate=0.0, param_dtype="bfloat16")
  config.train.optimizer.update(learning_rate=0.05, schedule="constant")
  params, _, updates, _, state, _ = _one_step_and_optax(config, tmp_path)
  for ours, theirs, before in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(optax.apply_updates(
      params, updates)), jax.tree.leaves(params), strict=True):
    assert ours.dtype == theirs.dtype == jnp.bfloat16
    ours, theirs, before = (np.asarray(x, np.float32) for x in (ours, theirs, before))
    assert np.all(ours != before)
    # A weight's bfloat16 spacing (2^-7 of it), plus 2^-5 of the step: Adam's step, about the
    # rate, is a ratio of bfloat16 moments whose roundings differ with the order of the sums.
    np.testing.assert_allclose(ours, theirs, rtol=2.0 ** -7, atol=0.05 * 2.0 ** -5)


def test_a_batch_without_scored_tokens_has_no_loss_rather_than_a_perfect_one():
  means = loss_means({"loss": 0.0, "cross_entropy": 0.0, "correct": 0.0, "weight": 0.0})
  assert np.isnan(means["loss"]) and np.isnan(means["perplexity"]) and np.isnan(means["accuracy"])
  assert means["target_tokens"] == 0.0


def test_nonfinite_loss_can_skip_the_update(tmp_path, caplog):
  class NanAtSteps4And6(NanAtStep):
    bad_positions = (4, 6)

  with caplog.at_level(logging.WARNING):  # two skips, but never two in a row
    trainer, _ = train(tiny_config(steps=8, nonfinite="skip", max_consecutive_skips=2), tmp_path,
                       loader=NanAtSteps4And6)
  assert "skipped the update of step 4" in caplog.text and "skipped the update of step 6" in caplog.text
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(trainer.state["params"]))

  class DivergedFromStep5(NanAtStep):
    bad_positions = range(5, 100)

  with pytest.raises(NonFiniteLossError, match=r"the last 3 updates, up to step 7, were all non-finite and skipped "
                                               r"\(train.max_consecutive_skips=3\): the run has diverged. Its "
                                               r"checkpoints hold the last finite parameters, from before step 5"):
    train(tiny_config(steps=12, nonfinite="skip", max_consecutive_skips=3), tmp_path / "diverged",
          loader=DivergedFromStep5)
  assert sorted(p.name for p in (tmp_path / "diverged" / "checkpoints").iterdir()) == ["4"]
  # Stopped after two skips in a row (steps 5 and 6), a resume's third (step 7) is the limit, not its first.
  train(tiny_config(steps=6, nonfinite="skip", max_consecutive_skips=3), tmp_path / "resumed",
        loader=DivergedFromStep5)
  with pytest.raises(NonFiniteLossError, match=r"the last 3 updates, up to step 7, were all non-finite"):
    train(tiny_config(steps=12, nonfinite="skip", max_consecutive_skips=3), tmp_path / "resumed",
          loader=DivergedFromStep5)


def test_a_resume_leaves_a_skipped_step_with_a_finite_loss_out_of_the_train_loss(tmp_path):
  """A step skipped for its gradient alone logs a finite loss and an infinite gradient norm; the
  train loss a run resumed at its end reports leaves it out, as the run itself did."""
  train(tiny_config(steps=4, log_every=4), tmp_path)
  path = tmp_path / "metrics.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  for row in rows:
    if row["split"] == "train" and row["step"] == 3:
      row["grad_norm"] = math.inf
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  _, result = train(tiny_config(steps=4, log_every=4), tmp_path)
  kept = [row for row in read_metrics(tmp_path, "train") if row["step"] != 3]
  assert len(kept) == 3 and result.train_loss == pytest.approx(
      sum(r["loss"] * r["target_tokens"] for r in kept) / sum(r["target_tokens"] for r in kept), rel=1e-6)


def test_a_skipped_update_leaves_the_state_exactly_as_it_was(tmp_path):
  trainer = Trainer(tiny_config(nonfinite="skip", schedule="warmup_cosine"), tmp_path, make_loader=PatternLoader)
  loader = NanAtStep(trainer.config.data, "train", process_index=0, process_count=1)
  loader.bad_positions = (2,)
  before, _ = trainer.train_step(trainer.state, trainer.rest, trainer.global_batch(next(loader)),
                                 trainer.run_inputs)
  before = jax.tree.map(np.asarray, before)  # the next step donates the state's buffers
  after, metrics = trainer.train_step(jax.tree.map(jax.numpy.asarray, before), trainer.rest,
                                      trainer.global_batch(next(loader)), trainer.run_inputs)
  assert not bool(metrics["finite"]) and int(after["step"]) == int(before["step"]) + 1
  for old, new in zip(jax.tree.leaves((before["params"], before["opt_state"])),
                      jax.tree.leaves((after["params"], after["opt_state"]))):
    np.testing.assert_array_equal(np.asarray(new), old)
  # The next update is the second applied: it runs, and is logged, at the schedule's second rate.
  _, metrics = trainer.train_step(after, trainer.rest, trainer.global_batch(next(loader)), trainer.run_inputs)
  assert bool(metrics["finite"]) and float(metrics["learning_rate"]) == pytest.approx(float(trainer.schedule(1)))
  assert trainer.schedule(1) != trainer.schedule(2)


def test_a_finite_loss_with_a_non_finite_gradient_is_not_applied(tmp_path):
  """A backward pass can overflow where the forward did not (bfloat16): the gradient is checked too."""
  trainer = Trainer(tiny_config(nonfinite="skip"), tmp_path, make_loader=PatternLoader)
  mode = trainer.mode

  class NanGradient:
    def __getattr__(self, name):
      return getattr(mode, name)

    def loss_sums(self, model, batch):
      sums = mode.loss_sums(model, batch)
      # sqrt(0 * w) is 0, its derivative inf * 0: NaN in the gradient alone.
      return dict(sums, loss=sums["loss"] + jnp.sqrt(0.0 * model.token_embed.embedding[...][0, 0]))

  trainer.mode = NanGradient()  # before the step is first traced
  before = jax.tree.map(np.asarray, trainer.state)  # the step donates the state's buffers
  batch = trainer.global_batch(next(PatternLoader(trainer.config.data, "train", process_index=0, process_count=1)))
  after, metrics = trainer.train_step(trainer.state, trainer.rest, batch, trainer.run_inputs)
  assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))
  assert not bool(metrics["finite"])
  for old, new in zip(jax.tree.leaves((before["params"], before["opt_state"])),
                      jax.tree.leaves((after["params"], after["opt_state"]))):
    np.testing.assert_array_equal(np.asarray(new), old)


def test_dropout_draws_a_new_mask_for_every_micro_batch_and_step(tmp_path):
  """Micro-batch i of step s (rows i, i + accum, ...) draws dropout from fold_in(fold_in(key(seed + 1), s), i),
  the dropout stream's key (the parameters' is key(seed)): the step's loss is the sum of those
  micro-batch losses, computed one by one."""
  config = tiny_config(grad_accum_steps=2, seed=5)
  config.model.dropout_rate = 0.5
  trainer = Trainer(config, tmp_path, make_loader=PatternLoader, devices=jax.devices()[:2])
  batch = trainer.global_batch(next(PatternLoader(config.data, "train", process_index=0, process_count=1)))
  loss = jax.jit(lambda params, micro, key: trainer._loss_sums(params, trainer.rest, micro, key, train=True)["loss"])
  with jax.set_mesh(trainer.mesh), partitioning.activation_rules(config.partitioning):
    for step in range(2):
      params = jax.tree.map(jnp.copy, trainer.state["params"])
      step_key = jax.random.fold_in(jax.random.key(5 + 1), step)
      micro_losses = [float(loss(params, {k: v[i::2] for k, v in batch.items()}, jax.random.fold_in(step_key, i)))
                      for i in range(2)]
      trainer.state, metrics = trainer.train_step(trainer.state, trainer.rest, batch, trainer.run_inputs)
      assert float(metrics["loss"]) == pytest.approx(sum(micro_losses), rel=1e-5)
  # The masks matter: micro-batch 1 under micro-batch 0's key scores otherwise.
  assert float(loss(params, {k: v[1::2] for k, v in batch.items()}, jax.random.fold_in(step_key, 0))) != (
      pytest.approx(micro_losses[1], rel=1e-3))


def test_token_ids_outside_the_vocabulary_are_named_before_they_become_a_nan_loss(tmp_path):
  """Hugging Face marks ignored targets -100; here they take loss weight 0. The lookup of an id
  outside the table is NaN, even at weight 0, and the loss check would blame the learning rate."""
  trainer = Trainer(tiny_config(), tmp_path, make_loader=PatternLoader)
  batch = next(PatternLoader(trainer.config.data, "train", process_index=0, process_count=1))
  trainer.global_batch(batch)
  for name, value in (("decoder_target_tokens", -100), ("decoder_input_tokens", 64)):
    bad = dict(batch, **{name: batch[name].copy()})
    bad[name][0, 3] = value
    with pytest.raises(ConfigError, match=f"the batch's {name} hold ids from .*{value}.* outside model.vocab_size=64"):
      trainer.global_batch(bad)


@pytest.mark.parametrize("changes,message", [
    (dict(mesh_shape=(3, -1, 1)), r"partitioning.mesh_shape=\(3, -1, 1\) does not divide the 8"),
    (dict(mesh_shape=(4, 4, 1)), r"uses 16 devices but 8 are available"),
    (dict(mesh_shape=(2, 2, 1)), r"uses 4 devices but 8 are available"),
    (dict(mesh_shape=(-1, -1, 1)), "at most one -1"),
    (dict(mesh_shape=(0, -1, 1)), "has a size that is not positive"),
    (dict(mesh_shape=(1.0, -1, 1)), r"mesh_shape=\(1.0, -1, 1\) must hold integers"),
    (dict(mesh_shape=(-1, 1)), r"mesh_shape=\(-1, 1\) and partitioning.mesh_axes=\('data', 'fsdp', 'tensor'\) differ"),
    (dict(steps=0), "train.steps=0 must be a positive integer"),
    (dict(grad_accum_steps=3), r"data.batch_size=8 does not divide over 8 data shards"),
    (dict(mode="dpo"), "train.mode='dpo'"),
    (dict(nonfinite="ignore"), "train.nonfinite='ignore'"),
    (dict(eval_steps=0), "train.eval_steps=0 must be a positive integer"),
    (dict(max_consecutive_skips=0), "train.max_consecutive_skips=0 must be a positive integer"),
    (dict(z_loss=-5.0), "train.z_loss=-5.0 must be at least 0"),
])
def test_bad_configs_fail_before_compiling(changes, message, tmp_path, lowered):
  mesh_shape = changes.pop("mesh_shape", (-1, 1, 1))
  with pytest.raises(ConfigError, match=message):
    Trainer(tiny_config(mesh_shape=mesh_shape, **changes), tmp_path, make_loader=PatternLoader)
  assert not lowered


@pytest.fixture
def lowered():
  """Programs lowered for XLA while the test runs (each jitted call's first, and every eager op's):
  refused before compiling means none."""
  programs = []

  def listen(event, seconds, **kwargs):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      programs.append(kwargs.get("fun_name", "?"))
  jax.monitoring.register_event_duration_secs_listener(listen)
  yield programs
  jax.monitoring.unregister_event_duration_listener(listen)


@pytest.mark.parametrize("rules, message", [
    (lambda rules: [(name, axes) for name, axes in rules if name != "mlp"], "logical axis 'mlp' has no rule"),
    (lambda rules: [(name, "model" if name == "mlp" else axes) for name, axes in rules],
     "map 'mlp' to mesh axis 'model', which is not in partitioning.mesh_axes"),
    (lambda rules: [(name, "model" if name == "activation_heads" else axes) for name, axes in rules],
     "map 'activation_heads' to mesh axis 'model', which is not in partitioning.mesh_axes"),
    (lambda rules: [("vocab",)] + list(rules), r"partitioning.rules holds \('vocab',\); each rule is a pair"),
    (lambda rules: [(name, ("data", "data") if name == "activation_batch" else axes) for name, axes in rules],
     r"map 'activation_batch' to \('data', 'data'\), which names a mesh axis twice"),
])
def test_bad_partitioning_rules_name_the_axis(rules, message, tmp_path):
  config = tiny_config()
  config.partitioning.rules = rules(config.partitioning.rules)
  with pytest.raises(ConfigError, match=message):
    Trainer(config, tmp_path, make_loader=PatternLoader)


def test_training_warns_of_an_evaluation_that_goes_round_its_split(tmp_path, caplog):
  class ThreeValidationRows(PatternLoader):
    def rows_in_one_pass(self, limit):
      return min(limit, 3)

  with caplog.at_level(logging.WARNING):
    train(tiny_config(steps=1, eval_steps=2), tmp_path, loader=ThreeValidationRows)
  assert ("train.eval_steps=2 batches take 16 rows of the validation split on this process, which has 3: they go "
          "round it and count some rows more than once; lower train.eval_steps") in caplog.text


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  (tmp_path / "notes.txt").write_text("a file\n")
  with pytest.raises(ConfigError, match=r"the workdir .*notes\.txt is a file, not a directory"):
    Trainer(tiny_config(), tmp_path / "notes.txt", make_loader=PatternLoader)


def test_the_cudnn_kernel_is_refused_off_a_gpu_before_compiling(tmp_path, monkeypatch, lowered):
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # as on CI, wherever the suite runs
  config = tiny_config()
  config.model.update(attention_kernel="cudnn", dtype="bfloat16", emb_dim=64)  # what cuDNN takes
  with pytest.raises(ConfigError, match="model.attention_kernel='cudnn' runs on NVIDIA GPUs only, not on this cpu"):
    Trainer(config, tmp_path, make_loader=PatternLoader)
  assert not lowered


def test_the_first_rule_for_a_name_applies_to_parameters_as_to_activations(tmp_path):
  """T5X's and flax's order: the first rule whose mesh axis the array has not used yet; a dim left
  with none is replicated rather than split twice over one axis."""
  kernel = lambda trainer: trainer.state["params"]["decoder"]["layers"][0]["mlp"]["wi"]["kernel"]  # noqa: E731
  config = tiny_config(mesh_shape=(2, 2, 2))
  config.partitioning.rules = list(config.partitioning.rules) + [("mlp", None)]  # a later rule: ignored
  assert kernel(Trainer(config, tmp_path, make_loader=PatternLoader)).sharding.spec == PartitionSpec("fsdp", "tensor")
  config.partitioning.rules = [("embed", "tensor")] + list(config.partitioning.rules)  # embed takes tensor first
  assert kernel(Trainer(config, tmp_path, make_loader=PatternLoader)).sharding.spec == PartitionSpec("tensor", None)


def test_renamed_mesh_axes_split_the_batch_as_the_activation_batch_rule_says(tmp_path):
  rename = {"data": "replica", "tensor": "model"}
  config = tiny_config(mesh_shape=(4, 1, 2))
  config.partitioning.mesh_axes = ("replica", "fsdp", "model")
  config.partitioning.rules = [(name, tuple(rename.get(a, a) for a in axes) if isinstance(axes, tuple)
                                else rename.get(axes, axes)) for name, axes in config.partitioning.rules]
  trainer = Trainer(config, tmp_path, make_loader=PatternLoader)
  assert trainer.batch_sharding.spec == PartitionSpec(("replica", "fsdp"))
  config.data.batch_size = 6
  with pytest.raises(ConfigError, match=r"data.batch_size=6 does not divide over 4 data shards"):
    Trainer(config, tmp_path, make_loader=PatternLoader)


def test_dims_are_checked_against_the_configured_rules_not_the_default_ones(tmp_path):
  """A replicated vocabulary need not divide over tensor; an MLP moved onto the data axis must divide over it."""
  config = tiny_config(steps=1, mesh_shape=(2, 1, 4))
  config.model.vocab_size = 66
  config.partitioning.rules = [(name, None if name in ("vocab", "activation_vocab") else axes)
                               for name, axes in config.partitioning.rules]
  trainer, result = train(config, tmp_path / "vocab")
  assert trainer.state["params"]["token_embed"]["embedding"].sharding.spec == PartitionSpec(None, "fsdp")
  assert np.isfinite(result.validation["loss"])
  config = tiny_config(mesh_shape=(4, 1, 2))
  config.model.mlp_dim = 66
  config.partitioning.rules = [(name, "data" if name == "mlp" else axes) for name, axes in config.partitioning.rules]
  with pytest.raises(ConfigError, match=r"^model.mlp_dim=66 does not divide over the data mesh axis of size 4 "
                                        r"\(logical axis 'mlp', by partitioning.rules\)$"):
    Trainer(config, tmp_path / "mlp", make_loader=PatternLoader)


def test_bad_model_and_data_configs_name_the_fields(tmp_path):
  config = tiny_config(mesh_shape=(1, 1, 8))
  with pytest.raises(ConfigError, match="model.num_heads=4 does not divide over the tensor mesh axis of size 8"):
    Trainer(config, tmp_path, make_loader=PatternLoader)
  config = tiny_config(mesh_shape=(1, 8, 1))
  config.model.update(emb_dim=36, num_heads=2)
  with pytest.raises(ConfigError, match="model.emb_dim=36 does not divide over the fsdp mesh axis of size 8"):
    Trainer(config, tmp_path, make_loader=PatternLoader)
  config = tiny_config()
  config.model.num_heads = 5
  with pytest.raises(ConfigError, match="model.num_heads=5 does not divide model.emb_dim=32"):
    Trainer(config, tmp_path, make_loader=PatternLoader)
  config = tiny_config()
  config.model.position = "learned"
  config.data.seq_len = 64
  with pytest.raises(ConfigError, match="exceeds model.max_len=32"):
    Trainer(config, tmp_path, make_loader=PatternLoader)
  config = tiny_config()
  config.data.objective = "span_corruption"
  with pytest.raises(ConfigError, match=r"data.objective='span_corruption' makes rows for model.arch in "
                                        r"\('encoder_decoder',\), not 'decoder'"):
    Trainer(config, tmp_path, make_loader=PatternLoader)
  config = tiny_config()
  config.model.position, config.data.objective = "relative", "prefix_lm"
  with pytest.raises(ConfigError, match=r"a prefix LM .* with model.position='relative' needs "
                                        r"model.relative_bidirectional=True"):
    Trainer(config, tmp_path, make_loader=PatternLoader)
  config.model.relative_bidirectional = True  # Mesh TensorFlow's prefix LM
  assert Trainer(config, tmp_path, make_loader=PatternLoader).model_config.relative_bidirectional
  config = tiny_config()
  config.data.objective = "preference"  # pairs for a reward model or DPO, not for pretraining
  with pytest.raises(ConfigError, match=r"train.mode='pretrain' reads \['decoder_input_tokens', .*\], which "
                                        r"data.objective='preference' does not make \(it makes \['chosen_decoder_"):
    Trainer(config, tmp_path, make_loader=PatternLoader)


def test_a_resume_and_a_fine_tune_return_the_memory_of_each_state_they_free_before_reading(tmp_path, monkeypatch):
  """Each trim comes after the free it is for (docs/performance.md, item 67): the initial state's
  before a resume reads, the optimizer state's before a fine-tune reads, the replaced
  parameters' before its new state is made."""
  train(tiny_config(steps=4), tmp_path / "run")
  watched, trims = [], []
  monkeypatch.setattr(trainer_module, "return_freed_memory",
                      lambda: trims.append(sum(leaf.is_deleted() for leaf in watched)))
  resumed = Trainer(tiny_config(steps=8), tmp_path / "run", make_loader=PatternLoader)
  watched = jax.tree.leaves(resumed.state)
  assert resumed.restore() is not None
  assert trims == [len(watched), len(watched)]  # and the reader's buffers, after it
  tuned = Trainer(tiny_config(steps=8), tmp_path / "tuned", make_loader=PatternLoader)
  trims.clear()
  moments, params = jax.tree.leaves(tuned.state["opt_state"]), jax.tree.leaves(tuned.state["params"])
  watched = moments + params
  tuned.init_params_from(tmp_path / "run")
  assert trims == [len(moments), len(watched)]


ORBAX_FULL_DEVICE = ('RESOURCE_EXHAUSTED: Error writing "params.decoder.final_norm.scale/0" in OCDBT database at '
                     'local file "{}": Failed to write 4202496 bytes to file 18: No space left on device '
                     "[os_error_code='28']")


@pytest.mark.parametrize("failing_save", [2, 1])
def test_a_full_device_as_orbax_reports_it_is_named_once(failing_save, tmp_path, monkeypatch):
  """Orbax's ValueError from its writer threads, raised at the next save and at every wait after
  it, becomes one OutOfSpaceError naming the steps saved before; other errors pass unchanged."""
  saves = []
  original_save, original_wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished

  def save(manager, step, *args, **kwargs):
    saves.append(step)
    if len(saves) >= failing_save:  # as orbax waits for the writes before, then finds one failed
      original_wait(manager)
      raise ValueError(ORBAX_FULL_DEVICE.format(tmp_path))
    return original_save(manager, step, *args, **kwargs)

  def wait(manager):
    if len(saves) >= failing_save:
      raise ValueError(ORBAX_FULL_DEVICE.format(tmp_path))
    return original_wait(manager)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait)
  with pytest.raises(checkpoints.OutOfSpaceError) as raised:
    train(tiny_config(steps=12), tmp_path)
  kept = ("the steps saved before it (4) are intact, and rerun with room the run resumes from step 4 (a checkpoint "
          "takes" if failing_save == 2 else "no step was saved before it")
  assert str(raised.value).startswith(f"no space left on the device of {tmp_path / 'checkpoints'} to write a "
                                      f"checkpoint; {kept}")
  assert isinstance(raised.value.__cause__, ValueError)  # orbax's own, for a traceback to show
  monkeypatch.setattr(ocp.CheckpointManager, "save", lambda *args, **kwargs: 1 / 0)
  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", original_wait)
  with pytest.raises(ZeroDivisionError):
    train(tiny_config(steps=12), tmp_path / "other")


def test_only_orbax_and_asyncio_records_of_a_full_device_are_dropped():
  message = "_SignalingThread.run() raised an exception: " + ORBAX_FULL_DEVICE.format("/w")
  def record(logger, pathname, text=message):
    return logging.LogRecord(logger, logging.ERROR, pathname, 1, text, None, None)
  orbax_file = os.path.join(os.path.dirname(ocp.__file__), "_src", "futures", "future.py")
  assert not logging.getLogger("absl").filter(record("absl", orbax_file))
  assert logging.getLogger("absl").filter(record("absl", orbax_file, "orbax's other news"))
  assert logging.getLogger("absl").filter(record("absl", "/site-packages/grain/_src/python/dataset.py"))
  assert not logging.getLogger("asyncio").filter(record("asyncio", "/asyncio/base_events.py"))


@pytest.fixture
def small_device(tmp_path):
  """A 1 MiB tmpfs, for a workdir whose third checkpoint does not fit (mounting needs root)."""
  mounted = tmp_path / "small"
  mounted.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mounted)], capture_output=True).returncode:
    pytest.skip("mounting a tmpfs needs root")
  yield mounted
  subprocess.run(["umount", "-l", str(mounted)], check=True)


def test_a_full_device_stops_the_run_naming_the_steps_that_are_safe(small_device, caplog):
  """Orbax's writer threads logged hundreds of lines of tracebacks, and the run ended in its
  ValueError at the next save. One error now names the device and the steps kept, and the run
  resumes from them once there is room."""
  config = tiny_config(steps=40, keep_checkpoints=100, checkpoint_every=2)
  with pytest.raises(checkpoints.OutOfSpaceError) as raised:
    train(config, small_device / "run")
  directory = small_device / "run" / "checkpoints"
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  assert len(steps) >= 2 and steps == list(range(2, 2 * len(steps) + 1, 2))
  size = sum(path.stat().st_size for path in (directory / str(steps[-1])).rglob("*") if path.is_file())
  assert str(raised.value) == (
      f"no space left on the device of {directory} to write a checkpoint; the steps saved before it "
      f"({', '.join(map(str, steps))}) are intact, and rerun with room the run resumes from step {steps[-1]} (a "
      f"checkpoint takes {size / 2**20:.1f} MiB)")
  assert raised.value.errno == errno.ENOSPC  # the command's one line (cli._run)
  assert "No space left on device" not in caplog.text  # orbax's and asyncio's records of it are dropped
  subprocess.run(["mount", "-o", "remount,size=64M", str(small_device)], check=True)
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="t5x_like.trainer"):
    _, result = train(config, small_device / "run")
  assert f"restored step {steps[-1]}" in caplog.text and result.step == 40
