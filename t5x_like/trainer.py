"""The one training loop: any architecture, any training mode, one device or a pod.

The loop owns only what every mode shares: sharded initialisation, the jitted step
with gradient accumulation, non-finite guards, checkpoints with the data position,
metrics and evaluation. What is trained, on which batch features and with which loss
comes from the mode (t5x_like.modes).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import itertools
import json
import logging
import math
import os
import pathlib
import socket
import time
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from models.config import ConfigError, ModelConfig
from models.transformer import PREFIX_LM_RELATIVE
from t5x_like import partitioning
from t5x_like.checkpoints import Checkpointer, read_params, saved_tokenizer_digest, this_process_position
from t5x_like.config import base_config, fill_defaults
from t5x_like.data.config import absolute_paths
from t5x_like.data.objectives import OBJECTIVE_CLASSES
from t5x_like.distributed import check_on_every_process, check_same_run, mark_this_process_failing, process_0s
from t5x_like.hardware import peak_flops_per_device
from t5x_like.host_memory import return_freed_memory
from t5x_like.metrics import MetricWriter, read_metrics
from t5x_like.modes import TrainingMode, make_mode
from t5x_like.optimizers import (SCHEDULE_FIELDS, default_optimizer_config, make_optimizer, make_schedule,
                                 schedule_inputs)
from t5x_like.preemption import Preempted, StopSignal

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """Training diverged: the loss, the gradient or (after an update) the parameters became NaN or
  Inf. The message names the step and what to change; no checkpoint holds the bad state."""


def default_train_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      mode="pretrain",
      steps=1000,
      seed=0,
      grad_accum_steps=1,
      z_loss=0.0,
      # 'stop': raise, naming the step (the last good checkpoint stays intact);
      # 'skip': drop that update and go on, until max_consecutive_skips updates in a row were
      # non-finite: then the run has diverged, not met one bad batch, and stops as 'stop' does.
      nonfinite="stop",
      max_consecutive_skips=10,
      log_every=10,
      eval_every=250,
      eval_steps=10,
      checkpoint_every=250,
      keep_checkpoints=3,
      # Compile and run the parameters' initialisation on the host CPU, then copy them into the
      # devices' shardings: a way around an accelerator's slow compile of the unrolled initialiser
      # (docs/performance.md, item 36). Not needed on GPUs since threefry_as_gpu_kernels: an
      # H200 initialises the 1b model in 10.7 s, the host in 25 (item 39). The parameters must
      # fit in host memory; the optimizer state is made on the devices (item 66).
      init_on_host=False,
      # Another run's workdir: its newest checkpoint's parameters start this run (a pretrained
      # model to fine-tune) when this workdir has no checkpoint of its own. '': from scratch.
      init_from="",
      optimizer=default_optimizer_config(),
  ))


@dataclasses.dataclass
class TrainResult:
  step: int
  train_loss: float  # per token over the last train.log_every steps, not one batch's noise
  validation: dict[str, float]


def _sequence_lengths(config: ml_collections.ConfigDict, model_config: ModelConfig) -> tuple[int, ...]:
  """(input length, target length) for an encoder-decoder, (length,) otherwise."""
  if model_config.arch == "encoder_decoder":
    return config.data.input_len, config.data.target_len
  return (config.data.seq_len,)


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> ModelConfig:
  """Rejects configs that cannot work, before anything is compiled (each parameter's dims against
  its mesh axes are checked as its sharding is made, partitioning.logical_shardings)."""
  model_config = ModelConfig.from_dict(config.model)
  train = config.train
  for name in ("steps", "log_every", "eval_every", "eval_steps", "checkpoint_every", "grad_accum_steps",
               "keep_checkpoints", "max_consecutive_skips"):
    if int(train[name]) <= 0:
      raise ConfigError(f"train.{name}={train[name]} must be a positive integer")
  if train.nonfinite not in ("stop", "skip"):
    raise ConfigError(f"train.nonfinite={train.nonfinite!r} is not one of ('stop', 'skip')")
  if not train.z_loss >= 0:  # a negative weight would reward large logits
    raise ConfigError(f"train.z_loss={train.z_loss} must be at least 0")
  if model_config.attention_kernel == "cudnn" and jax.default_backend() != "gpu":
    raise ConfigError(f"model.attention_kernel='cudnn' runs on NVIDIA GPUs only, not on this "
                      f"{jax.default_backend()} backend; use attention_kernel='auto'")
  data_shards = partitioning.data_shards(config.partitioning, num_devices)
  batch, accum = config.data.batch_size, train.grad_accum_steps
  if batch % (data_shards * accum):
    raise ConfigError(
        f"data.batch_size={batch} does not divide over {data_shards} data shards "
        f"(partitioning.mesh_shape={tuple(config.partitioning.mesh_shape)}) x "
        f"train.grad_accum_steps={accum}")
  if batch % jax.process_count():
    raise ConfigError(f"data.batch_size={batch} does not divide over {jax.process_count()} processes")
  model_config.check_length(max(_sequence_lengths(config, model_config)), "data length")
  if config.data.get("objective") == "prefix_lm" and model_config.position == "relative" \
      and not model_config.relative_bidirectional:
    raise ConfigError(PREFIX_LM_RELATIVE)  # named now, not when the first step is traced
  objective = OBJECTIVE_CLASSES.get(config.data.get("objective"))
  if objective is not None and model_config.arch not in objective.architectures:
    # A decoder would otherwise train on span corruption's target strings without their inputs.
    raise ConfigError(f"data.objective={config.data.objective!r} makes rows for model.arch in "
                      f"{objective.architectures}, not {model_config.arch!r}")
  if objective is not None:
    needed = make_mode(train).batch_features(model_config, config.data.objective)
    missing = [name for name in needed if name not in objective.feature_names]
    if missing:  # preference pairs under pretrain: found here, not at the first batch
      raise ConfigError(f"train.mode={train.mode!r} reads {missing}, which data.objective="
                        f"{config.data.objective!r} does not make (it makes {list(objective.feature_names)})")
  if "tokenizer" in config.data:
    from t5x_like.data.tokenizer import load_tokenizer
    vocab = load_tokenizer(config.data.tokenizer).vocab_size
    if vocab > model_config.vocab_size:
      raise ConfigError(f"data.tokenizer={config.data.tokenizer!r} has {vocab} ids but model.vocab_size="
                        f"{model_config.vocab_size}; make model.vocab_size at least {vocab}")
  return model_config


def stop_requested(stop: StopSignal, step: int, log_every: int) -> bool:
  """Whether to save and stop after `step`. With several processes, all stop together at a logging
  step once any has received SIGTERM: one alone would leave the others waiting in a collective."""
  if jax.process_count() == 1:
    return stop.received
  if step % log_every:
    return False
  return bool(np.any(multihost_utils.process_allgather(np.array(stop.received))))


def training_warnings(config: ml_collections.ConfigDict) -> list[str]:
  """What makes a config run but not train as meant: a zero learning rate, a warmup as long as
  the run (the rate never peaks nor decays), Adam's settings given to Adafactor, which ignores
  them, and weights stored below float32, whose small steps round away (bfloat16's near 1.0
  below a learning rate of about 4e-3). Logged when training starts, not when decode, eval or
  score load a run."""
  warnings, train = [], config.train
  if train.optimizer.learning_rate == 0:
    warnings.append("train.optimizer.learning_rate=0: the weights never change")
  if train.optimizer.schedule == "warmup_cosine" and train.optimizer.warmup_steps >= train.steps:
    warnings.append(f"train.optimizer.warmup_steps={train.optimizer.warmup_steps} is not below "
                    f"train.steps={train.steps}: the learning rate never reaches its peak nor decays")
  defaults = default_optimizer_config()
  adam_only = [f"{name}={train.optimizer[name]}" for name in ("b1", "b2", "eps")
               if train.optimizer[name] != defaults[name]]
  if train.optimizer.name == "adafactor" and adam_only:
    warnings.append(f"train.optimizer.name='adafactor' takes optax's factored defaults and ignores "
                    f"{', '.join(adam_only)}, which set adamw's moments")
  if config.model.get("param_dtype", "float32") != "float32":
    warnings.append(f"model.param_dtype={config.model.param_dtype!r}: the optimizer updates the weights in that "
                    f"dtype, where small steps round away; model.dtype='bfloat16' computes in bfloat16 from "
                    f"float32 weights")
  return warnings


# Model fields that choose how the same function is computed, or how much dropout regularises it:
# a resumed run may change them. A change to any other would go on training another model from
# the saved weights, silently wherever the shapes still fit.
RESUMABLE_MODEL_FIELDS = ("attention_kernel", "loss_kernel", "remat", "dtype", "bf16_matmul_inputs", "dropout_rate",
                          "final_dropout", "attention_dropout_rate", "mlp_dropout_rate")


def _model_values(section: ml_collections.ConfigDict) -> dict:
  """A model section's values: a field it lacks (a config.json older than the field) as its default,
  and one left None as what it derives to, so num_kv_heads=None and the head count are one model."""
  defaults = dataclasses.asdict(ModelConfig())
  config = ModelConfig(**{name: section.get(name, default) for name, default in defaults.items()})
  return dict(dataclasses.asdict(config), num_kv_heads=config.kv_heads, head_dim=config.dim_per_head,
              num_decoder_layers=config.decoder_layers)


def changed_model_fields(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[str]:
  """'model.FIELD SAVED -> NOW' for each model field outside RESUMABLE_MODEL_FIELDS that a run's
  config.json (`saved`) and `config` set differently."""
  was, now = _model_values(saved.model), _model_values(config.model)
  return [f"model.{name} {was[name]!r} -> {now[name]!r}" for name in was
          if name not in RESUMABLE_MODEL_FIELDS and was[name] != now[name]]


def learning_rate_change(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                         updates: int) -> str | None:
  """A warning when the learning rate a resumed run goes on with differs from the saved run's at
  the same update: raising train.steps rebuilds warmup_cosine's decay over the new total, so the
  rate climbs back up."""
  optimizer, steps = ml_collections.ConfigDict(saved.train.get("optimizer", {})), saved.train.steps
  fill_defaults(optimizer, default_optimizer_config())
  try:
    was = float(make_schedule(optimizer, steps)(updates))
  except ConfigError:  # a schedule this version no longer has: nothing to compare with
    return None
  now = float(make_schedule(config.train.optimizer, config.train.steps)(updates))
  if math.isclose(was, now, rel_tol=1e-6):
    return None
  changes = [f"train.steps {steps} -> {config.train.steps}"] if steps != config.train.steps else []
  changes += [f"train.optimizer.{name} {optimizer[name]!r} -> {config.train.optimizer[name]!r}"
              for name in ("schedule", *SCHEDULE_FIELDS) if optimizer[name] != config.train.optimizer[name]]
  return (f"the learning rate after {updates} updates is {now:.3g}, not the {was:.3g} the run's config.json "
          f"gives ({', '.join(changes)}); the schedule goes on from there")


def updates_applied(opt_state) -> jax.Array:
  """The learning-rate schedule's own count: a skipped non-finite step advances train steps, not it."""
  return optax.tree_utils.tree_get(opt_state, "count", filtering=lambda path, _: (
      isinstance(path[-1], optax.tree_utils.NamedTupleKey) and path[-1].tuple_name == "ScaleByScheduleState"))


