"""The device mesh and the logical-to-mesh axis rules: the only place that knows both.

Models name their axes (`embed`, `mlp`, `heads`, ...); a rule list maps each name to a
mesh axis (or None: replicated). As in T5X and flax, rules are applied in list order, to
parameters and activations alike: a rule is skipped for an array whose other dim already took
its mesh axes (whichever dim comes first), and a dim no rule is left for is replicated. Defaults follow T5X/MaxText: the
batch is split over `data` and `fsdp`, weights are sharded along `embed` over `fsdp`
(ZeRO-3 style) and along heads/mlp/vocab over `tensor` (Megatron style).
"""

from __future__ import annotations

import math

import flax.linen
import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES = (
    # Activations.
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_vocab", "tensor"),
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("norm", None),
    ("relpos_buckets", None),
)


def default_partitioning_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # One entry per mesh axis; -1 takes the devices the others leave.
      mesh_shape=(-1, 1, 1),
      mesh_axes=MESH_AXES,
      rules=DEFAULT_RULES,
  ))


def resolve_mesh_shape(mesh_shape, num_devices: int) -> tuple[int, ...]:
  """Fills in the one -1 and checks the product equals the device count."""
  shape = list(mesh_shape)
  if not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
    raise ConfigError(f"partitioning.mesh_shape={tuple(mesh_shape)} must hold integers (-1: the rest)")
  if shape.count(-1) > 1:
    raise ConfigError(f"partitioning.mesh_shape={tuple(mesh_shape)} may contain at most one -1")
  if any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f"partitioning.mesh_shape={tuple(mesh_shape)} has a size that is not positive")
  known = math.prod(s for s in shape if s != -1)
  if -1 not in shape and known != num_devices:
    raise ConfigError(f"partitioning.mesh_shape={tuple(mesh_shape)} uses {known} devices but "
                      f"{num_devices} are available; use -1 for one axis to take the rest")
  if num_devices % known:
    raise ConfigError(f"partitioning.mesh_shape={tuple(mesh_shape)} does not divide the "
                      f"{num_devices} available devices")
  shape = [num_devices // known if s == -1 else s for s in shape]
  return tuple(shape)


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  if len(config.mesh_shape) != len(config.mesh_axes):
    raise ConfigError(f"partitioning.mesh_shape={tuple(config.mesh_shape)} and "
                      f"partitioning.mesh_axes={tuple(config.mesh_axes)} differ in length")
  shape = resolve_mesh_shape(config.mesh_shape, len(devices))
  # Every rule, activations' too: an activation rule naming a missing axis would fail only when traced.
  for name, axes in _rules(config):
    for axis in axes if isinstance(axes, tuple) else (axes,):
      if axis is not None and axis not in config.mesh_axes:
        raise ConfigError(f"partitioning.rules map {name!r} to mesh axis {axis!r}, which is not in "
                          f"partitioning.mesh_axes={tuple(config.mesh_axes)}")
  # Auto axes: XLA propagates shardings from the annotated inputs and outputs.
  return Mesh(np.asarray(devices).reshape(shape), tuple(config.mesh_axes),
              axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _rules(config) -> tuple:
  """(logical axis, mesh axis or axes or None) pairs; JSON gives lists where files give tuples."""
  malformed = [rule for rule in config.rules if not isinstance(rule, (tuple, list)) or len(rule) != 2]
  if malformed:
    raise ConfigError(f"partitioning.rules holds {malformed[0]!r}; each rule is a pair "
                      f"(logical axis, mesh axis or axes or None)")
  rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.rules)
  for name, axes in rules:
    if isinstance(axes, tuple) and len(set(axes)) < len(axes):  # jax's DuplicateSpecError at the first sharding
      raise ConfigError(f"partitioning.rules map {name!r} to {axes}, which names a mesh axis twice")
  return rules


# The config field behind each logical parameter axis, for naming a dim that does not divide.
LOGICAL_AXIS_FIELDS = {"vocab": "model.vocab_size", "embed": "model.emb_dim", "norm": "model.emb_dim",
                       "mlp": "model.mlp_dim", "heads": "model.num_heads", "kv_heads": "model.num_kv_heads",
                       "kv": "the head dim", "relpos_buckets": "model.relative_num_buckets"}


class UnevenShardingError(ConfigError):
  """A parameter dim that its mesh axes do not split evenly: a mesh problem, not the model's."""


def logical_shardings(state: nnx.State, mesh: Mesh, config: ml_collections.ConfigDict):
  """NamedShardings for every Variable in `state` (abstract or concrete), by the rules.

  jax refuses a dim that does not split evenly over its mesh axes; such dims are collected
  and named together, by config field, whatever the rules map where.
  """
  rules = _rules(config)
  known = {name for name, _ in rules}
  uneven = set()

  def sharding(variable):
    names = variable.get_metadata().get("out_sharding") or ()
    for name in names:
      if name is not None and name not in known:
        raise ConfigError(f"logical axis {name!r} has no rule in partitioning.rules; add "
                          f"('{name}', None) to replicate it or name a mesh axis")
    spec = PartitionSpec(*flax.linen.logical_to_mesh_axes(names, rules))
    for name, size, axes in zip(names, variable.get_value().shape, spec):
      axes = axes if isinstance(axes, tuple) else (axes,)
      shards = math.prod(mesh.shape[axis] for axis in axes if axis is not None)
      if size % shards:
        field = LOGICAL_AXIS_FIELDS.get(name, f"the {name!r} dim")
        named = [axis for axis in axes if axis]
        uneven.add(f"{field}={size} does not divide over the {' x '.join(named)} mesh "
                   f"{'axes' if len(named) > 1 else 'axis'} of size {shards} (logical axis {name!r}, by "
                   f"partitioning.rules)")
    return NamedSharding(mesh, spec)

  shardings = jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  if uneven:
    raise UnevenShardingError("; ".join(sorted(uneven)))
  return shardings


def batch_axes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The mesh axes the batch is split over: those of the activation_batch rule."""
  (axes,) = flax.linen.logical_to_mesh_axes(("activation_batch",), _rules(config))
  return tuple(axes) if isinstance(axes, tuple) else (axes,) if axes else ()


def data_shards(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """How many ways the batch is split on num_devices: the size of the batch axes together."""
  shape = dict(zip(config.mesh_axes, resolve_mesh_shape(config.mesh_shape, num_devices)))
  return math.prod(shape.get(axis, 1) for axis in batch_axes(config))


def batch_sharding(mesh: Mesh, config: ml_collections.ConfigDict) -> NamedSharding:
  """Batch dimension split over the activation_batch rule's axes, the rest replicated.

  Each process loads rows of its own (Trainer.global_batch), so no two processes may hold the
  same part of the batch: where a model axis spans processes, jax would take each process's
  different rows as copies of one another and train on neither whole.
  """
  sharding = NamedSharding(mesh, PartitionSpec(batch_axes(config)))
  shards = math.prod(mesh.shape[axis] for axis in batch_axes(config))
  holders = {}  # each part of the batch -> the processes whose devices hold it
  for device, index in sharding.devices_indices_map((shards,)).items():
    holders.setdefault(index[0].indices(shards)[0], set()).add(device.process_index)
  shared = next((sorted(processes) for processes in holders.values() if len(processes) > 1), None)
  if shared:
    raise ConfigError(f"partitioning.mesh_shape={tuple(config.mesh_shape)} puts the same rows of the batch on "
                      f"processes {shared}: each process loads rows of its own, so the batch axes "
                      f"{batch_axes(config)} ({shards} shards here) must split over the {jax.process_count()} "
                      f"processes; keep the other axes within one host's devices")
  return sharding


def activation_rules(config: ml_collections.ConfigDict):
  """Context for tracing: logical activation constraints resolve through these rules."""
  return nnx.logical_axis_rules(_rules(config))
