"""Our training step on one decoder shape: step time, tokens/s and model FLOP/s, as one JSON line.

    python bench/train_throughput.py --shape tiny [--dtype float32] [--steps 9]

`bench/run.py` calls this in a fresh process per measurement, so every runner (ours, an
older revision of ours, the peers) starts from the same state. With T5X_LIKE_CODE_ROOT
set, models/ and t5x_like/ are imported from that tree instead: that is how run.py
measures a baseline revision with the same script.

Model FLOPs by PaLM's count (app. B): 6 x matmul parameters including the vocabulary
projection, plus 12 x layers x context x attention width, per token; recomputation
is not counted. On a GPU or TPU, `mfu` divides them by the data sheet's dense bf16 peak
(t5x_like.hardware), as the trainer's logged mfu does. The issue's MFU divides by the bf16
matmul peak measured in the same run instead: bench/gpu.sh measures it, then runs

    python bench/train_throughput.py --shape 1b --dtype bfloat16 --steps 10

On a CPU there is no data sheet figure: bench/run.py divides by the highest peak that
bench/matmul_peak.py measures before each of its rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("T5X_LIKE_CODE_ROOT", str(ROOT)))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from models.config import model_config_dict  # noqa: E402
from models.model_size import train_flops_per_sequence  # noqa: E402
from t5x_like.hardware import peak_flops_per_device  # noqa: E402
from t5x_like.partitioning import default_partitioning_config  # noqa: E402
from t5x_like.trainer import Trainer, default_train_config  # noqa: E402

# The shapes of the performance issue: tiny up to the largest a CPU run does in minutes.
SHAPES = {
    "tiny": dict(emb_dim=256, num_layers=4, num_heads=4, mlp_dim=1024, seq_len=256, batch_size=8),
    "medium": dict(emb_dim=512, num_layers=8, num_heads=8, mlp_dim=2048, seq_len=512, batch_size=8),
    "large": dict(emb_dim=1024, num_layers=8, num_heads=16, mlp_dim=4096, seq_len=512, batch_size=4),
    # The GPU target's ~1B decoder (1.02B matmul parameters); for accelerators, not CPU runs.
    "1b": dict(emb_dim=2048, num_layers=20, num_heads=16, mlp_dim=8192, seq_len=2048, batch_size=8),
}
VOCAB = 8192
# Steps run untimed after the compiling one, by every runner bench/run.py times (peers.py passes
# it on): a jax process's first steps after compilation run up to 3x slower than later ones,
# and with few timed steps they moved a peer's median 2x between processes (performance.md item 28).
WARMUP_STEPS = 2
# Our default decoder, GPT-2's block (what the Hugging Face peer runs) and the LLaMA block
# MaxText and EasyDeL run, so each peer can be compared with the same architecture.
ARCHS = {
    "default": ("RoPE, RMSNorm, GELU, tied", {}),
    "gpt2": ("gpt2: LayerNorm, learned positions, GELU (tanh), biases, tied",
             dict(norm="layernorm", position="learned", mlp_activation="gelu_tanh", use_bias=True)),
    "llama": ("llama: RoPE, RMSNorm, SwiGLU, untied", dict(mlp_activation="silu", mlp_gated=True,
                                                          tie_embeddings=False)),
}


class RandomTokens:
  """Random batches with the loader interface; throughput does not depend on the text."""

  def __init__(self, data_config, split, *, process_index, process_count):
    self.config = data_config
    self.rng = np.random.default_rng(process_index)

  def __next__(self):
    b, t = self.config.batch_size, self.config.seq_len
    tokens = self.rng.integers(3, VOCAB, size=(b, t + 1), dtype=np.int32)
    return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
            "decoder_loss_weights": np.ones((b, t), np.float32),
            "decoder_segment_ids": np.ones((b, t), np.int32),
            "decoder_positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))}

  def get_state(self):
    return {}

  def set_state(self, state):
    pass


def build(shape_name: str, dtype: str, arch: str = "default", init_on_host: bool = False,
          **model_overrides) -> tuple[Trainer, dict]:
  """A one-device trainer for the shape and one batch for it.

  model_overrides set only what is given (not None): baseline trees lack newer fields.
  """
  shape = dict(SHAPES[shape_name], **ARCHS[arch][1])
  shape.update({name: value for name, value in model_overrides.items() if value is not None})
  seq_len, batch_size = shape.pop("seq_len"), shape.pop("batch_size")
  config = ml_collections.ConfigDict()
  config.model = model_config_dict(arch="decoder", vocab_size=VOCAB, max_len=seq_len, dtype=dtype, **shape)
  config.data = ml_collections.ConfigDict(dict(seq_len=seq_len, batch_size=batch_size))
  config.train = default_train_config()
  if init_on_host:
    config.train.init_on_host = True
  config.partitioning = default_partitioning_config()
  config.partitioning.mesh_shape = (1, 1, 1)
  with tempfile.TemporaryDirectory() as workdir:  # nothing is written before train()
    trainer = Trainer(config, workdir, make_loader=RandomTokens, devices=jax.devices()[:1])
  loader = RandomTokens(config.data, "train", process_index=0, process_count=1)
  return trainer, trainer.global_batch(next(loader))


def step_arguments(trainer: Trainer, batch: dict) -> tuple:
  """What the trainer's train_step takes after the state: a baseline tree older than 847443d
  compiled its schedule in, so its step takes no run_inputs."""
  run_inputs = getattr(trainer, "run_inputs", None)
  return (trainer.rest, batch) if run_inputs is None else (trainer.rest, batch, run_inputs)


def measure(shape_name: str, dtype: str, steps: int, arch: str = "default", warmup: int = WARMUP_STEPS,
            init_on_host: bool = False, **model_overrides) -> dict:
  """Median step time over `steps` steps after compilation and `warmup` untimed steps, on one device.

  The fastest step is reported too: on a VM with noisy neighbours it moves less than the
  median, so A/B runs of small changes read it.
  """
  start = time.perf_counter()
  trainer, batch = build(shape_name, dtype, arch, init_on_host, **model_overrides)
  init_seconds = time.perf_counter() - start
  state, arguments, times = trainer.state, step_arguments(trainer, batch), []
  with jax.set_mesh(trainer.mesh):
    for step in range(1 + warmup + steps):  # the first call compiles
      start = time.perf_counter()
      state, metrics = trainer.train_step(state, *arguments)
      jax.block_until_ready(metrics)
      if step == 0:
        first_step_seconds = time.perf_counter() - start
      if step > warmup:
        times.append(time.perf_counter() - start)
  step_seconds = statistics.median(times)
  seq_len, batch_size = SHAPES[shape_name]["seq_len"], SHAPES[shape_name]["batch_size"]
  flops_per_step = batch_size * train_flops_per_sequence(trainer.model_config, seq_len)
  if model_overrides.get("bf16_matmul_inputs"):
    dtype += ", bf16 matmul inputs"
  return {"dtype": dtype, "arch": ARCHS[arch][0], "step_seconds": step_seconds, "fastest_step_seconds": min(times),
          "tokens_per_second": batch_size * seq_len / step_seconds, "flops_per_step": flops_per_step,
          "model_flops_per_second": flops_per_step / step_seconds,
          "init_seconds": init_seconds, "first_step_seconds": first_step_seconds}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--steps", type=int, default=9)
  parser.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="untimed steps after the compiling one")
  parser.add_argument("--arch", default="default", choices=sorted(ARCHS))
  parser.add_argument("--attention-kernel", choices=("xla", "blocked", "cudnn"), default=None)
  parser.add_argument("--loss-kernel", choices=("xla", "chunked"), default=None)
  parser.add_argument("--bf16-matmul-inputs", action="store_true", default=None)
  parser.add_argument("--remat", choices=("none", "dots", "full"), default=None)
  parser.add_argument("--init-on-host", action="store_true", help="initialise on the host CPU (train.init_on_host)")
  args = parser.parse_args()
  options = dict(attention_kernel=args.attention_kernel, loss_kernel=args.loss_kernel, remat=args.remat)
  result = measure(args.shape, args.dtype, args.steps, args.arch, args.warmup, args.init_on_host,
                   bf16_matmul_inputs=args.bf16_matmul_inputs, **options)
  result.update({name: value for name, value in options.items() if value is not None})
  if args.init_on_host:
    result["init_on_host"] = True
  # bench/run.py sets it as the `t5x-like` command does (t5x_like/host_memory.py); a run by hand
  # without it times glibc's page faults too.
  result["huge_pages"] = "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "")
  if jax.default_backend() != "cpu":  # a CPU's peak would be a second matmul measurement per runner
    peak, result["peak"] = peak_flops_per_device()
    result["mfu"] = result["model_flops_per_second"] / peak
  print(json.dumps(result))


if __name__ == "__main__":
  main()
