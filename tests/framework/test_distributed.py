"""Multi-process runs: a half-described one fails before jax.distributed starts; a whole one trains and samples."""

import os
import pathlib
import subprocess
import sys

import portpicker
import pytest

from models.config import ConfigError
from t5x_like import distributed


def test_process_flags_without_a_coordinator_or_out_of_range_are_refused(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(ConfigError, match="--num_processes and --process_id need --coordinator_address"):
    distributed.initialize(None, 2, 1)
  with pytest.raises(ConfigError, match="coordinator address 127.0.0.1:1234 given without --num_processes"):
    distributed.initialize("127.0.0.1:1234", None, None)
  distributed.initialize(None, None, None)  # a single-process run: nothing to start
  with pytest.raises(ConfigError, match="--coordinator_address auto finds the process count and id itself"):
    distributed.initialize("auto", 4, 3)
  with pytest.raises(ConfigError, match=r"process id 5 is not in \[0, 2\) for 2 processes"):
    distributed.initialize("127.0.0.1:1234", 2, 5)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  monkeypatch.setenv("JAX_PROCESS_ID", "0")
  with pytest.raises(ConfigError, match=r"the process count 'two' and id '0' \(--num_processes and --process_id, or "
                                        r"JAX_NUM_PROCESSES and JAX_PROCESS_ID\) must be integers"):
    distributed.initialize("127.0.0.1:1234", None, None)
  with pytest.raises(ConfigError, match="the process count must be at least 1, got 0"):
    distributed.initialize("127.0.0.1:1234", 0, 0)


TRAIN = """
import sys
from t5x_like.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_process_train_with_the_model_split_over_processes_prints_samples(tmp_path, outputs_of):
  """FSDP over both processes' devices: process 0 samples alone, so it must gather the model first
  (without, it waited on process 1 in the first sharded computation until the coordinator gave up)."""
  port = portpicker.pick_unused_port()
  experiment = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "decoder_tiny.py"
  flags = ["--config.model.emb_dim=32", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
           "--config.model.mlp_dim=64", "--config.model.num_layers=2", "--config.data.seq_len=32",
           "--config.train.steps=2", "--config.train.log_every=1", "--config.train.eval_steps=1",
           "--config.train.checkpoint_every=2", "--config.data.worker_threads=0",
           "--config.partitioning.mesh_shape=(1,-1,1)", "--sample-prompt", "Emma"]
  # Four devices per process; the suite's other XLA flags kept (the last device count wins).
  env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  workers = [subprocess.Popen([sys.executable, "-c", TRAIN, "train", "--config", str(experiment),
                               "--workdir", str(tmp_path), "--coordinator_address", f"127.0.0.1:{port}",
                               "--num_processes", "2", "--process_id", str(pid), *flags],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for pid in range(2)]
  outputs = outputs_of(workers, timeout=240)
  assert [worker.returncode for worker in workers] == [0, 0], outputs
  assert "step 2: validation loss" in outputs[0] and "--- 'Emma'\nEmma" in outputs[0]
  assert "--- 'Emma'" not in outputs[1]
