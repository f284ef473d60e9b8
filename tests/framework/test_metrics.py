"""metrics.jsonl after a crash: a torn last row neither blocks reading nor fuses with the next."""

import pytest

from models.config import ConfigError
from t5x_like.metrics import MetricWriter, read_metrics

FIRST = {"step": 1, "split": "train", "loss": 2.0}


def test_a_row_torn_by_a_crash_is_skipped_then_cut_off_by_the_next_writer(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "split": "tr')
  assert read_metrics(tmp_path) == [FIRST]
  writer = MetricWriter(tmp_path)
  writer.write(2, "train", {"loss": 1.5})
  writer.close()
  assert read_metrics(tmp_path) == [FIRST, {"step": 2, "split": "train", "loss": 1.5}]
  assert path.read_text().count("\n") == 2


def test_a_damaged_row_inside_the_file_is_named(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0}\nnot json\n{"step": 2}\n')
  with pytest.raises(ConfigError, match=r"metrics.jsonl, line 2: not a metrics row"):
    read_metrics(tmp_path)
