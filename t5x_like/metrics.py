"""Metric writers: `metrics.jsonl` (one object per logged step, with a `split`) and TensorBoard; reading back."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import jax

from models.config import ConfigError


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
      if path.exists():  # a row torn by a crash would run into the first new one: cut it off
        data = path.read_bytes()
        os.truncate(path, data.rfind(b"\n") + 1)
      self.jsonl = open(path, "a", encoding="utf-8")
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
    if self.enabled:
      self.jsonl.close()
      self.tensorboard.close()


def read_metrics(workdir: pathlib.Path, split: str | None = None) -> list[dict]:
  """Rows of a run's metrics.jsonl, optionally of one split, one per (split, step).

  The file only grows: a resumed run logs again the steps it trains again after its last
  checkpoint, and a rerun evaluates its end again. The newest row of each step counts.
  A row a crash tore is skipped, and the next writer cuts it off.
  """
  path = pathlib.Path(workdir) / "metrics.jsonl"
  text = path.read_text(encoding="utf-8")
  newest = {}
  # A last line without its newline is a row torn by a crash (or still being written).
  for number, line in enumerate(text[:text.rfind("\n") + 1].splitlines(), start=1):
    try:
      row = json.loads(line)
    except json.JSONDecodeError as error:
      raise ConfigError(f"{path}, line {number}: not a metrics row ({error.msg}); remove the line") from None
    if split is None or row["split"] == split:
      newest.pop((row["split"], row["step"]), None)  # re-inserted: in the order last written
      newest[(row["split"], row["step"])] = row
  return list(newest.values())
