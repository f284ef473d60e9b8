"""How long a checkpoint save blocks training, with orbax's default array handler and with ours, as one JSON line.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/checkpoint_save.py \
        [--config experiments/decoder_tiny.py] [--rounds 5]

A save returns once orbax has the arrays on the host (the writes go on behind training).
Orbax's default (unless JAX_PLATFORMS names a GPU) writes an array replicated over n devices as
n slices, a dispatch per device per array; t5x_like.checkpoints keeps that for slices of
MIN_REPLICA_SLICE_BYTES or more.
The two alternate in one process on the config's initial train state; the first save of each
(which compiles the slicing) is left out of the medians.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t5x_like.checkpoints import (MIN_REPLICA_SLICE_BYTES, Checkpointer,  # noqa: E402
                                  write_replicated_arrays_in_slices_of_at_least)
from t5x_like.config import load_config  # noqa: E402
from t5x_like.trainer import Trainer  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(ROOT / "experiments" / "decoder_tiny.py"))
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  floors = {"orbax_default": 0, "floor": MIN_REPLICA_SLICE_BYTES}
  seconds = {name: [] for name in floors}
  with tempfile.TemporaryDirectory() as directory:
    state = Trainer(load_config(args.config), pathlib.Path(directory) / "run").checkpointed()
    checkpointer = Checkpointer(pathlib.Path(directory) / "checkpoints", max_to_keep=2)
    step = 0
    for _ in range(args.rounds + 1):
      for name, floor in floors.items():
        write_replicated_arrays_in_slices_of_at_least(floor)
        step += 1
        start = time.perf_counter()
        checkpointer.save(step, state, None)
        seconds[name].append(time.perf_counter() - start)
        checkpointer.wait()
    checkpointer.close()
  medians = {name: statistics.median(times[1:]) for name, times in seconds.items()}
  print(json.dumps({
      "config": pathlib.Path(args.config).name, "devices": jax.device_count(),
      "values": sum(leaf.size for leaf in jax.tree.leaves(state)),
      **{f"{name}_seconds": round(median, 4) for name, median in medians.items()},
      "default_over_floor": round(medians["orbax_default"] / medians["floor"], 2)}))


if __name__ == "__main__":
  main()
