"""Peak host memory and time of loading a run for inference (Trainer.from_workdir), of a
fine-tune starting from it (--init-from), or of the run resuming (--resume), one JSON line per tree.

    python bench/load_memory.py [--config experiments/decoder_tiny.py] [--config.model.emb_dim=1024 ...] \
        [--baselines DIR,...] [--rounds 2] [--init-from | --resume]

The config's initial train state (optimizer moments included, as training saves them) is saved
as a run's step 0 in a temporary workdir. Each tree (ours, then each --baselines checkout of an
older revision) loads it in a fresh process, alternating over --rounds, which reports its peak
resident memory (VmHWM) and load time, with glibc's huge-page tunable as `t5x-like` has it. On a
CPU the arrays live in host memory, so the peak is what inference needs at most to start. With
--init-from, each process builds the config's own train state and then replaces it by the saved
parameters (Trainer.init_params_from, as train.init_from does), and also reports the peak's rise
above the memory that state held, in copies of the parameters; with --resume, each builds it in
the saved run's workdir and restores the saved state over it (Trainer.restore, as a resumed
train does), reporting the same.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t5x_like.host_memory import with_huge_pages  # noqa: E402

LOAD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import jax
from t5x_like.trainer import Trainer
def status_mib(field):  # this process's own figures (ru_maxrss can carry the parent's over a fork)
  return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) / 1024
if sys.argv[3] != "inference":  # a train's start: its own initial state, replaced by the saved one
  from t5x_like.config import apply_overrides, load_run_config
  config = load_run_config(sys.argv[4])
  apply_overrides(config, json.loads(sys.argv[5]))
  trainer = Trainer(config, sys.argv[6] if sys.argv[3] == "init_from" else sys.argv[2])
  jax.block_until_ready(trainer.state)
  holding = status_mib("VmRSS")
before = status_mib("VmHWM")
start = time.perf_counter()
if sys.argv[3] == "init_from":
  trainer.init_params_from(sys.argv[2])
elif sys.argv[3] == "resume":
  trainer.restore(set_aside=False)
else:
  trainer = Trainer.from_workdir(sys.argv[2])
jax.block_until_ready(trainer.state)
seconds = time.perf_counter() - start
params = sum(leaf.nbytes for leaf in jax.tree.leaves(trainer.state["params"])) / 2**20
row = {"seconds": seconds, "peak_mib": status_mib("VmHWM"), "peak_before_load_mib": before, "params_mib": params}
if sys.argv[3] != "inference":
  row["rise_in_params"] = (status_mib("VmHWM") - holding) / params
print(json.dumps(row))
"""


def save_initial_run(config_spec: str, overrides: list[str], workdir: pathlib.Path) -> None:
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
  modes = parser.add_mutually_exclusive_group()
  modes.add_argument("--init-from", action="store_true",
                     help="time a fine-tune's start from the run (train.init_from), not inference's load")
  modes.add_argument("--resume", action="store_true", help="time the run's own resume, not inference's load")
  args, overrides = parser.parse_known_args()
  trees = {"this": ROOT} | {pathlib.Path(tree).name: pathlib.Path(tree).resolve()
                            for tree in args.baselines.split(",") if tree}
  with tempfile.TemporaryDirectory() as directory:
    workdir = pathlib.Path(directory) / "run"
    save_initial_run(args.config, overrides, workdir)
    for round_ in range(args.rounds):
      for name, tree in trees.items():
        mode = ["inference"]
        if args.init_from:  # each tree's fine-tune in a workdir of its own, fresh each round
          tuned = pathlib.Path(directory) / "tuned" / name
          shutil.rmtree(tuned, ignore_errors=True)
          mode = ["init_from", args.config, json.dumps(overrides), str(tuned)]
        elif args.resume:
          mode = ["resume", args.config, json.dumps(overrides)]
        done = subprocess.run([sys.executable, "-c", LOAD, str(tree), str(workdir), *mode], capture_output=True,
                              text=True, cwd=tree, env=with_huge_pages(dict(os.environ)))
        if done.returncode:
          raise SystemExit(f"loading with {tree} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps({"tree": name, "round": round_, "config": pathlib.Path(args.config).name,
                          "overrides": overrides, **{key: round(value, 2) for key, value in row.items()}}))


if __name__ == "__main__":
  main()
