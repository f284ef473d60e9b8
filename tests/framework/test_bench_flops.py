"""The peers in bench/ are credited with model FLOPs by the same count as our trainer.

bench/peers/protocol.py recomputes PaLM's count from a peer's shape with the standard
library only (it runs under each peer's own Python); it must agree with
models.model_size, whose count the model tests check against the compiled gradient.
bench/matmul_floor.py must hold exactly the matmuls that count credits.
"""

import importlib.util
import pathlib

import pytest

from models.config import ModelConfig
from models.model_size import train_flops_per_sequence

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_protocol():
  return load(ROOT / "bench" / "peers" / "protocol.py")


@pytest.mark.parametrize("options, gated", [
    (dict(mlp_activation="gelu_tanh", norm="layernorm", position="learned", use_bias=True), False),  # GPT-2
    (dict(mlp_activation="silu", mlp_gated=True, tie_embeddings=False), True),  # LLaMA
])
@pytest.mark.parametrize("shape", [
    dict(emb_dim=256, num_layers=4, num_heads=4, mlp_dim=1024, seq=256, batch=8),
    dict(emb_dim=1024, num_layers=8, num_heads=16, mlp_dim=4096, seq=512, batch=4),
])
def test_peer_flops_match_our_count(options, gated, shape):
  shape = dict(shape)
  seq, batch = shape.pop("seq"), shape.pop("batch")
  cfg = ModelConfig(arch="decoder", vocab_size=8192, max_len=seq, **shape, **options)
  peer = load_protocol().train_flops_per_step(
      emb_dim=cfg.emb_dim, layers=cfg.num_layers, heads=cfg.num_heads, head_dim=cfg.dim_per_head,
      mlp_dim=cfg.mlp_dim, seq=seq, batch=batch, vocab=cfg.vocab_size, gated=gated)
  assert peer == batch * train_flops_per_sequence(cfg, seq)


@pytest.mark.parametrize("bf16_inputs", [False, True])
def test_matmul_floor_holds_exactly_the_counted_matmuls(bf16_inputs):
  import sys

  import jax
  from jax._src.interpreters import partial_eval as pe

  dot_flops = load(ROOT / "tests" / "models" / "test_model_size.py").dot_flops
  sys.path.insert(0, str(ROOT / "bench"))  # matmul_floor imports its sibling train_throughput
  step_matmuls = load(ROOT / "bench" / "matmul_floor.py").step_matmuls

  shape = dict(emb_dim=32, num_layers=2, num_heads=4, mlp_dim=64, seq_len=16, batch_size=3)
  grad, params, x, flops = step_matmuls(shape, bf16_inputs)
  # Counted after dead-code elimination, as XLA runs it: a product nothing reads is not run.
  jaxpr = jax.make_jaxpr(grad)(params, x).jaxpr
  assert dot_flops(pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))[0]) == flops


def test_gpu_target_shape_is_a_1b_decoder():
  """The issue's GPU target is MFU on a ~1B decoder: count its matmul weights by hand."""
  from models.model_size import model_size

  bench = load(ROOT / "bench" / "train_throughput.py")
  shape = dict(bench.SHAPES["1b"])
  seq = shape.pop("seq_len")
  shape.pop("batch_size")
  cfg = ModelConfig(arch="decoder", vocab_size=bench.VOCAB, max_len=seq, **shape)
  d, f, layers = cfg.emb_dim, cfg.mlp_dim, cfg.num_layers
  by_hand = layers * (4 * d * d + 2 * d * f) + bench.VOCAB * d  # q, k, v, out; wi, wo; tied table
  assert model_size(cfg).matmul_params == by_hand
  assert 0.95e9 < by_hand < 1.05e9
