"""Multi-process runs: a half-described one fails before jax.distributed starts; processes agree on
what each finds alone (a failed check or read, their configs), simulated and between two real
processes; a whole run trains and samples, sets aside with the other process a checkpoint only
one of them cannot read, and stops with the other process when that one fails alone (between
real processes, and each case of the stop watch with processes played by threads)."""

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import portpicker
import pytest
from jax.experimental import multihost_utils

from models.config import ConfigError
from t5x_like import checkpoints, distributed
from t5x_like.data.tokenizer import load_tokenizer
from t5x_like.partitioning import DEFAULT_RULES
from t5x_like.samples import sample_texts
from t5x_like.trainer import Trainer


def test_process_flags_without_a_coordinator_or_out_of_range_are_refused(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(ConfigError, match=r"--num_processes and --process_id \(or JAX_NUM_PROCESSES and "
                                        r"JAX_PROCESS_ID\) need --coordinator_address"):
    distributed.initialize(None, 2, 1)
  with pytest.raises(ConfigError, match="coordinator address 127.0.0.1:1234 given without --num_processes"):
    distributed.initialize("127.0.0.1:1234", None, None)
  distributed.initialize(None, None, None)  # a single-process run: nothing to start
  with pytest.raises(ConfigError, match="--coordinator_address auto finds the process count and id itself"):
    distributed.initialize("auto", 4, 3)
  with pytest.raises(ConfigError, match=r"process id 5 is not in \[0, 2\) for 2 processes"):
    distributed.initialize("127.0.0.1:1234", 2, 5)
  for address in ("foo", "foo:", ":1234", "foo:12a"):  # jax met "foo" with an IndexError
    with pytest.raises(ConfigError, match=rf"coordinator address '{address}' .* must be HOST:PORT"):
      distributed.initialize(address, 2, 1)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  monkeypatch.setenv("JAX_PROCESS_ID", "0")
  with pytest.raises(ConfigError, match=r"the process count 'two' and id '0' \(--num_processes and --process_id, or "
                                        r"JAX_NUM_PROCESSES and JAX_PROCESS_ID\) must be integers"):
    distributed.initialize("127.0.0.1:1234", None, None)
  with pytest.raises(ConfigError, match="the process count must be at least 1, got 0"):
    distributed.initialize("127.0.0.1:1234", 0, 0)
  # The environment's count and id without its address: each host would train alone into one workdir.
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  with pytest.raises(ConfigError, match="without one every process would train alone"):
    distributed.initialize(None, None, None)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "1")  # a launcher's single-host job: nothing to join
  monkeypatch.setenv("JAX_PROCESS_ID", "0")
  distributed.initialize(None, None, None)
  assert jax.process_count() == 1


def _as_process(monkeypatch, index, others):
  """This process as process `index` of 1 + len(others), whose gather_json values are `others`:
  process_allgather returns what each process's gather_json would put in, in process order."""
  def allgather(array):
    array = np.asarray(array)
    theirs = [np.frombuffer(json.dumps(value).encode(), np.uint8) for value in others]
    if array.dtype == np.uint8:  # the padded JSON bytes
      theirs = [np.pad(encoded, (0, array.size - encoded.size)) for encoded in theirs]
    else:  # their lengths
      theirs = [np.array([encoded.size]) for encoded in theirs]
    theirs.insert(index, array)
    return np.stack(theirs)
  monkeypatch.setattr(jax, "process_count", lambda: 1 + len(others))
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)


def test_processes_gather_each_others_json_and_take_process_0s(monkeypatch):
  long = {"position": "x" * 300}  # past the smallest padded length
  _as_process(monkeypatch, 1, [long])
  assert distributed.gather_json({"a": [1, 2]}) == [long, {"a": [1, 2]}]
  _as_process(monkeypatch, 1, [[6, 4, 2]])  # process 0 listed a step that was saved since this one listed
  assert distributed.process_0s([4, 2]) == [6, 4, 2]


def test_a_check_that_fails_on_one_process_fails_on_every_process(monkeypatch):
  _as_process(monkeypatch, 0, [None])
  assert distributed.check_on_every_process(lambda: 7) == 7
  _as_process(monkeypatch, 0, ["data.tokenizer='t.model' is not the file the run was trained with"])
  with pytest.raises(ConfigError, match=r"^on process 1: data.tokenizer='t.model' is not the file"):
    distributed.check_on_every_process(lambda: 7)
  gathered = []
  _as_process(monkeypatch, 0, [None])
  monkeypatch.setattr(distributed, "gather_json", lambda value: gathered.append(value) or [value, None])

  def fails(error):
    raise error
  with pytest.raises(ConfigError, match=r"^this process's own problem$"):
    distributed.check_on_every_process(lambda: fails(ConfigError("this process's own problem")))
  with pytest.raises(RuntimeError, match="^an unreadable file$"):  # not only ConfigError: a broken file's own error
    distributed.check_on_every_process(lambda: fails(RuntimeError("an unreadable file")))
  assert gathered == ["this process's own problem", "RuntimeError: an unreadable file"]  # told the others first