@contextlib.contextmanager
def threefry_as_gpu_kernels():
  """Random bits drawn by jax's threefry kernel on GPUs, not by threefry unrolled into XLA ops.

  Every parameter's initialiser is its own unrolled threefry: on an H200 the 1b decoder's
  initialisation was still compiling after about 5 minutes (docs/performance.md, item 37);
  with the kernel it compiles in 7.4 s (item 39). The kernel computes the same bits. Where
  jax has dropped the flag, this does nothing.
  """
  flag = "jax_threefry_gpu_kernel_lowering"
  previous = getattr(jax.config, flag, None)
  if previous is None:
    yield
    return
  jax.config.update(flag, True)
  try:
    yield
  finally:
    jax.config.update(flag, previous)


class Trainer:
  """Builds the sharded state and compiled steps for one config and runs the loop."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
               make_loader: Callable[..., Iterator] | None = None, devices=None, params_only: bool = False):
    """`params_only`: for a trainer that evaluates or decodes and never trains (from_workdir), a
    state without optimizer moments (Adam's two would triple its memory), whose parameters stay
    shapes until restore() reads them."""
    self.config = config
    self.params_only = params_only
    config.data.update(absolute_paths(config.data))  # so config.json names them wherever eval or decode runs
    self.workdir = pathlib.Path(workdir)
    self._check_same_run_on_every_process()
    if self.workdir.exists() and not self.workdir.is_dir():
      raise ConfigError(f"the workdir {self.workdir} is a file, not a directory")
    devices = jax.devices() if devices is None else devices
    self.model_config = validate_config(config, len(devices))
    self.mode: TrainingMode = make_mode(config.train)
    self.trainable = nnx.All(nnx.Param, self.mode.trainable)  # never an RNG key or other state
    if make_loader is None:
      from t5x_like.data.loader import make_loader
    self.make_loader = make_loader
    self.mesh = partitioning.make_mesh(config.partitioning, devices)
    self.batch_sharding = partitioning.batch_sharding(self.mesh, config.partitioning)
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.features = self.mode.batch_features(self.model_config, config.data.get("objective"))
    # The numbers runs of one model and batch differ in (a sweep's budgets and seeds, a learning-rate
    # scan), handed to the compiled initialisation and train step rather than compiled into them, so
    # that such runs share them. The seed as build_model draws from it: parameters from train.seed's
    # key, dropout from seed + 1's.
    key_data = lambda seed: np.asarray(jax.random.key_data(jax.random.key(seed)))  # noqa: E731
    run_inputs = {"schedule": schedule_inputs(config.train.optimizer, config.train.steps),
                  "seed_keys": {"params": key_data(config.train.seed), "dropout": key_data(config.train.seed + 1)}}
    self.tx, self.schedule = make_optimizer(config.train.optimizer, run_inputs["schedule"])
    self.run_inputs = jax.tree.map(lambda v: jax.make_array_from_callback(v.shape, self.replicated, lambda _: v),
                                   run_inputs)
    self.skipped_in_a_row = 0  # updates train.nonfinite='skip' dropped since the last applied one
    self._build_state()
    self._compile_steps()

  @property
  def prefix_lm(self) -> bool:
    """Whether the model learned to read a bidirectional prefix, so decoding and scoring
    should read prompts that way."""
    return "decoder_causal_attention" in self.features

  # State -------------------------------------------------------------------------

  def _new_model(self, seed_keys) -> nnx.Module:
    return self.mode.build_model(self.model_config, nnx.Rngs(**seed_keys))

  def _build_state(self) -> None:
    """Abstract shapes first, then initialisation compiled straight into its shardings."""
    abstract_model = nnx.eval_shape(self._new_model, self.run_inputs["seed_keys"])
    self.graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, self.trainable, ...)
    if not jax.tree.leaves(abstract_params):  # a mistyped filter: every gradient would be empty
      raise ConfigError(f"train.mode={self.config.train.mode!r} trains no parameter: its trainable filter "
                        f"matches none of the model's")
    param_shardings = partitioning.logical_shardings(abstract_params, self.mesh, self.config.partitioning)
    rest_shardings = partitioning.logical_shardings(abstract_rest, self.mesh, self.config.partitioning)
    param_shardings, rest_shardings = nnx.as_pure(param_shardings), nnx.as_pure(rest_shardings)
    self.state_shardings = {"step": self.replicated, "params": param_shardings}
    self.rest_shardings = rest_shardings
    # Parameters the mode does not train (a fine-tuning mode's pretrained base) sit in `rest`
    # beside the dropout keys, yet belong to the run: its checkpoints hold them beside `state`.
    self.frozen_template = nnx.as_pure(nnx.filter_state(abstract_rest, nnx.Param))
    if self.params_only:
      self._build_state_to_restore(nnx.as_pure(abstract_params), nnx.as_pure(abstract_rest))
      return
    abstract_opt = jax.eval_shape(self.tx.init, nnx.as_pure(abstract_params))
    # Optimizer moments are sharded like their parameters; counters, and Adafactor's factored
    # row and column statistics (vectors of a matrix's shape), are replicated.
    self.state_shardings["opt_state"] = optax.tree_map_params(
        self.tx, lambda leaf, sharding, param: sharding if leaf.shape == param.shape else self.replicated,
        abstract_opt, param_shardings, nnx.as_pure(abstract_params), transform_non_params=lambda _: self.replicated)

    # The parameters are drawn first and the optimizer state is made around them after: the
    # initialisers' random bits, alive beside Adam's moments, had raised the start's peak to
    # about 4.8 copies of the parameters over the memory before it (docs/performance.md, item 66).
    def init(seed_keys):
      _, params, rest = nnx.split(self._new_model(seed_keys), self.trainable, ...)
      return nnx.as_pure(params), nnx.as_pure(rest)

    if self.config.train.get("init_on_host", False):  # absent from older runs' config.json
      with jax.default_device(jax.local_devices(backend="cpu")[0]):
        # This process's replica: every process holds the whole of a replicated array.
        on_host = jax.jit(init)(jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), self.run_inputs["seed_keys"]))
      params, self.rest = jax.device_put(on_host, (param_shardings, rest_shardings))
    else:
      with jax.set_mesh(self.mesh), threefry_as_gpu_kernels():
        params, self.rest = jax.jit(init, out_shardings=(param_shardings, rest_shardings))(
            self.run_inputs["seed_keys"])
    self.state = self._start_state(params)

  def _start_state(self, params) -> dict:
    """Step 0's state around these parameters (donated: they become its own) with fresh optimizer moments."""
    fresh = lambda params: {"step": jnp.zeros((), jnp.int32), "params": params,  # noqa: E731
                            "opt_state": self.tx.init(params)}
    with jax.set_mesh(self.mesh):
      return jax.jit(fresh, out_shardings=self.state_shardings, donate_argnums=0)(params)

  def _build_state_to_restore(self, abstract_params, abstract_rest) -> None:
    """A params_only state: every parameter, trained or frozen, a shape and sharding for restore()
    to fill, and the rest's other variables (dropout keys) drawn as a run draws them. Initialising
    the parameters only to overwrite them took three times their memory at once."""
    def shapes(tree, shardings):
      return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                          tree, shardings)
    self.state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated),
                  "params": shapes(abstract_params, self.state_shardings["params"])}

    def not_params(seed_keys):
      _, _, rest = nnx.split(self._new_model(seed_keys), self.trainable, ...)
      return nnx.as_pure(nnx.filter_state(rest, nnx.Not(nnx.Param)))
    with jax.set_mesh(self.mesh):
      drawn = _leaves_by_path(jax.jit(not_params)(self.run_inputs["seed_keys"]))
    shardings = _leaves_by_path(self.rest_shardings)
    self.rest = _replace_leaves(shapes(abstract_rest, self.rest_shardings),
                                {path: jax.device_put(leaf, shardings[path]) for path, leaf in drawn.items()})

  def checkpointed(self) -> dict:
    """What a checkpoint holds: `state`, and the parameters the mode freezes (if any) as `frozen`."""
    if not jax.tree.leaves(self.frozen_template):
      return self.state
    rest = _leaves_by_path(self.rest)
    frozen = jax.tree_util.tree_map_with_path(lambda keys, _: rest[_path_of(keys)], self.frozen_template)
    return {**self.state, "frozen": frozen}

  def _check_same_run_on_every_process(self) -> None:
    """Every process must train the same config in the same workdir (each reads the checkpoints
    from its own path), with the same tokenizer file (each reads its own copy)."""
    if jax.process_count() == 1:
      return
    run = {**json.loads(self.config.to_json_best_effort()), "workdir": str(self.workdir.absolute())}
    if "tokenizer" in self.config.data:
      from t5x_like.data.tokenizer import load_tokenizer
      run["tokenizer_sha256"] = check_on_every_process(lambda: load_tokenizer(self.config.data.tokenizer).sha256)
    check_same_run(run)

  def restore(self, checkpointer: Checkpointer | None = None, *, set_aside: bool = True) -> dict | None:
    """Loads the newest readable checkpoint in the workdir; returns every process's data-loader
    position in it (None when there is no checkpoint). An unreadable one is set aside
    (Checkpointer.restore_latest) unless set_aside=False."""
    if checkpointer is None:
      with contextlib.closing(Checkpointer(self.workdir / "checkpoints",
                                           max_to_keep=self.config.train.keep_checkpoints)) as own:
        return self.restore(own, set_aside=set_aside)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.checkpointed())
    if checkpointer.steps():
      # A checkpoint's state replaces the initial one, or the restore stops with an error: freed
      # first, a resume needs memory for one train state, not two.
      arrays = [leaf for leaf in jax.tree.leaves(self.state) if isinstance(leaf, jax.Array)]  # params_only: shapes
      for leaf in jax.block_until_ready(arrays):  # made before deleted, so the trim finds their memory free
        leaf.delete()
      return_freed_memory()
    older_layouts = []
    if not self.params_only and not self.config.train.optimizer.grad_clip_norm:
      # Runs saved with clipping off before 1f5209f hold the optimizer state without its clip step.
      older_layouts.append(({**abstract, "opt_state": abstract["opt_state"][1]},
                            lambda state: {**state, "opt_state": (optax.EmptyState(), state["opt_state"])}))
    restored = checkpointer.restore_latest(abstract, set_aside=set_aside, partial=self.params_only,
                                           older_layouts=older_layouts)
    if restored is None:
      return None
    step, saved, data_positions = restored
    return_freed_memory()  # the reader's buffers
    self._check_tokenizer(data_positions)
    self.state = {key: saved[key] for key in self.state}
    if "frozen" in saved:
      self.rest = _replace_leaves(self.rest, _leaves_by_path(saved["frozen"]))
    logger.info("restored step %d from %s", step, self.workdir)
    return data_positions

  def _check_tokenizer(self, data_positions: dict | None, init_from: str | None = None) -> None:
    """Raises ConfigError on every process unless each host's copy of this config's tokenizer file
    is the one the saved data positions (this run's, or init_from's) were read with. Positions
    from before they held its digest, or from a loader without one, pass."""
    def check():
      digest = saved_tokenizer_digest(data_positions)
      if not digest or "tokenizer" not in self.config.data:
        return
      from t5x_like.data.tokenizer import load_tokenizer
      tokenizer = self.config.data.tokenizer
      if load_tokenizer(tokenizer).sha256 == digest:
        return
      if init_from is None:  # training, eval and decode would read other ids
        raise ConfigError(f"data.tokenizer={tokenizer!r} is not the file {self.workdir} was trained with (its "
                          f"contents changed since); restore that file")
      # Each embedding row would stand for another piece.
      raise ConfigError(f"train.init_from={init_from!r} was trained with another tokenizer than "
                        f"data.tokenizer={tokenizer!r} (the files' contents differ); train with the one it was "
                        f"trained with")
    check_on_every_process(check)

  def init_params_from(self, source: str | pathlib.Path) -> None:
    """Starts from another run's newest checkpoint (a pretrained model to fine-tune): each
    parameter saved there replaces this run's of the same name, trainable or frozen, and this
    run's others (an adapter's new weights) keep their initialisation. The step, optimizer
    state and data position start fresh. The initial state's arrays are freed or donated on the
    way (a caller's references to them end deleted; its optimizer state's already if the read fails)."""
    targets = {_path_of(keys): jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
               for tree in (self.state["params"], self.rest)
               for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    # The initial state is freed as it is replaced (its optimizer state now, the parameters read
    # below, the rest donated to the new state), so a fine-tune starts in the memory of one train
    # state, as a resume does: holding all three, it peaked at about 6 copies of the parameters, not 3.
    for leaf in jax.block_until_ready(jax.tree.leaves(self.state["opt_state"])):  # made, then freed for the trim
      leaf.delete()
    return_freed_memory()
    loaded, data_positions = read_params(source, targets)
    frozen = [".".join(map(str, _path_of(keys))) for keys, _ in
              jax.tree_util.tree_flatten_with_path(self.frozen_template)[0] if _path_of(keys) not in loaded]
    if frozen:  # never trained, they would stay at their random initialisation
      raise ConfigError(f"train.mode={self.config.train.mode!r} freezes {len(frozen)} parameters that {source} "
                        f"does not hold: {', '.join(frozen[:5])}{', ...' if len(frozen) > 5 else ''}; start "
                        f"from a run that has them, or train them")
    self._check_tokenizer(data_positions, init_from=str(source))
    params, self.rest = _replace_leaves(self.state["params"], loaded), _replace_leaves(self.rest, loaded)
    kept = [".".join(map(str, _path_of(keys))) for keys, _ in jax.tree_util.tree_flatten_with_path(params)[0]
            if _path_of(keys) not in loaded]
    if kept:  # an adapter's new weights, or a head the source tied to its embedding
      logger.warning("%d trainable parameters are not in %s and keep their initialisation: %s%s", len(kept),
                     source, ", ".join(kept[:5]), ", ..." if len(kept) > 5 else "")
    for keys, leaf in jax.tree_util.tree_flatten_with_path(self.state["params"])[0]:
      if _path_of(keys) in loaded:
        leaf.delete()
    return_freed_memory()
    self.state = self._start_state(params)

  @classmethod
  def from_workdir(cls, workdir: str | pathlib.Path, devices=None) -> "Trainer":
    """The trainer of a finished or running run, for inference: its newest readable checkpoint's
    parameters loaded, not its optimizer moments (an unreadable step is skipped and left where it
    is: training sets it aside).

    Where the run's mesh or batch does not fit these devices (a pod's run evaluated on one GPU,
    a model axis that -1 sizes to a count its dims do not divide), the devices the batch divides
    over all go on the data axis: checkpoints restore onto any mesh, though each device then
    holds the whole model.
    """
    workdir = pathlib.Path(workdir)
    if not (workdir / "config.json").exists():
      raise ConfigError(f"{workdir} holds no config.json, which train writes with its first checkpoint; "
                        f"is it a t5x-like train --workdir?")
    config = read_run_config(workdir)
    defaults = base_config()  # for fields added since the run wrote its config.json (the loader fills data's)
    for section in ("train", "partitioning"):
      fill_defaults(config[section], defaults[section])
    config.train.grad_accum_steps = 1  # nothing is trained: the batch need only divide over the data shards
    if config.model.get("attention_kernel") == "cudnn" and jax.default_backend() != "gpu":
      config.model.attention_kernel = "auto"  # the same parameters; a GPU run evaluated on another platform
    devices = jax.devices() if devices is None else devices
    batch = config.data.batch_size
    try:
      shards = partitioning.data_shards(config.partitioning, len(devices))
      if batch % shards:
        raise ConfigError(f"data.batch_size={batch} does not divide over {shards} data shards")
    except ConfigError as error:
      devices = _on_the_data_axis(config, devices, error)
    try:
      trainer = cls(config, workdir, devices=devices, params_only=True)
    except partitioning.UnevenShardingError as error:
      trainer = cls(config, workdir, devices=_on_the_data_axis(config, devices, error), params_only=True)
    if trainer.restore(set_aside=False) is None:  # it only reads: the run may be saving there
      raise ConfigError(f"{workdir}/checkpoints holds no readable checkpoint")
    return trainer

  def model_from(self, params, rest=None) -> nnx.Module:
    return nnx.merge(self.graphdef, params, self.rest if rest is None else rest)

  # Steps -------------------------------------------------------------------------

  def _loss_sums(self, params, rest, batch, dropout_key, *, train: bool):
    model = self.model_from(params, rest)
    if train:
      model.train()
      nnx.reseed(model, dropout=dropout_key)
    else:
      model.eval()
    return self.mode.loss_sums(model, batch)

  def _grads(self, params, rest, batch, dropout_key):
    """Gradients of the summed loss, and the sums themselves."""
    return jax.grad(lambda p: _scalar_and_aux(self._loss_sums(
        p, rest, batch, dropout_key, train=True)), has_aux=True)(params)

  def _train_step(self, state, rest, batch, run_inputs):
    # The dropout stream's key, not the parameters': nnx draws each of their initialisers from
    # that key folded with a count, which would reuse one key for a step's masks and a weight.
    step_key = jax.random.fold_in(jax.random.wrap_key_data(run_inputs["seed_keys"]["dropout"]), state["step"])
    if self.config.train.grad_accum_steps == 1:  # no scan: it would keep the step inside a loop
      grads, sums = self._grads(state["params"], rest, batch, jax.random.fold_in(step_key, 0))
    else:
      grads, sums = self._accumulated_grads(state, rest, batch, step_key)
    return self._apply_gradients(state, grads, sums, run_inputs)

  def _accumulated_grads(self, state, rest, batch, step_key):
    """Sums over micro-batches; micro-batch i draws dropout from fold_in(step_key, i)."""
    accum = self.config.train.grad_accum_steps

    def micro_batches(x):
      # Row k of every micro-batch comes from a different data shard, so each micro-batch
      # stays spread over all devices.
      x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(x, NamedSharding(
          self.mesh, PartitionSpec(None, *self.batch_sharding.spec)))

    def accumulate(carry, inputs):
      index, micro = inputs
      grads_and_sums = self._grads(state["params"], rest, micro, jax.random.fold_in(step_key, index))
      return jax.tree.map(jnp.add, carry, grads_and_sums), None

    batch = {k: micro_batches(v) for k, v in batch.items()}
    zero_grads = jax.tree.map(jnp.zeros_like, state["params"])
    zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
        lambda: self._loss_sums(state["params"], rest, {k: v[0] for k, v in batch.items()},
                                step_key, train=False)))
    (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums),
                                    (jnp.arange(accum), batch))
    return grads, sums

  def _apply_gradients(self, state, grads, sums, run_inputs):
    weight = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: (g / weight).astype(g.dtype), grads)  # bfloat16 weights keep bf16 moments
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)

    # self.tx's transformation (its state's structure) over the schedule's traced numbers.
    tx, schedule = make_optimizer(self.config.train.optimizer, run_inputs["schedule"])

    # A non-finite step keeps the old state. Chosen by a branch, not by a select per leaf: with
    # selects XLA copied every Adam moment first, as the update and the select both read it
    # (docs/performance.md, item 29).
    def update(params, opt_state):
      updates, opt_state = tx.update(grads, opt_state, params, grad_norm=grad_norm)
      return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, update, lambda *old: old, state["params"], state["opt_state"])
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    step_metrics = dict(grad_norm=grad_norm, learning_rate=schedule(updates_applied(state["opt_state"])),
                        finite=finite)
    if step_metrics.keys() & sums.keys():
      raise ConfigError(f"train.mode={self.config.train.mode!r} sums {sorted(step_metrics.keys() & sums.keys())}, "
                        f"which the train step reports itself; name them otherwise")
    return new_state, {**sums, **step_metrics}

  def _eval_step(self, params, rest, batch):
    return self._loss_sums(params, rest, batch, None, train=False)

  def _compile_steps(self) -> None:
    batch_shardings = {f: self.batch_sharding for f in self.features}
    self.train_step = jax.jit(
        self._train_step,
        in_shardings=(self.state_shardings, self.rest_shardings, batch_shardings, self.replicated),
        out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
    self.eval_step = jax.jit(
        self._eval_step, in_shardings=(self.state_shardings["params"], self.rest_shardings, batch_shardings),
        out_shardings=self.replicated)

  # Data ---------------------------------------------------------------------------

  def loader(self, split: str):
    return self.make_loader(self.config.data, split, process_index=jax.process_index(),
                            process_count=jax.process_count())

  def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> one array per feature spanning every process's devices."""
    missing = [f for f in self.features if f not in local_batch]
    if missing:
      raise ConfigError(f"the data pipeline's batches lack {missing}, which train.mode="
                        f"{self.config.train.mode!r} needs for model.arch={self.model_config.arch!r}; "
                        f"check data.objective")
    vocab = self.model_config.vocab_size
    for name in (f for f in self.features if f.endswith("_tokens")):
      ids = np.asarray(local_batch[name])
      if ids.size and (ids.min() < 0 or ids.max() >= vocab):  # an embedding or loss lookup would make NaN
        raise ConfigError(f"the batch's {name} hold ids from {ids.min()} to {ids.max()}, outside model.vocab_size="
                          f"{vocab}; a target left out of the loss takes loss weight 0, not an id like -100")
    return {f: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local_batch[f]))
            for f in self.features}

  # Loop ---------------------------------------------------------------------------

  def eval_sums(self, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """The eval step's loss sums over host-local batches, added up on the host (None if no batches)."""
    totals = None
    with jax.set_mesh(self.mesh), partitioning.activation_rules(self.config.partitioning):
      for batch in batches:
        previous = totals
        totals = add_sums(totals, self.eval_step(self.state["params"], self.rest, self.global_batch(batch)))
        # One batch queued behind the one running. With every batch queued at once (a novel's, on 8
        # simulated CPU devices), a device's part of the step waited 40 s at its all-reduce for the
        # others' and XLA aborted the process (rendezvous.cc, "Termination timeout"): the `eval`
        # test's occasional SIGABRT, every time once the adds were one program.
        jax.block_until_ready(previous)
    return jax.device_get(totals)

  def evaluate(self, num_batches: int) -> dict[str, float]:
    """Loss, token accuracy and perplexity over the first batches of the validation split."""
    return loss_means(self.eval_sums(itertools.islice(self.loader("validation"), num_batches)))

  def split_too_small(self, split: str, num_batches: int, setting: str) -> str | None:
    """A warning when num_batches go round a split more than once: batches repeat it, so the
    figures would weigh some rows twice. Counting reads as many rows as the evaluation itself
    (Loader.rows_in_one_pass); loaders other than the default one do not count."""
    count = getattr(self.loader(split), "rows_in_one_pass", None)
    wanted = num_batches * (self.config.data.batch_size // jax.process_count())
    rows = wanted if count is None else count(wanted)
    if rows >= wanted:
      return None
    return (f"{setting}={num_batches} batches take {wanted} rows of the {split} split on this process, which has "
            f"{rows}: they go round it and count some rows more than once; lower {setting}")

  def train(self) -> TrainResult:
    if self.params_only:
      raise ConfigError("this trainer holds no optimizer state (params_only, as from_workdir loads a run for "
                        "inference); train with Trainer(config, workdir), which resumes from the workdir")
    cfg = self.config.train
    # Each host reads its own data files: one missing or broken there stops every process.
    validation_warning = check_on_every_process(
        lambda: self.split_too_small("validation", cfg.eval_steps, "train.eval_steps"))
    for warning in training_warnings(self.config) + [validation_warning]:
      if warning:
        logger.warning(warning)
    claim = check_on_every_process(lambda: _claim_workdir(self.workdir))
    # Whatever opens is closed however the run ends (an error, a failed save among them).
    with contextlib.ExitStack() as cleanup:
      if claim is not None:
        cleanup.callback(claim.close)  # releases the workdir
      train_loader = check_on_every_process(lambda: self.loader("train"))
      try:
        checkpointer = Checkpointer(self.workdir / "checkpoints", max_to_keep=cfg.keep_checkpoints)
        cleanup.callback(checkpointer.close)
        saved = read_run_config(self.workdir) if (self.workdir / "config.json").exists() else None
        if saved is not None and checkpointer.steps() and (changed := changed_model_fields(saved, self.config)):
          # Before restoring: nothing is read, nor set aside, for a run that cannot go on.
          raise ConfigError(f"{self.workdir} was trained with another model ({'; '.join(changed)}); resume with "
                            f"the model its config.json holds, or train in a new workdir (train.init_from="
                            f"{str(self.workdir)!r} starts from these parameters)")
        data_positions = self.restore(checkpointer)
        if saved is not None and data_positions is not None and (
            warning := learning_rate_change(saved, self.config, int(updates_applied(self.state["opt_state"])))):
          logger.warning(warning)
        if data_positions is None and cfg.get("init_from"):  # absent from older runs' config.json
          self.init_params_from(cfg.init_from)
        elif data_positions is None and jax.tree.leaves(self.frozen_template):
          logger.warning("train.mode=%r freezes %d parameters and no train.init_from gives them: they keep their "
                         "random initialisation", cfg.mode, len(jax.tree.leaves(self.frozen_template)))
        elif data_positions:  # {}: a checkpoint from before data positions were saved
          position = this_process_position(data_positions, checkpointer.directory)
          check_on_every_process(lambda: train_loader.set_state(position))  # against this host's own data files
        start_step = int(jax.device_get(self.state["step"]))
        if start_step > cfg.steps:
          raise ConfigError(f"{checkpointer.directory} holds step {start_step}, past train.steps={cfg.steps}; "
                            f"set train.steps to {start_step} or more to go on, or start a new workdir")
        writer = MetricWriter(self.workdir)
        cleanup.callback(writer.close)

        row_flops, row_tokens = self.mode.row_cost(self.model_config, _sequence_lengths(self.config, self.model_config))
        batch_size = self.config.data.batch_size
        flops_per_step, tokens_per_step = batch_size * row_flops, batch_size * row_tokens
        peak, peak_source = peak_flops_per_device()
        logger.info("MFU relative to %s", peak_source)

        pending: list[tuple[int, dict]] = []
        config_written = False
        # (loss sum, target tokens) of the latest finite steps, the logged ones first, so a run
        # resumed at its last step reports the same train loss.
        recent = collections.deque(maxlen=cfg.log_every)
        logged = (read_metrics(self.workdir, fields=("loss", "target_tokens"))
                  if (self.workdir / "metrics.jsonl").exists() else [])
        logged_steps = sorted((row for row in logged if row["split"] == "train" and row["step"] <= start_step),
                              key=lambda row: row["step"])
        recent.extend((row["loss"] * row["target_tokens"], row["target_tokens"]) for row in logged_steps
                      if math.isfinite(row["loss"]) and not _skipped(row))
        # A run preempted amid skipped updates carries its count on, or each resume would allow
        # train.max_consecutive_skips more. Process 0's count: it alone writes the metrics.
        self.skipped_in_a_row = process_0s(len(list(itertools.takewhile(_skipped, logged_steps[::-1]))))
        if self._evaluation_missing(start_step, logged):
          writer.write(start_step, "validation", self.evaluate(cfg.eval_steps))
        progress = tqdm(total=cfg.steps, initial=start_step, desc="train", disable=jax.process_index() != 0,
                        dynamic_ncols=True)
        cleanup.callback(progress.close)
        # SIGTERM is noted, not obeyed, until the saves below have finished, the final one included.
        stop = cleanup.enter_context(StopSignal())
        # Unwound first: the saves already started hold good states, so they finish even on an error.
        cleanup.callback(checkpointer.wait)
        with jax.set_mesh(self.mesh), partitioning.activation_rules(self.config.partitioning):
          for step in range(start_step, cfg.steps):
            batch = self.global_batch(next(train_loader))
            if step == start_step:
              self._compile_train_step(batch)
              interval_start = time.perf_counter()  # neither compiling nor a resume's evaluation is training
            self.state, metrics = self.train_step(self.state, self.rest, batch, self.run_inputs)
            pending.append((step + 1, metrics))
            done = step + 1
            preempted = done < cfg.steps and stop_requested(stop, done, cfg.log_every)
            save = done % cfg.checkpoint_every == 0 or done == cfg.steps or preempted
            if done % cfg.log_every == 0 or save:
              # Checked before every save, so a non-finite step is never checkpointed. The steps
              # are dispatched asynchronously: the interval ends when they have run, not when queued.
              jax.block_until_ready(metrics)
              elapsed = time.perf_counter() - interval_start
              recent.extend(self._log(pending, writer, elapsed, tokens_per_step, flops_per_step, peak))
              progress.set_postfix(loss=f"{_mean_loss(recent):.3f}")
              pending, interval_start = [], time.perf_counter()
            progress.update(1)
            due_for_eval = done % cfg.eval_every == 0 and done != cfg.steps
            if save or due_for_eval:
              jax.block_until_ready(self.state)  # the steps already dispatched are training time
              pause_start = time.perf_counter()
              if save:
                self._check_finite_params(done)
                # config.json describes the checkpoints, so it changes with the first one made under
                # this config: a resume that fails first (a NaN, a kernel) leaves the old one in place.
                if not config_written and jax.process_index() == 0:
                  _replace_file(self.workdir / "config.json", self.config.to_json_best_effort(indent=2))
                config_written = True
                checkpointer.save(done, self.checkpointed(), train_loader.get_state())
              if preempted:
                raise Preempted(f"stopped by SIGTERM after step {done}, whose checkpoint is saved; rerun the same "
                                f"command to resume")
              if due_for_eval:
                writer.write(done, "validation", self.evaluate(cfg.eval_steps))
              # Saving and evaluating are not: the throughput interval's clock skips them.
              interval_start += time.perf_counter() - pause_start
        validation = self.evaluate(cfg.eval_steps)
        writer.write(cfg.steps, "validation", validation)
      except BaseException:
        mark_this_process_failing()  # the others are told after the saves, which need them
        raise
    return TrainResult(step=cfg.steps, train_loss=_mean_loss(recent), validation=validation)

  def _compile_train_step(self, batch: dict[str, jax.Array]) -> None:
    """Compiles the train step ahead of its first call, which then finds it compiled: the first
    logged interval's throughput would otherwise count the compile as training time."""
    start = time.perf_counter()
    self.train_step.lower(self.state, self.rest, batch, self.run_inputs).compile()
    logger.info("compiled the train step in %.1f s", time.perf_counter() - start)

  def _evaluation_missing(self, step: int, logged: list[dict]) -> bool:
    """Whether `step`, an evaluation step the run resumes from, has no validation row among the
    `logged` metrics: the run stopped between its save and its evaluation (preempted there, or
    killed). Process 0's answer counts: it writes the metrics."""
    cfg = self.config.train
    if not 0 < step < cfg.steps or step % cfg.eval_every:
      return False
    return process_0s(not any(row["split"] == "validation" and row["step"] == step for row in logged))

  def _log(self, pending, writer: MetricWriter, elapsed: float, tokens_per_step: int,
           flops_per_step: float, peak: float) -> list[tuple[float, float]]:
    """Fetches the interval's metrics, applies the non-finite policy, writes one row per step.
    Returns the finite steps' (loss sum, target tokens)."""
    rows = jax.device_get([m for _, m in pending])
    steps_per_second = len(pending) / max(elapsed, 1e-9)
    for (step, _), row in zip(pending, rows):
      scalars = loss_means({key: value for key, value in row.items() if key not in STEP_METRICS})
      scalars.update(grad_norm=float(row["grad_norm"]), learning_rate=float(row["learning_rate"]),
                     tokens_per_second=tokens_per_step * steps_per_second,
                     model_flops_per_second=flops_per_step * steps_per_second,
                     mfu=flops_per_step * steps_per_second / (peak * self.mesh.size))
      writer.write(step, "train", scalars)  # the steps up to a non-finite one too, to debug it
      self._apply_nonfinite_policy(step, row)
    return [(float(_reported_loss_sum(row)), float(row["weight"])) for row in rows if row["finite"]]

  def _apply_nonfinite_policy(self, step: int, row: dict) -> None:
    """train.nonfinite: 'stop' at a non-finite step; 'skip' it (its update was not applied) unless
    it makes train.max_consecutive_skips in a row."""
    if row["finite"]:
      self.skipped_in_a_row = 0
      return
    if self.config.train.nonfinite == "stop":
      raise NonFiniteLossError(
          f"non-finite loss or gradient at step {step} (loss sum {row['loss']}, grad norm "
          f"{row['grad_norm']}); the update was not applied and no checkpoint was written "
          f"after it. Lower train.optimizer.learning_rate, enable train.z_loss, or set "
          f"train.nonfinite='skip'")
    self.skipped_in_a_row += 1
    if self.skipped_in_a_row >= self.config.train.max_consecutive_skips:
      raise NonFiniteLossError(
          f"the last {self.skipped_in_a_row} updates, up to step {step}, were all non-finite and skipped "
          f"(train.max_consecutive_skips={self.config.train.max_consecutive_skips}): the run has diverged. "
          f"Its checkpoints hold the last finite parameters, from before step {step - self.skipped_in_a_row + 1}; "
          f"lower train.optimizer.learning_rate or enable train.z_loss, and if a resume from them diverges "
          f"again, move the newest checkpoints away to resume from an earlier one")
    logger.warning("skipped the update of step %d: non-finite loss or gradient", step)

  def _check_finite_params(self, step: int) -> None:
    """Refuses to save parameters an update made non-finite from finite gradients (a rate far
    too high): the checks on the loss and gradient would pass them, and every resume would fail."""
    bad = [jax.tree_util.keystr(path) for path, finite in jax.tree_util.tree_flatten_with_path(
        jax.device_get(_finite_leaves(self.state["params"])))[0] if not finite]
    if bad:
      raise NonFiniteLossError(f"the parameters became non-finite by step {step} ({', '.join(bad[:3])}); no "
                               f"checkpoint was written. Lower train.optimizer.learning_rate")


def _on_the_data_axis(config: ml_collections.ConfigDict, devices: list, why: Exception) -> list:
  """As many of `devices` as the batch divides over, all on the first batch axis (config's mesh
  changed to say so), for a run whose own mesh does not fit them."""
  count = max(k for k in range(1, len(devices) + 1) if config.data.batch_size % k == 0)
  logger.warning("%s; loading the run with %d of the %d devices on the data axis", why, count, len(devices))
  first = (partitioning.batch_axes(config.partitioning) or config.partitioning.mesh_axes)[0]
  config.partitioning.mesh_shape = tuple(-1 if axis == first else 1 for axis in config.partitioning.mesh_axes)
  return devices[:count]


def _replace_file(path: pathlib.Path, text: str) -> None:
  """Writes `text` beside `path` and renames it into place: a full disk or a kill mid-write leaves
  the old file whole, not a truncated one that every resume would refuse."""
  partial = path.with_name(path.name + ".partial")
  try:
    partial.write_text(text)
  except BaseException:
    partial.unlink(missing_ok=True)
    raise
  os.replace(partial, path)


RUN_CONFIG_SECTIONS = ("model", "data", "train", "partitioning")


def _claim_workdir(workdir: pathlib.Path):
  """Makes the workdir, checks it can be written, and on process 0 locks it for this run: returns
  the open lock file, whose closing releases it (as the process ending does), or None elsewhere.
  A second train in the same workdir overwrote the first one's checkpoints and config.json and
  interleaved its metrics, both ending "successfully"; a read-only checkpoints/ met orbax's
  barrier timeout 5 minutes into training."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise ConfigError(f"cannot make the workdir {workdir} ({error.strerror})") from None
  for directory in (workdir, workdir / "checkpoints"):
    if directory.is_dir() and not os.access(directory, os.W_OK):
      raise ConfigError(f"{directory} is not writable: training saves its checkpoints and metrics there")
  if jax.process_index() != 0:
    return None
  lock = open(workdir / "train.lock", "a+")
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    lock.seek(0)
    holder = lock.read().strip() or "another process"
    lock.close()
    raise ConfigError(f"{workdir} is in use by another train ({holder}); two runs in one workdir overwrite each "
                      f"other's checkpoints: wait for it, stop it, or use another --workdir") from None
  lock.truncate(0)
  lock.write(f"process {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
  lock.flush()
  return lock


def read_run_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The config a run's checkpoints were made with (its workdir's config.json), as it was written."""
  config_file = pathlib.Path(workdir) / "config.json"
  try:
    config = json.loads(config_file.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ConfigError(f"{config_file} is not valid JSON ({error}); train writes it, and nothing "
                      f"else should") from None
  # A hand edit that left JSON but not a run's config met a KeyError or AttributeError later.
  missing = [section for section in RUN_CONFIG_SECTIONS if not isinstance(config, dict) or
             not isinstance(config.get(section), dict)]
  if missing:
    raise ConfigError(f"{config_file} is not the config train writes: no {', '.join(missing)} section (an object); "
                      f"restore it, or remove it and resume with the --config the run was trained with (train "
                      f"writes it again with its next checkpoint)")
  return ml_collections.ConfigDict(config)


def _path_of(keys) -> tuple:
  """A leaf's path in a State tree of the model, as plain keys ('decoder', 'layers', 0, ...)."""
  return tuple(key.key for key in keys)


def _leaves_by_path(tree) -> dict[tuple, jax.Array]:
  return {_path_of(keys): leaf for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _replace_leaves(tree, leaves: dict[tuple, jax.Array]):
  """The tree with each leaf that `leaves` holds at its path replaced."""
  return jax.tree_util.tree_map_with_path(lambda keys, leaf: leaves.get(_path_of(keys), leaf), tree)


@jax.jit
def _finite_leaves(tree):
  return jax.tree.map(lambda x: jnp.isfinite(x).all(), tree)


def _mean_loss(recent: Iterable[tuple[float, float]]) -> float:
  """Per-token loss over (loss sum, tokens) pairs; NaN before any finite step."""
  total, tokens = map(sum, zip(*recent)) if recent else (0.0, 0.0)
  return total / tokens if tokens else float("nan")


def _scalar_and_aux(sums):
  return sums["loss"], sums


@jax.jit
def _added(totals, sums):
  return jax.tree.map(jnp.add, totals, sums)


def add_sums(totals, sums):
  """A running total of per-batch loss sums, kept on the device; None starts it. One dispatch a
  batch, where an add per sum made several (and compiled each for every trainer's mesh)."""
  return sums if totals is None else _added(totals, sums)


# What the train step reports beside the mode's loss sums.
STEP_METRICS = ("grad_norm", "learning_rate", "finite")


def loss_means(sums) -> dict[str, float]:
  """Per-token loss, and accuracy, perplexity and z-loss where the mode sums their terms.

  "loss" is the cross-entropy alone where there is one, so runs with and without z-loss
  compare; the z-loss the optimiser adds to it is reported beside it. A mode whose loss is not
  a cross-entropy (a reward model's, say) sums only `loss` and `weight`; any other sum it
  returns (a preference accuracy, a reward margin) is reported per weight under its own name.
  """
  weight = float(sums["weight"]) or float("nan")  # no scored token: no loss, not a perfect one
  loss = float(_reported_loss_sum(sums)) / weight
  means = {"loss": loss, "target_tokens": float(sums["weight"])}
  if "cross_entropy" in sums:
    means["perplexity"] = math.exp(min(loss, 700.0))
  for key, name in (("correct", "accuracy"), ("z_loss", "z_loss")):
    if key in sums:
      means[name] = float(sums[key]) / weight
  for key in sorted(sums.keys() - {"loss", "weight", "cross_entropy", "correct", "z_loss"}):
    means[key] = float(sums[key]) / weight
  return means


def _skipped(row: dict) -> bool:
  """Whether a logged train row's update was skipped as non-finite: its gradient norm says so (a
  skipped step can log a finite loss), or its loss where tokens were scored (a step that scored
  none logs a NaN loss, yet applied its zero update)."""
  return not math.isfinite(row.get("grad_norm", 0.0)) or (not math.isfinite(row["loss"]) and row["target_tokens"] > 0)


def _reported_loss_sum(sums):
  """The cross-entropy alone (z-loss left out) where the mode sums one, else its loss."""
  return sums["cross_entropy"] if "cross_entropy" in sums else sums["loss"]
