"""Training throughput against the machine's measured matmul peak, written to docs/benchmarks.md.

    python bench/train_throughput.py [--shapes tiny,medium,large] [--steps 10] [--dtype float32]

For each decoder shape: median step time over --steps timed steps (after compilation),
tokens/s, model FLOP/s by PaLM's count (6 x matmul parameters including the vocabulary
projection, plus 12 x layers x context x attention width; recomputation not counted), and
MFU against the f32 matmul peak measured in the same run (and against bf16-input,
f32-accumulate matmuls when --dtype bfloat16).
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.config import ModelConfig, model_config_dict  # noqa: E402
from models.model_size import train_flops_per_sequence  # noqa: E402
from t5x_like.hardware import measured_matmul_flops  # noqa: E402
from t5x_like.partitioning import default_partitioning_config  # noqa: E402
from t5x_like.trainer import Trainer, default_train_config  # noqa: E402

SHAPES = {
    "tiny": dict(emb_dim=256, num_layers=4, num_heads=4, mlp_dim=1024, seq_len=256, batch_size=8),
    "medium": dict(emb_dim=512, num_layers=8, num_heads=8, mlp_dim=2048, seq_len=512, batch_size=8),
    "large": dict(emb_dim=1024, num_layers=8, num_heads=16, mlp_dim=4096, seq_len=512, batch_size=4),
}


class RandomTokens:
  """Random batches with the loader interface; throughput does not depend on the text."""

  def __init__(self, data_config, split, *, process_index, process_count):
    self.config = data_config
    self.rng = np.random.default_rng(process_index)

  def __next__(self):
    b, t = self.config.batch_size, self.config.seq_len
    tokens = self.rng.integers(3, 8192, size=(b, t + 1), dtype=np.int32)
    return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
            "decoder_loss_weights": np.ones((b, t), np.float32),
            "decoder_segment_ids": np.ones((b, t), np.int32),
            "decoder_positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))}

  def get_state(self):
    return {}

  def set_state(self, state):
    pass


def measure_shape(name: str, dtype: str, steps: int, workdir: pathlib.Path) -> dict:
  shape = dict(SHAPES[name])
  seq_len, batch_size = shape.pop("seq_len"), shape.pop("batch_size")
  config = ml_collections.ConfigDict()
  config.model = model_config_dict(arch="decoder", vocab_size=8192, max_len=seq_len, dtype=dtype, **shape)
  config.data = ml_collections.ConfigDict(dict(seq_len=seq_len, batch_size=batch_size))
  config.train = default_train_config()
  config.partitioning = default_partitioning_config()
  config.partitioning.mesh_shape = (1, 1, 1)
  trainer = Trainer(config, workdir / name, make_loader=RandomTokens, devices=jax.devices()[:1])
  loader = RandomTokens(config.data, "train", process_index=0, process_count=1)
  batch = trainer.global_batch(next(loader))
  with jax.set_mesh(trainer.mesh):
    state, metrics = trainer.train_step(trainer.state, trainer.rest, batch)  # compile
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = trainer.train_step(state, trainer.rest, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
  step_time = statistics.median(times)
  flops = batch_size * train_flops_per_sequence(ModelConfig.from_dict(config.model), seq_len)
  return {"shape": name, "dtype": dtype, "step_seconds": step_time,
          "tokens_per_second": batch_size * seq_len / step_time, "model_flops_per_second": flops / step_time,
          **SHAPES[name]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", default="tiny,medium,large")
  parser.add_argument("--steps", type=int, default=9)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
  parser.add_argument("--workdir", default="/tmp/t5x_like_bench")
  args = parser.parse_args()

  peak_f32 = measured_matmul_flops(2048, repeats=9, dtype=jnp.float32)
  peak_bf16 = measured_matmul_flops(2048, repeats=9, dtype=jnp.bfloat16)
  print(f"matmul peak: f32 {peak_f32 / 1e9:.0f} GFLOP/s, bf16 inputs + f32 accumulation "
        f"{peak_bf16 / 1e9:.0f} GFLOP/s")
  rows = []
  for name in args.shapes.split(","):
    row = measure_shape(name, args.dtype, args.steps, pathlib.Path(args.workdir))
    peak = peak_bf16 if args.dtype == "bfloat16" else peak_f32
    row["mfu"] = row["model_flops_per_second"] / peak
    rows.append(row)
    print(f"{name}: {row['step_seconds'] * 1e3:.0f} ms/step, {row['tokens_per_second']:.0f} tokens/s, "
          f"{row['model_flops_per_second'] / 1e9:.0f} GFLOP/s, MFU {row['mfu']:.1%}")

  device = jax.devices()[0]
  lines = [
      "# Training throughput",
      "",
      f"Measured {datetime.date.today()} on {platform.processor() or platform.machine()} "
      f"({device.platform}, {device.device_kind}, {jax.local_device_count()} device), jax {jax.__version__}.",
      f"Command: `python bench/train_throughput.py --shapes {args.shapes} --steps {args.steps} "
      f"--dtype {args.dtype}`",
      "",
      f"Matmul peak measured in the same run (2048^3, best of 9): f32 {peak_f32 / 1e9:.0f} GFLOP/s; "
      f"bf16 inputs with f32 accumulation {peak_bf16 / 1e9:.0f} GFLOP/s.",
      "",
      "Decoder (RoPE, RMSNorm, GELU MLP, tied embeddings, vocab 8192), AdamW, median of timed steps.",
      "Model FLOPs by PaLM's count (app. B), recomputation not counted; MFU against the measured peak "
      f"for {args.dtype}.",
      "",
      "| shape | d_model | layers | heads | ffn | seq | batch | dtype | ms/step | tokens/s | GFLOP/s | MFU |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r['shape']} | {r['emb_dim']} | {r['num_layers']} | {r['num_heads']} | {r['mlp_dim']} | "
                 f"{r['seq_len']} | {r['batch_size']} | {r['dtype']} | {r['step_seconds'] * 1e3:.0f} | "
                 f"{r['tokens_per_second']:.0f} | {r['model_flops_per_second'] / 1e9:.0f} | {r['mfu']:.1%} |")
  output = pathlib.Path(args.output)
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text("\n".join(lines) + "\n")
  print(f"wrote {output}")


if __name__ == "__main__":
  main()