def test_a_read_that_fails_on_one_process_is_a_failure_on_every_process(monkeypatch):
  _as_process(monkeypatch, 0, [None])
  assert checkpoints._read_on_every_process(lambda: 5) == (5, None)
  _as_process(monkeypatch, 0, ["Exception: Encountered error while reading array index"])
  assert checkpoints._read_on_every_process(lambda: 5) == (
      None, "process 1 cannot read it: Exception: Encountered error while reading array index")
  assert checkpoints._read_on_every_process(lambda: {}["state"]) == (None, "KeyError: 'state'")


def test_processes_with_different_configs_are_refused_naming_the_fields(monkeypatch):
  mine = {"train": {"steps": 10, "seed": 0, "z_loss": float("nan")}, "data": {"dataset_dir": "/a"}}
  _as_process(monkeypatch, 0, [mine])
  distributed.check_same_run(mine)  # NaN included
  _as_process(monkeypatch, 0, [{"train": {"steps": 20, "seed": 0, "z_loss": float("nan"), "init_from": None},
                                "data": {"dataset_dir": "/b"}}])
  with pytest.raises(ConfigError, match=r'the processes run different configs \(data.dataset_dir: "/a" on process 0, '
                                        r'"/b" on process 1; train.init_from: nothing on process 0, null on process 1; '
                                        r'train.steps: 10 on process 0, 20 on process 1\)'):
    distributed.check_same_run(mine)


class _Store:
  """The key-value calls of jax's distributed client, in memory, for processes played by threads."""

  def __init__(self):
    self.values, self.changed = {}, threading.Condition()

  def key_value_set(self, key, value):
    with self.changed:
      if key in self.values:
        raise jax.errors.JaxRuntimeError(f"ALREADY_EXISTS: key {key} already exists.")
      self.values[key] = value
      self.changed.notify_all()

  def key_value_dir_get(self, directory):
    with self.changed:
      return [(key, value) for key, value in self.values.items() if key.startswith(directory)]

  def blocking_key_value_get(self, key, timeout_in_ms):
    with self.changed:
      if not self.changed.wait_for(lambda: key in self.values, timeout_in_ms / 1000):
        raise jax.errors.JaxRuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
      return self.values[key]


@pytest.fixture
def two_watches(monkeypatch):
  """(store, exits, [process 0's stop watch, process 1's]), os._exit noting each exit as
  (process, status, the processes that had left by then) and returning."""
  monkeypatch.setattr(distributed, "GRACE_SECONDS", 1.0)
  monkeypatch.setattr(distributed, "POLL_SECONDS", 0.02)
  store, exits = _Store(), []
  def exit_(status):
    left = sorted(int(key.rsplit("/", 1)[1]) for key, _ in store.key_value_dir_get(distributed.KEYS + "left/"))
    exits.append((int(threading.current_thread().name.split()[-1]), status, left))
  monkeypatch.setattr(os, "_exit", exit_)
  watches = [distributed._StopWatch(store, index, 2) for index in range(2)]
  for index, watch in enumerate(watches):
    watch.thread.name = f"process {index}"
  yield store, exits, watches
  for watch in watches:
    watch.stop()


def _as_thread(name, *steps):
  thread = threading.Thread(target=lambda: [step() for step in steps], name=name)
  thread.start()
  return thread


def _fail(watch, error, cleanup_seconds=0.0):
  """What a process does when its training fails: marks itself failing, cleans up (finishes its
  saves), posts the failure, waits for the others, and leaves alone with status 2 if it must."""
  watch.failing()
  time.sleep(cleanup_seconds)
  watch.failed(error)
  watch.wait_for_the_others()
  if watch.alone:
    watch.leave(2)


@pytest.mark.parametrize("failing", [0, 1])
def test_a_process_that_fails_alone_posts_it_and_the_other_leaves_process_0_last(two_watches, failing, capsys):
  store, exits, watches = two_watches
  _as_thread(f"process {failing}", lambda: _fail(watches[failing], RuntimeError("record 17 is broken\nat byte 3"))
             ).join(timeout=10)
  for watch in watches:
    watch.thread.join(timeout=10)
  other = 1 - failing
  assert store.values[distributed.KEYS + f"outcome/{other}"] == "leaving"  # what told the failed one it is alone
  assert watches[failing].alone and not watches[other].alone
  assert {process: status for process, status, _ in exits} == {failing: 2, other: 1}
  assert [left for process, _, left in exits if process == 0] == [[0, 1]]  # process 0 serves the store: it goes last
  assert (f"t5x-like: error: process {failing} failed: RuntimeError: record 17 is broken; process {other} stops "
          f"too") in capsys.readouterr().err


