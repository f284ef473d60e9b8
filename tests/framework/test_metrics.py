"""metrics.jsonl after a crash: a torn last row neither blocks reading nor fuses with the next;
TensorBoard's event file, written without importing torch."""

import errno
import struct
import subprocess
import sys
import time

import pytest

from models.config import ConfigError
from t5x_like.metrics import FLUSH_SECONDS, MetricWriter, read_metrics

FIRST = {"step": 1, "split": "train", "loss": 2.0}


@pytest.mark.parametrize("tail", ['{"step": 2, "split": "tr', ""])
def test_a_row_torn_by_a_crash_is_skipped_and_cut_off_but_a_whole_one_without_its_newline_kept(tmp_path, tail):
  """A crash tears the last row; an editor's save drops only the final newline, and that row is
  whole (the next writer cut it off too)."""
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "split": "train", "loss": 2.0}' + ("\n" + tail if tail else ""))
  assert read_metrics(tmp_path) == [FIRST]
  writer = MetricWriter(tmp_path)
  writer.write(2, "train", {"loss": 1.5})
  writer.close()
  assert read_metrics(tmp_path) == [FIRST, {"step": 2, "split": "train", "loss": 1.5}]
  assert path.read_text().count("\n") == 2


@pytest.mark.parametrize("line, problem", [
    (b"not json", "Expecting value"),
    (b"[1, 2]", "a JSON list, not an object"),
    (b'{"step": 3}', "no integer step or no split"),
    (b'{"step": "3", "split": "train"}', "no integer step or no split"),
    (b'{"step": 4, "split": "train", "loss": "x"}', "loss not a number"),
    (b'{"step": 4, "split": "train", "accuracy": 0.5}', "no loss"),
    (b'\xff\xfe{"step": 4}', "byte 0xff is not UTF-8"),
])
def test_a_damaged_row_inside_the_file_is_named(tmp_path, line, problem):
  """Hand edits that a resume met as a KeyError or TypeError deep in the trainer."""
  (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1, "split": "train", "loss": 2.0}\n' + line +
                                           b'\n{"step": 2, "split": "train", "loss": 1.0}\n')
  with pytest.raises(ConfigError, match=rf"metrics.jsonl, line 2: not a metrics row \({problem}.*\); remove the line"):
    read_metrics(tmp_path, fields=("loss",))


def read_events(path):
  """TFRecord framing read by hand: length (8 bytes), its CRC (4), the Event, its CRC (4)."""
  from tensorboardX.proto.event_pb2 import Event
  data, events = path.read_bytes(), []
  while data:
    (length,) = struct.unpack("<Q", data[:8])
    events.append(Event.FromString(data[12:12 + length]))
    data = data[16 + length:]
  return events


def test_tensorboard_scalars_are_written_without_importing_torch_which_imports_after(tmp_path):
  """torch is installed with the test extras; tensorboardX would import it (seconds) at every start."""
  script = ("import sys; from t5x_like.metrics import MetricWriter\n"
            f"writer = MetricWriter({str(tmp_path)!r})\n"
            "writer.write(3, 'train', {'loss': 2.5}); writer.write(6, 'validation', {'loss': 2.25}); writer.close()\n"
            "print('torch' in sys.modules); import torch; print(torch.ones(2).sum().item())")
  run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  assert run.stdout.split() == ["False", "2.0"]
  [events_file] = (tmp_path / "tensorboard").iterdir()
  scalars = [(event.step, value.tag, value.simple_value)
             for event in read_events(events_file) for value in event.summary.value]
  assert scalars == [(3, "train/loss", 2.5), (6, "validation/loss", 2.25)]


def test_tensorboard_rows_reach_the_disk_within_seconds_while_the_writer_is_open(tmp_path):
  """A killed run loses TensorBoard's buffered rows for good (the rerun re-logs only the steps after
  its checkpoint); tensorboardX buffers them, by default for up to 120 s."""
  writer = MetricWriter(tmp_path)
  [events_file] = (tmp_path / "tensorboard").iterdir()

  def on_disk_within(seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
      steps = [event.step for event in read_events(events_file) if event.summary.value]
      if steps and steps[-1] == written[-1]:
        return steps
      time.sleep(0.05)
    return None
  written = [1]
  writer.write(1, "train", {"loss": 2.5})
  assert on_disk_within(5 * FLUSH_SECONDS) == [1]
  written.append(2)
  writer.write(2, "train", {"loss": 2.25})
  assert on_disk_within(5 * FLUSH_SECONDS) == [1, 2]
  writer.close()


def test_tensorboard_events_lost_to_a_full_device_are_a_warning(tmp_path, caplog):
  """metrics.jsonl holds every row: the TensorBoard copy's last events are not worth hiding the error
  that stopped the run (a checkpoint's, on the same full device)."""
  class Closing:
    def __init__(self, error):
      self.error = error

    def close(self):
      raise self.error

  writer = MetricWriter(tmp_path)
  writer.write(1, "train", {"loss": 2.0})
  writer.tensorboard.close()
  writer.tensorboard = Closing(OSError(errno.ENOSPC, "No space left on device"))
  writer.close()
  assert "tensorboard/ lost its last events to a full device (metrics.jsonl holds every row)" in caplog.text
  assert read_metrics(tmp_path) == [{"step": 1, "split": "train", "loss": 2.0}]
  writer = MetricWriter(tmp_path)
  writer.tensorboard.close()
  writer.tensorboard = Closing(PermissionError(errno.EACCES, "Permission denied"))
  with pytest.raises(PermissionError):
    writer.close()
