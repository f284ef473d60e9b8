"""Peak host memory and time of loading a run for inference (Trainer.from_workdir), one JSON line per tree.

    python bench/load_memory.py [--config experiments/decoder_tiny.py] [--config.model.emb_dim=1024 ...] \
        [--baselines DIR,...] [--rounds 2]

The config's initial train state (optimizer moments included, as training saves them) is saved
as a run's step 0 in a temporary workdir. Each tree (ours, then each --baselines checkout of an
older revision) loads it in a fresh process, alternating over --rounds, which reports its peak
resident memory (VmHWM) and load time. On a CPU the arrays live in host memory, so the peak
is what inference needs at most to start.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

LOAD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import jax
from t5x_like.trainer import Trainer
def peak_mib():  # this process's own high-water mark (ru_maxrss can carry the parent's over a fork)
  status = open("/proc/self/status").read()
  return int(status.split("VmHWM:")[1].split()[0]) / 1024
before = peak_mib()
start = time.perf_counter()
trainer = Trainer.from_workdir(sys.argv[2])
jax.block_until_ready(trainer.state)
seconds = time.perf_counter() - start
params = sum(leaf.nbytes for leaf in jax.tree.leaves(trainer.state["params"])) / 2**20
print(json.dumps({"seconds": seconds, "peak_mib": peak_mib(), "peak_before_load_mib": before, "params_mib": params}))
"""


def save_initial_run(config_spec: str, overrides: list[str], workdir: pathlib.Path) -> None:
  sys.path.insert(0, str(ROOT))
  from t5x_like.checkpoints import Checkpointer
  from t5x_like.config import apply_overrides, load_run_config
  from t5x_like.trainer import Trainer
  config = load_run_config(config_spec)
  apply_overrides(config, overrides)
  trainer = Trainer(config, workdir)
  checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=1)
  checkpointer.save(0, trainer.checkpointed(), None)
  checkpointer.close()  # waits for the write
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(ROOT / "experiments" / "decoder_tiny.py"))
  parser.add_argument("--baselines", default="", help="comma-separated checkouts of other revisions")
  parser.add_argument("--rounds", type=int, default=2)
  args, overrides = parser.parse_known_args()
  trees = {"this": ROOT} | {pathlib.Path(tree).name: pathlib.Path(tree).resolve()
                            for tree in args.baselines.split(",") if tree}
  with tempfile.TemporaryDirectory() as directory:
    workdir = pathlib.Path(directory) / "run"
    save_initial_run(args.config, overrides, workdir)
    for round_ in range(args.rounds):
      for name, tree in trees.items():
        done = subprocess.run([sys.executable, "-c", LOAD, str(tree), str(workdir)], capture_output=True, text=True,
                              cwd=tree)
        if done.returncode:
          raise SystemExit(f"loading with {tree} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps({"tree": name, "round": round_, "config": pathlib.Path(args.config).name,
                          "overrides": overrides, **{key: round(value, 2) for key, value in row.items()}}))


if __name__ == "__main__":
  main()
