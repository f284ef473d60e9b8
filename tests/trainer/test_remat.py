"""model.remat: the same gradients as keeping everything, with fewer saved residuals.

The reference is the model without remat, through the trainer's own loss (dropout on),
and the saved residuals are what jax.ad_checkpoint.print_saved_residuals lists for the
backward pass: the platform-independent measure of what remat keeps. (XLA:CPU's buffer
sizes do not shrink with remat here; GPU and TPU schedulers act on it.)
"""

import contextlib
import functools
import io
import re
import tempfile

import jax
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from models.config import ConfigError, ModelConfig
from t5x_like.trainer import Trainer
from fake_data import PatternLoader
from trainer_configs import tiny_config

BYTES = {"f32": 4, "i32": 4, "u32": 4, "bf16": 2, "bool": 1}


@functools.cache  # one trainer per (remat, arch), shared by the residual and gradient tests
def loss_of(remat, arch="decoder"):
  config = tiny_config(arch)
  config.model.remat = remat
  with tempfile.TemporaryDirectory() as workdir:
    trainer = Trainer(config, workdir, make_loader=PatternLoader, devices=jax.devices()[:1])
  batch = trainer.global_batch(next(PatternLoader(config.data, "train", process_index=0, process_count=1)))
  loss = lambda params: trainer._loss_sums(params, trainer.rest, batch, jax.random.key(3), train=True)
  return trainer, loss


def saved_residuals(remat) -> list[str]:
  """The backward pass's residuals, one line each, parameters left out."""
  trainer, loss = loss_of(remat)
  text = io.StringIO()
  with jax.set_mesh(trainer.mesh), contextlib.redirect_stdout(text):
    print_saved_residuals(loss, trainer.state["params"])
  return [line for line in text.getvalue().splitlines() if "from the argument" not in line]


def total_bytes(lines):
  total = 0
  for line in lines:
    found = re.match(r"(\w+)\[([\d,]*)\]", line)
    if found and found[1] in BYTES:
      total += BYTES[found[1]] * int(np.prod([int(n) for n in found[2].split(",") if n]))
  return total


@pytest.fixture(scope="module")
def residuals():
  return {remat: saved_residuals(remat) for remat in ("none", "dots", "full")}


def test_full_remat_keeps_only_each_blocks_input(residuals):
  layers = tiny_config().model.num_layers
  inside_blocks = [line for line in residuals["full"] if "_matmul" in line or "Attention" in line]
  assert inside_blocks == []
  assert sum("Block._residual" in line for line in residuals["full"]) == layers


def test_dots_keeps_projections_and_recomputes_the_rest(residuals):
  exponentials = lambda lines: [line for line in lines if " output of exp " in line]  # softmax, GELU
  assert exponentials(residuals["none"]) and not exponentials(residuals["dots"])
  assert any("_matmul" in line for line in residuals["dots"])
  assert total_bytes(residuals["full"]) < total_bytes(residuals["dots"]) < total_bytes(residuals["none"])


@pytest.mark.parametrize("arch", ["decoder", "encoder_decoder"])  # the latter: cross-attention
def test_gradients_match_no_remat_with_dropout_on(arch):
  assert tiny_config().model.dropout_rate > 0
  grads = {}
  for remat in ("none", "full", "dots"):
    trainer, loss = loss_of(remat, arch)
    with jax.set_mesh(trainer.mesh):
      grads[remat] = jax.jit(jax.grad(lambda p: loss(p)["loss"]))(trainer.state["params"])
  for remat in ("full", "dots"):
    for got, expected in zip(jax.tree.leaves(grads[remat]), jax.tree.leaves(grads["none"])):
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_unknown_policy_is_refused():
  with pytest.raises(ConfigError, match="model.remat='some' is not one of"):
    ModelConfig(remat="some").validate()
