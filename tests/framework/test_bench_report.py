"""bench/run.py states what its figures ran on: the CPU's vector extensions and the steal."""

import importlib.util
import pathlib
from types import SimpleNamespace

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_run(monkeypatch):
  # run.py sets T5X_LIKE_XLA_DEFAULTS for its own children; monkeypatch undoes it after the test.
  monkeypatch.setenv("T5X_LIKE_XLA_DEFAULTS", "1")
  monkeypatch.syspath_prepend(str(ROOT / "bench"))
  spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_steal_share_is_the_steal_counter_over_all_time(monkeypatch):
  run = load_run(monkeypatch)
  # /proc/stat order: user nice system idle iowait irq softirq steal.
  before = [1000, 0, 300, 5000, 10, 0, 5, 200]
  after = [1300, 0, 350, 5100, 10, 0, 5, 300]  # +300 user, +50 system, +100 idle, +100 steal
  assert run.steal_share(before, after) == 100 / 550
  assert run.steal_share([], after) is None


def test_cpu_name_lists_this_machines_vector_extensions(monkeypatch):
  run = load_run(monkeypatch)
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  if not cpuinfo.exists():
    assert run.cpu_name()
    return
  flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
  name = run.cpu_name()
  assert ("AVX2" in name) == ("avx2" in flags)
  assert ("AVX-512" in name) == ("avx512f" in flags)
  assert ("AVX512-BF16" in name) == ("avx512_bf16" in flags)


def test_archs_narrow_our_runners_and_float32_adds_the_variants(monkeypatch):
  run = load_run(monkeypatch)
  # Each runner, called with the measurements stubbed, says what it would have run.
  timings = []  # (steps, warmup) each runner was given

  def ours(shape, dtype, steps, warmup, arch="default", bf16_matmul_inputs=False, **kw):
    timings.append((steps, warmup))
    return ("ours", dtype, arch, bf16_matmul_inputs, tuple(sorted(kw)))

  def matmul_floor(shape, steps, warmup, bf16):
    timings.append((steps, warmup))
    return ("floor", bf16)

  def run_peer(name, shape, vocab, dtype, steps, warmup, venvs):
    timings.append((steps, warmup))
    return ("peer", name)

  monkeypatch.setattr(run, "ours", ours)
  monkeypatch.setattr(run, "matmul_floor", matmul_floor)
  monkeypatch.setattr(run.peers, "run_peer", run_peer)

  def runs(archs, dtype, peers="easydel"):
    args = SimpleNamespace(archs=archs, peers=peers, steps=4, warmup=3, venvs="")
    return [measure() for _, measure in run.shape_runners("tiny", dtype, args, trees={})]

  assert runs("default", "bfloat16") == [("ours", "bfloat16", "default", False, ()), ("peer", "easydel")]
  assert runs("gpt2,llama", "bfloat16", peers="") == [("ours", "bfloat16", "gpt2", False, ()),
                                                      ("ours", "bfloat16", "llama", False, ())]
  # float32 adds bf16 matmul inputs for each named GPT-2/LLaMA block ...
  assert runs("llama", "float32", peers="") == [("ours", "float32", "llama", False, ()),
                                                ("ours", "float32", "llama", True, ())]
  # ... and, with the default block, its variants and the two matmul floors.
  everything = runs("default,gpt2,llama", "float32")
  assert [r for r in everything if r[0] == "ours" and r[4]] == [
      ("ours", "float32", "default", False, ("env",)), ("ours", "float32", "default", False, ("env",)),
      ("ours", "float32", "default", False, ("attention_kernel",)),
      ("ours", "float32", "default", False, ("loss_kernel",))]
  assert [r for r in everything if r[0] == "floor"] == [("floor", False), ("floor", True)]
  assert len(everything) == 5 + 4 + 2 + 1 and everything[-1] == ("peer", "easydel")
  # Every runner, ours, the floors and the peers, leaves out the same warm-up steps.
  assert set(timings) == {(4, 3)}
