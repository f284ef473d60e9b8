"""What every family shares: HF tensors tied to our parameters, activations, errors.

A family lists its checkpoint as `Tensor`s in the order of the HF state dict: each
names one HF entry, the parameter(s) of ours it holds, and the two (exact, lossless)
layout changes between them. Import and export walk the same list, so one mapping
serves both directions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import Dense, Norm


class UnsupportedCheckpoint(ValueError):
  """A Hugging Face model or option our ModelConfig does not represent; says which."""


# HF's ACT2FN names with an exact counterpart in models.layers.activation.
ACTIVATIONS = {
    "gelu": "gelu",  # exact erf GELU
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def activation(hf_config, field: str) -> str:
  """Our mlp_activation for the HF activation named by `hf_config.<field>`."""
  name = getattr(hf_config, field)
  if name not in ACTIVATIONS:
    raise UnsupportedCheckpoint(
        f"{hf_config.model_type} config {field}={name!r} has no exact counterpart in "
        f"models.layers.activation; supported: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def require(hf_config, field: str, supported, why: str) -> None:
  """Rejects an HF option whose value our model cannot reproduce."""
  value = getattr(hf_config, field, supported)
  if value != supported:
    raise UnsupportedCheckpoint(
        f"{hf_config.model_type} config {field}={value!r} is not supported ({why}); "
        f"only {field}={supported!r} converts exactly")


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One HF state-dict entry and the parameter(s) of ours that hold its values."""

  name: str
  params: tuple[nnx.Param, ...]
  to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]


def copy(name: str, param: nnx.Param) -> Tensor:
  """Same values, same shape: embedding tables, norm scales, T5's relative bias table."""
  return Tensor(name, (param,), lambda w: (w,), lambda p: p)


def linear(prefix: str, dense: Dense) -> list[Tensor]:
  """torch.nn.Linear: weight [out, in] <-> our kernel [in..., out...], e.g. [d, h, e]."""
  shape = dense.kernel.shape
  fan_in = math.prod(shape[:dense.num_in])
  weight = Tensor(f"{prefix}.weight", (dense.kernel,), lambda w: (w.T.reshape(shape),),
                  lambda k: k.reshape(fan_in, -1).T)
  return [weight] + _bias(prefix, dense)


def conv1d(prefix: str, dense: Dense) -> list[Tensor]:
  """GPT-2's Conv1D, a Linear stored transposed: weight [in, out] <-> kernel [in..., out...]."""
  shape = dense.kernel.shape
  fan_in = math.prod(shape[:dense.num_in])
  weight = Tensor(f"{prefix}.weight", (dense.kernel,), lambda w: (w.reshape(shape),),
                  lambda k: k.reshape(fan_in, -1))
  return [weight] + _bias(prefix, dense)


def _bias(prefix: str, dense: Dense) -> list[Tensor]:
  """bias [out] <-> ours [out...], e.g. [h, e]."""
  if dense.bias is None:
    return []
  shape = dense.bias.shape
  return [Tensor(f"{prefix}.bias", (dense.bias,), lambda b: (b.reshape(shape),), lambda b: b.reshape(-1))]


def norm(prefix: str, layer: Norm) -> list[Tensor]:
  """LayerNorm weight/bias or RMSNorm weight <-> our scale/bias."""
  tensors = [copy(f"{prefix}.weight", layer.scale)]
  if layer.bias is not None:
    tensors.append(copy(f"{prefix}.bias", layer.bias))
  return tensors


def hf_state_dict(hf_model) -> dict[str, np.ndarray]:
  """The model's state dict as float32 numpy arrays (no torch import needed)."""
  return {name: value.detach().cpu().float().numpy() for name, value in hf_model.state_dict().items()}


def load(model: nnx.Module, tensors: list[Tensor], state: dict[str, np.ndarray]) -> None:
  """Writes the HF state into our parameters; every entry and every parameter must be used."""
  names = {t.name for t in tensors}
  missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
  if missing or unexpected:
    raise UnsupportedCheckpoint(
        f"the Hugging Face state dict does not match {type(model).__name__}: "
        f"missing {missing}, unexpected {unexpected}")
  loaded = set()
  for tensor in tensors:
    # Checked in HF's layout, before to_ours reshapes: a reshape would pass a same-sized
    # tensor of another layout (other heads) and fail on another size without a name.
    expected = tensor.to_hf(*(np.empty(param.shape, np.float32) for param in tensor.params)).shape
    if state[tensor.name].shape != expected:
      raise UnsupportedCheckpoint(f"{tensor.name} has shape {state[tensor.name].shape}; our parameters "
                                  f"{[param.shape for param in tensor.params]} hold shape {expected}")
    for param, value in zip(tensor.params, tensor.to_ours(state[tensor.name]), strict=True):
      param[...] = jnp.asarray(value, param.dtype)
      loaded.add(id(param))
  unloaded = ["/".join(map(str, path)) for path, node in nnx.iter_graph(model)
              if isinstance(node, nnx.Param) and id(node) not in loaded]
  if unloaded:
    raise UnsupportedCheckpoint(f"our parameters {unloaded} have no Hugging Face counterpart")


def export(tensors: list[Tensor]) -> dict[str, np.ndarray]:
  """Our parameters under HF names and shapes, in the HF state dict's order. bfloat16 ones in
  float32, which torch.from_numpy reads (numpy has no bfloat16 of its own)."""
  def host(p):
    return np.array(p[...], np.float32 if p[...].dtype == jnp.bfloat16 else None)
  return {t.name: t.to_hf(*(host(p) for p in t.params)) for t in tensors}


def output_head(name: str, model: nnx.Module) -> list[Tensor]:
  """The vocabulary projection: the token table itself when tied, else our lm_head."""
  if model.lm_head is None:
    return [copy(f"{name}.weight", model.token_embed.embedding)]
  return linear(name, model.lm_head)
