"""The MFU denominator: data-sheet peaks by device kind, the most specific name first; the bench timing loop."""

import time

import pytest

from t5x_like import hardware
from t5x_like.hardware import call_seconds, data_sheet_peak


@pytest.mark.parametrize("device_kind, dense_bf16_flops", [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM: 1979 TFLOP/s with sparsity
    ("NVIDIA H100 PCIe", 756e12),  # 1513 with sparsity
    ("NVIDIA H100 NVL", 835e12),  # 1671 with sparsity
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA A100-SXM4-40GB", 312e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),  # a v5p
])
def test_data_sheet_peaks(device_kind, dense_bf16_flops):
  assert data_sheet_peak(device_kind) == dense_bf16_flops


def test_unlisted_devices_have_no_data_sheet_peak():
  assert data_sheet_peak("cpu") is None
  assert data_sheet_peak("NVIDIA GeForce RTX 4090") is None


class SlowResult:
  """Stands in for an array still being computed: ready only after `delay` seconds of block_until_ready."""

  def __init__(self, log: list, delay: float):
    self.log, self.delay = log, delay

  def block_until_ready(self):
    time.sleep(self.delay)
    self.log.append("ready")
    return self


def test_call_seconds_times_each_call_up_to_its_result_after_untimed_calls():
  log = []

  def call():
    log.append("call")
    return {"result": SlowResult(log, 0.02)}

  seconds = call_seconds(call, repeats=3, warmup=2)
  assert log == ["call", "ready"] * 6  # one compiling call, 2 warmup, 3 timed; each waited for in turn
  assert len(seconds) == 3 and all(0.02 <= s < 1.0 for s in seconds)  # the wait is inside the timing


def test_the_cpu_peak_is_measured_once_a_process(monkeypatch):
  """Every run and resume in a process divides its MFU by the same figure."""
  calls = []
  monkeypatch.setattr(hardware, "measured_matmul_flops", lambda **_: calls.append(1) or 1e11)
  hardware.peak_flops_per_device.cache_clear()
  try:
    first = hardware.peak_flops_per_device()
    assert hardware.peak_flops_per_device() == first and len(calls) == 1
  finally:
    hardware.peak_flops_per_device.cache_clear()
