"""Peak FLOP/s of the device, for model FLOPs utilisation (MFU).

Accelerators: dense bf16 peaks from the vendors' data sheets (one the table lacks is measured
in bf16). CPUs have no data sheet figure worth trusting, so the peak is measured: the best of
a few jitted float32 matmuls at start-up (about a second).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense (no sparsity) bf16 peak FLOP/s per device, keyed by the start of jax's device_kind
# ("NVIDIA H100 80GB HBM3"). The first match wins, so a variant comes before its family.
PEAK_BF16_FLOPS = {
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H100": 989e12,  # SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # jax's name for a v5p
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def data_sheet_peak(device_kind: str) -> float | None:
  """The table's dense bf16 peak for a device kind, or None if it is not listed."""
  return next((flops for name, flops in PEAK_BF16_FLOPS.items() if device_kind.startswith(name)), None)


def call_seconds(fn, repeats: int, warmup: int = 0) -> list[float]:
  """Wall seconds of `repeats` calls of fn(), each waited for, after a compiling call and `warmup` untimed ones.

  The timing loop of the matmul peak, the matmul floor and layouts, and decoding: jax
  dispatches asynchronously, so a call is timed up to block_until_ready on what it returns.
  """
  for _ in range(1 + warmup):
    jax.block_until_ready(fn())
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - start)
  return seconds


def measured_matmul_flops(size: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
  """Best FLOP/s of a jitted size^3 matmul on the default device."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  return 2 * size ** 3 / min(call_seconds(lambda: matmul(a, a), repeats))


@functools.cache
def peak_flops_per_device() -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from); measured once a process, so
  every run and resume in it divides by the same figure."""
  device = jax.devices()[0]
  kind = device.device_kind
  flops = data_sheet_peak(kind)
  if flops is not None:
    return flops, f"data sheet bf16 peak of {kind}"
  if device.platform == "cpu":
    # Simulated CPU devices share the host's cores: measure the host once and split it.
    return measured_matmul_flops() / jax.local_device_count(), f"measured f32 matmul on {kind}"
  # 8192, as bench/gpu.sh: a 2048 product takes tens of microseconds on an H100, so each call's
  # dispatch and wait would count against the peak, and MFU would read high.
  return (measured_matmul_flops(size=8192, dtype=jnp.bfloat16),
          f"measured bf16 matmul on {kind}, which the table lacks")