@pytest.mark.parametrize("other", ["fails after a save longer than the grace", "finished"])
def test_a_process_that_fails_with_the_other_or_after_it_finished_is_not_alone(two_watches, other):
  """Neither leaves: both meet at jax's shutdown barrier. Process 1 fails first; process 0 posts
  its own failure only after a save that outlasts the grace, and must not be taken for stuck."""
  _, exits, watches = two_watches
  if other == "finished":
    watches[1].finished()
    threads = [_as_thread("process 0", lambda: _fail(watches[0], ConfigError("a prompt too long")))]
  else:  # the grace is 1 s; process 1 gives up waiting for process 0's post after 2 s
    threads = [_as_thread("process 0", lambda: _fail(watches[0], FloatingPointError("loss nan"), 1.3)),
               _as_thread("process 1", lambda: _fail(watches[1], FloatingPointError("loss nan")))]
  for thread in threads:
    thread.join(timeout=10)
  assert not any(watch.alone for watch in watches) and exits == []


TRAIN = """
import sys
from t5x_like.cli import main
sys.exit(main(sys.argv[1:]))
"""


# Process 1's fifth batch raises, as a broken record in its own data files would.
FAIL_AT_PROCESS_1S_FIFTH_BATCH = """
import sys
import jax
from t5x_like.cli import main
from t5x_like.trainer import Trainer
global_batch, calls = Trainer.global_batch, []
def broken_on_process_1(self, batch):
  calls.append(1)
  if jax.process_index() == 1 and len(calls) == 5:
    raise RuntimeError("record 17 of process 1's data is broken")
  return global_batch(self, batch)
Trainer.global_batch = broken_on_process_1
sys.exit(main(sys.argv[1:]))
"""


