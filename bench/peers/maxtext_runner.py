"""MaxText's own pre-training loop on its synthetic data, timed from its per-step log lines.

Run with the peer's own Python (bench/peers.py builds it); prints one JSON line, see protocol.py.
MaxText runs as it ships: its default llama2 decoder block (RMSNorm, RoPE, SwiGLU, untied
output projection) at the requested shape, with AdamW, float32 weights and the requested
activation dtype. It always rematerializes; remat_policy=minimal_with_context, the least
recomputation it offers, keeps the outputs of the q/k/v/o and MLP matmuls and of attention,
so the backward pass recomputes QK^T, softmax, norms and activations.

MaxText logs each step's time as the gap between two dispatches with one step in flight:
step 0 returns before it has run and step 1 waits for it, so those two are left out, and
--warmup steps after them, as the other runners leave them out.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import statistics
import subprocess
import sys
import tempfile

import protocol

UNTIMED_STEPS = 2
STEP_LINE = re.compile(r"completed step: (\d+), seconds: ([0-9.]+)")


def main() -> None:
  args = protocol.parse_args(__doc__)
  head_dim = args.emb_dim // args.heads
  with tempfile.TemporaryDirectory() as output_dir:
    command = [
        sys.executable, "-m", "maxtext.trainers.pre_train.train", "run_name=peer_bench",
        f"base_output_directory={output_dir}", "hardware=cpu", "skip_jax_distributed_system=true",
        "dataset_type=synthetic", "enable_checkpointing=false", "enable_tensorboard=false", "log_config=false",
        f"base_emb_dim={args.emb_dim}", f"base_num_query_heads={args.heads}", f"base_num_kv_heads={args.heads}",
        f"head_dim={head_dim}", f"base_mlp_dim={args.mlp_dim}", f"base_num_decoder_layers={args.layers}",
        f"vocab_size={args.vocab}", f"max_target_length={args.seq}", f"per_device_batch_size={args.batch}",
        f"steps={UNTIMED_STEPS + args.warmup + args.steps}", f"dtype={args.dtype}", "remat_policy=minimal_with_context",
    ]
    # One device, as the batch is per device; and XLA_FLAGS never empty, which MaxText would fill
    # with an HLO dump to /tmp/xla_dump. XLA takes the last of repeated flags.
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1".strip()
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, XLA_FLAGS=xla_flags))
  log = result.stdout + result.stderr
  seconds = [float(s) for step, s in STEP_LINE.findall(log) if int(step) >= UNTIMED_STEPS + args.warmup]
  if result.returncode or len(seconds) != args.steps:
    sys.exit(f"MaxText exited {result.returncode} after {len(seconds)} timed steps:\n{log[-4000:]}")
  protocol.report(args, peer="maxtext", version=importlib.metadata.version("maxtext"),
                  jax_version=importlib.metadata.version("jax"),
                  arch="llama: RMSNorm, RoPE, SwiGLU, untied (its llama2 block)",
                  gated=True, head_dim=head_dim, step_seconds=statistics.median(seconds))


if __name__ == "__main__":
  main()
