"""Metric writers: `metrics.jsonl` (one object per logged step, with a `split`) and TensorBoard; reading back."""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import sys

import jax

from models.config import ConfigError

logger = logging.getLogger(__name__)


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported with torch hidden unless something imported it already.

  tensorboardX imports torch whenever it is installed, only to accept torch tensors, which costs a
  training start 2 to 3 s; we log Python floats. For the quarter second of the import, another
  thread's `import torch` would fail; none of this library's threads imports it.
  """
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while this entry stands
  try:
    from tensorboardX import SummaryWriter
  finally:
    if sys.modules.get("torch", False) is None:  # ours, unless something replaced it meanwhile
      del sys.modules["torch"]
  return SummaryWriter


FLUSH_SECONDS = 2


class MetricWriter:
  """Writes on process 0 only, so a multi-host run produces one file."""

  def __init__(self, workdir: pathlib.Path):
    self.enabled = jax.process_index() == 0
    self.jsonl = None
    self.tensorboard = None
    if self.enabled:
      path = pathlib.Path(workdir) / "metrics.jsonl"
      whole_last_row = False
      if path.exists():  # a row torn by a crash would run into the first new one: cut it off
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        whole_last_row = end < len(data) and _parsed_row(data[end:])[0] is not None
        if not whole_last_row:
          os.truncate(path, end)
      self.jsonl = open(path, "a", encoding="utf-8")
      if whole_last_row:  # a row that lost only its newline (an editor's save) is kept
        self.jsonl.write("\n")
      # Rows reach the disk within FLUSH_SECONDS (tensorboardX's default, 120 s, lost a killed run's
      # last two minutes of rows for good: the rerun re-logs only the steps after its checkpoint).
      self.tensorboard = _summary_writer_class()(str(pathlib.Path(workdir) / "tensorboard"),
                                                 flush_secs=FLUSH_SECONDS)

  def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "split": split, **{k: float(v) for k, v in scalars.items()}}
    self.jsonl.write(json.dumps(row) + "\n")
    self.jsonl.flush()
    for name, value in scalars.items():
      self.tensorboard.add_scalar(f"{split}/{name}", float(value), int(step))

  def close(self) -> None:
    """Closes both files. TensorBoard's last events (FLUSH_SECONDS' worth) lost to a full device
    are a warning: metrics.jsonl, flushed row by row, holds them, and a run stopped by the full
    device had its checkpointer's error hidden behind this one."""
    if not self.enabled:
      return
    self.jsonl.close()
    try:
      self.tensorboard.close()
    except OSError as error:
      if error.errno != errno.ENOSPC:
        raise
      logger.warning("tensorboard/ lost its last events to a full device (metrics.jsonl holds every row)")


def read_metrics(workdir: pathlib.Path, split: str | None = None, *, fields: tuple[str, ...] = ()) -> list[dict]:
  """Rows of a run's metrics.jsonl, optionally of one split, one per (split, step); a row without
  one of `fields` (those the caller reads) is an error, as is one MetricWriter did not write.

  The file only grows: a resumed run logs again the steps it trains again after its last
  checkpoint, and a rerun evaluates its end again. The newest row of each step counts.
  A row a crash tore is skipped, and the next writer cuts it off.
  """
  path = pathlib.Path(workdir) / "metrics.jsonl"
  lines = path.read_bytes().split(b"\n")
  newest = {}
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    row, problem = _parsed_row(line, fields)
    if problem and number == len(lines):  # a last line without its newline: torn by a crash, or being written
      continue
    if problem:
      raise ConfigError(f"{path}, line {number}: not a metrics row ({problem}); remove the line")
    if split is None or row["split"] == split:
      newest.pop((row["split"], row["step"]), None)  # re-inserted: in the order last written
      newest[(row["split"], row["step"])] = row
  return list(newest.values())


def _parsed_row(line: bytes, fields: tuple[str, ...] = ()) -> tuple[dict | None, str | None]:
  """(row, None) for a line MetricWriter writes: a JSON object with an integer step, a split, and
  numbers for the rest, `fields` among them; (None, why not) for any other."""
  try:
    row = json.loads(line.decode("utf-8"))
  except UnicodeDecodeError as error:
    return None, f"byte {line[error.start]:#x} is not UTF-8"
  except json.JSONDecodeError as error:
    return None, error.msg
  if not isinstance(row, dict):
    return None, f"a JSON {type(row).__name__}, not an object"
  if type(row.get("step")) is not int or not isinstance(row.get("split"), str):
    return None, "no integer step or no split"
  missing = [key for key in fields if key not in row]
  if missing:
    return None, f"no {' or '.join(missing)}"
  not_numbers = [key for key, value in row.items() if key not in ("step", "split") and type(value) not in (int, float)]
  if not_numbers:
    return None, f"{', '.join(not_numbers)} not a number"
  return row, None