def _train_on_two_processes(workdir, outputs_of, *flags, per_process=((), ()), script=TRAIN):
  """(return codes, outputs) of `t5x-like train` (or `script`) on two processes with a small model
  split over both processes' devices (FSDP over all eight); `per_process` holds each one's own flags."""
  port = portpicker.pick_unused_port()
  experiment = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "decoder_tiny.py"
  flags = ["--config.model.emb_dim=32", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
           "--config.model.mlp_dim=64", "--config.model.num_layers=2", "--config.data.seq_len=32",
           "--config.train.log_every=1", "--config.train.eval_steps=1", "--config.data.worker_threads=0",
           "--config.partitioning.mesh_shape=(1,-1,1)", *flags]
  # Four devices per process; the suite's other XLA flags kept (the last device count wins).
  env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  workers = [subprocess.Popen([sys.executable, "-c", script, "train", "--config", str(experiment),
                               "--workdir", str(workdir), "--coordinator_address", f"127.0.0.1:{port}",
                               "--num_processes", "2", "--process_id", str(pid), *flags, *per_process[pid]],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for pid in range(2)]
  outputs = outputs_of(workers, timeout=240)
  return [worker.returncode for worker in workers], outputs


# A decoder split by FSDP; an encoder whose vocabulary a rule puts on the FSDP axis, so that its
# logits are split across the two processes (np.asarray cannot read them: each holds half).
SPLITS = {"decoder": (), "encoder": ("--config.model.arch=encoder", "--config.data.objective=mlm",
                                     f"--config.partitioning.rules={(('vocab', 'fsdp'), *DEFAULT_RULES)!r}")}


@pytest.mark.parametrize("split", SPLITS)
def test_two_process_train_with_the_model_split_over_processes_prints_samples(tmp_path, outputs_of, split):
  """Both processes sample together on the model split over them (process 0 alone waited on
  process 1 in the first sharded computation until the coordinator gave up), and process 0
  prints: the sample the saved run gives loaded on one device here."""
  codes, outputs = _train_on_two_processes(tmp_path, outputs_of, "--config.train.steps=2",
                                           "--config.train.checkpoint_every=2", "--sample-prompt", "Emma",
                                           *SPLITS[split])
  assert codes == [0, 0], outputs
  trainer = Trainer.from_workdir(tmp_path, devices=jax.devices()[:1])
  assert "step 2: validation loss" in outputs[0] and "--- '" not in outputs[1] and trainer.model_config.arch == split
  model = trainer.model_from(trainer.state["params"], trainer.rest)
  model.eval()
  [(prompt, text)] = sample_texts(model, load_tokenizer(trainer.config.data.tokenizer), ["Emma"])
  assert f"--- {prompt!r}\n{text}\n" in outputs[0]


def test_processes_started_with_different_flags_stop_before_training_naming_them(tmp_path, outputs_of):
  """Process 1 is given another step count and another workdir (argparse takes the last --workdir)."""
  other = tmp_path / "other"
  codes, outputs = _train_on_two_processes(
      tmp_path, outputs_of, "--config.train.checkpoint_every=2",
      per_process=(["--config.train.steps=2"], ["--config.train.steps=3", "--workdir", str(other)]))
  assert codes == [2, 2], outputs
  for output in outputs:
    assert (f'error: the processes run different configs (train.steps: 2 on process 0, 3 on process 1; '
            f'workdir: "{tmp_path}" on process 0, "{other}" on process 1)') in output
  assert not (tmp_path / "checkpoints").exists() and not other.exists()


def test_a_mesh_that_gives_both_processes_the_same_rows_of_the_batch_stops_them(tmp_path, outputs_of):
  """A tensor axis over both hosts' devices leaves each the whole batch, while each loads rows of
  its own: jax would take the two hosts' different rows as copies of one another."""
  codes, outputs = _train_on_two_processes(tmp_path, outputs_of, "--config.partitioning.mesh_shape=(1,1,8)",
                                           "--config.model.num_heads=8", "--config.model.num_kv_heads=8")
  assert codes == [2, 2], outputs
  for output in outputs:
    assert ("error: partitioning.mesh_shape=(1, 1, 8) puts the same rows of the batch on processes [0, 1]: each "
            "process loads rows of its own, so the batch axes ('data', 'fsdp') (1 shards here) must split over the "
            "2 processes") in output
  assert not (tmp_path / "checkpoints").exists()


def test_an_experiment_file_missing_on_one_host_stops_both_processes(tmp_path, outputs_of):
  """Process 1 reads another path (argparse takes the last --config), which does not exist."""
  missing = tmp_path / "missing.py"
  codes, outputs = _train_on_two_processes(tmp_path / "run", outputs_of, per_process=([], ["--config", str(missing)]))
  assert codes == [2, 2], outputs
  assert "error: on process 1: " in outputs[0] and str(missing) in outputs[0]
  assert "error: " in outputs[1] and str(missing) in outputs[1] and "on process" not in outputs[1]
  assert not (tmp_path / "run").exists()


def test_a_failure_on_one_process_stops_both_and_a_checkpoint_one_cannot_read_is_set_aside_by_both(
    tmp_path, outputs_of):
  """Process 1 fails at its fifth batch, step 4's save still being written. Before, it waited at
  jax's shutdown barrier and process 0 in the step's collective until both aborted five minutes
  later (exit status 134), process 0's log without the cause.

  Then each process reads only the shards it holds (the model is split over both): garbling
  process 1's files of step 4 leaves process 0's reads good, yet both must fall back to step 2
  together (before, process 0 waited at orbax's restore barrier and process 1 at another)."""
  flags = "--config.train.steps=6", "--config.train.checkpoint_every=2"
  codes, outputs = _train_on_two_processes(tmp_path, outputs_of, *flags, script=FAIL_AT_PROCESS_1S_FIFTH_BATCH)
  assert codes == [1, 1], outputs
  assert ("t5x-like: error: process 1 failed: RuntimeError: record 17 of process 1's data is broken; "
          "process 0 stops too") in outputs[0]
  assert "Traceback" in outputs[1] and "RuntimeError: record 17 of process 1's data is broken" in outputs[1]
  assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]  # none half-written

  garbled = [file for file in (tmp_path / "checkpoints" / "4" / "state" / "ocdbt.process_1").rglob("*")
             if file.is_file() and file.parent.name == "d"]
  assert garbled, "process 1 wrote no array files to garble"
  for file in garbled:
    file.write_bytes(b"garbage")
  codes, outputs = _train_on_two_processes(tmp_path, outputs_of, *flags)
  assert codes == [0, 0], outputs
  step_4 = tmp_path / "checkpoints" / "4"
  assert f"checkpoint {step_4} is unreadable (process 1 cannot read it: Exception: " in outputs[0]
  assert f"checkpoint {step_4} is unreadable (Exception: " in outputs[1]
  for output in outputs:
    assert f"resuming from checkpoint {tmp_path / 'checkpoints' / '2'}, the newest readable one" in output
  assert [path.name.split("-")[0] for path in (tmp_path / "corrupt").iterdir()] == ["4"]
  assert sorted(int(path.name) for path in (tmp_path / "checkpoints").iterdir()) == [2, 4, 6]  # step 4 trained again
