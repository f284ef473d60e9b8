"""The MFU denominator: data-sheet peaks by device kind, the most specific name first."""

import pytest

from t5x_like.hardware import data_sheet_peak


@pytest.mark.parametrize("device_kind, dense_bf16_flops", [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM: 1979 TFLOP/s with sparsity
    ("NVIDIA H100 PCIe", 756e12),  # 1513 with sparsity
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-40GB", 312e12),
    ("TPU v5 lite", 197e12),
])
def test_data_sheet_peaks(device_kind, dense_bf16_flops):
  assert data_sheet_peak(device_kind) == dense_bf16_flops


def test_unlisted_devices_have_no_data_sheet_peak():
  assert data_sheet_peak("cpu") is None
  assert data_sheet_peak("NVIDIA GeForce RTX 4090") is None
