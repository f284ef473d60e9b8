"""The bench scripts' bookkeeping: what run.py says its figures ran on, its rounds, paired_step's pairs,
profile_step's sums."""

import importlib.util
import pathlib
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_bench_script(monkeypatch, name):
  monkeypatch.syspath_prepend(str(ROOT / "bench"))
  spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_run(monkeypatch):
  # run.py sets T5X_LIKE_XLA_DEFAULTS for its own children; monkeypatch undoes it after the test.
  monkeypatch.setenv("T5X_LIKE_XLA_DEFAULTS", "1")
  return load_bench_script(monkeypatch, "run")


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

  def runs(archs, dtype, peers="easydel", trees=None):
    args = SimpleNamespace(archs=archs, peers=peers, steps=4, warmup=3, venvs="")
    return [measure() for _, measure in run.shape_runners("tiny", dtype, args, trees=trees or {})]

  assert runs("default", "bfloat16") == [("ours", "bfloat16", "default", False, ()), ("peer", "easydel")]
  assert runs("gpt2,llama", "bfloat16", peers="") == [("ours", "bfloat16", "gpt2", False, ()),
                                                      ("ours", "bfloat16", "llama", False, ())]
  # Each --baselines revision runs in each named block, from its own tree.
  assert runs("gpt2,llama", "bfloat16", peers="", trees={"abc1234": "/tree"})[2:] == [
      ("ours", "bfloat16", "gpt2", False, ("env",)), ("ours", "bfloat16", "llama", False, ("env",))]
  # float32 adds bf16 matmul inputs for each named GPT-2/LLaMA block ...
  assert runs("llama", "float32", peers="") == [("ours", "float32", "llama", False, ()),
                                                ("ours", "float32", "llama", True, ())]
  # ... and, with the default block, its variants and the two matmul floors; the 4 KiB-page
  # variant only where huge pages are on, as main() turns them on where they are available.
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  everything = runs("default,gpt2,llama", "float32")
  assert [r for r in everything if r[0] == "ours" and r[4]] == [
      ("ours", "float32", "default", False, ("env",)), ("ours", "float32", "default", False, ("env",)),
      ("ours", "float32", "default", False, ("attention_kernel",)),
      ("ours", "float32", "default", False, ("loss_kernel",))]
  assert [r for r in everything if r[0] == "floor"] == [("floor", False), ("floor", True)]
  assert len(everything) == 5 + 4 + 2 + 1 and everything[-1] == ("peer", "easydel")
  monkeypatch.delenv("GLIBC_TUNABLES")
  assert len(runs("default,gpt2,llama", "float32")) == len(everything) - 1
  # Every runner, ours, the floors and the peers, leaves out the same warm-up steps.
  assert set(timings) == {(4, 3)}


def test_each_runner_keeps_its_fastest_round_and_its_median_round(monkeypatch):
  run = load_run(monkeypatch)
  rounds = [{"step_seconds": s, "model_flops_per_second": 60e9 / s} for s in (0.3, 0.2, 0.25, 0.4)]
  kept = run.fastest_with_median(rounds + [{"dtype": "float32", "error": "boom"}])
  assert kept["step_seconds"] == 0.2
  assert kept["median_round_flops_per_second"] == (60e9 / 0.25 + 60e9 / 0.3) / 2  # failed rounds left out
  assert kept["round_flops_per_second"] == [60e9 / s for s in (0.3, 0.2, 0.25, 0.4)] + [None]  # in order
  failed = [{"dtype": "float32", "error": "boom"}]
  assert run.fastest_with_median(failed) == failed[0]

  def result(seconds, median_flops, arch, rounds):
    return {"dtype": "bfloat16", "arch": arch, "step_seconds": seconds, "tokens_per_second": 2048 / seconds,
            "model_flops_per_second": 60e9 / seconds, "median_round_flops_per_second": median_flops,
            "round_flops_per_second": [None if f is None else f * 1e9 for f in rounds]}

  # Ours 300 GFLOP/s fastest, 240 median; GPT-2 240 fastest, 160 median; EasyDeL 200 and 200,
  # the best median. Round by round the best peer gave 240, 200, 100 and nothing in round 4
  # (both failed), so ours was 1.0x, 1.5x, 1.5x the best peer of its round: 1.5x the median.
  rows = [("tiny", "t5x_like", result(0.2, 240e9, "ours", [240, 300, 150, 240])),
          ("tiny", "hf_flax_gpt2", result(0.25, 160e9, "gpt2", [240, 160, 100, None])),
          ("tiny", "easydel", result(0.3, 200e9, "llama", [200, 200, None, None]))]
  text = run.render(rows, {"float32": 400e9, "bfloat16": 800e9},
                    {"shape": "tiny", "batch": 1, "prompt_len": 1, "new_tokens": 1, "cached_tokens_per_second": 2.0,
                     "bfloat16_cached_tokens_per_second": 3.0, "uncached_tokens_per_second": 1.0},
                    {"setting": "packed", "real_tokens_per_second": 1.0, "padding": 0.0},
                    ["tiny"], "python bench/run.py", rounds=4, warmup=2)
  ours = next(line for line in text.splitlines() if line.startswith("| t5x_like |")).split(" | ")
  assert ours[7:10] == ["1.25x", "1.20x", "1.50x"]  # 300/240 fastest; 240/200 medians; same-round ratios
  assert run.same_round_ratio(rows[0][2], []) is None  # no peer ran: no ratio, not a division by zero
  # Peers timed in the other dtype block ran minutes or hours away: they are not the same round.
  other_block = [dict(peer, dtype="float32") for _, _, peer in rows[1:]]
  assert run.same_round_ratio(rows[0][2], other_block) is None
  assert run.same_round_ratio(dict(rows[0][2], dtype="float32, bf16 matmul inputs"), other_block) == 1.5
  assert text.count("Tiny decoder, greedy, batch 1") == 1
  assert "2 new tokens/s with the KV cache" in text and "(2x); in bfloat16, 3 with the KV cache." in text
  # Decoding or the data pipeline failing after the training rows, or none of ours running,
  # still renders the table rather than losing the run.
  text = run.render(rows[1:], {"float32": 400e9, "bfloat16": 800e9}, {"error": "boom"},
                    {"setting": "packed", "real_tokens_per_second": 5.0, "padding": 0.0},
                    ["tiny"], "python bench/run.py", rounds=4, warmup=2)
  assert "bench/decode_throughput.py failed: boom" in text and "packed: 5 real tokens/s (0.0% padding)." in text


def test_paired_steps_alternate_and_a_slow_spell_cancels_in_the_ratio(monkeypatch):
  paired = load_bench_script(monkeypatch, "paired_step")
  calls, now = [], [0.0]
  # Steps as fake clock ticks: B takes 1.1x A, and pairs 2 and 3 fall in a spell 3x as slow.
  duration = {"a": 1.0, "b": 1.1}

  def step(side):
    def call():
      calls.append(side)
      now[0] += duration[side] * (3.0 if len(calls) in (3, 4, 5, 6) else 1.0)
    return call

  seconds_a, seconds_b = paired.timed_pairs(step("a"), step("b"), 4, clock=lambda: now[0])
  assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # each pair's order flips
  np.testing.assert_allclose(seconds_a, [1.0, 3.0, 3.0, 1.0])
  result = paired.summary(seconds_a, seconds_b)
  assert abs(result["b_over_a"] - 1.1) < 1e-12 and np.allclose(result["quartiles"], [1.1, 1.1])
  assert np.isclose(result["a_median_ms"], 2000.0) and np.isclose(result["b_fastest_ms"], 1100.0)
  # Hand-worked ratios 1.1, 1.0, 0.9, 1.2: median 1.05; numpy's linear quartiles 0.975 and 1.125.
  result = paired.summary([1.0, 2.0, 1.0, 1.0], [1.1, 2.0, 0.9, 1.2])
  assert np.isclose(result["b_over_a"], 1.05) and np.allclose(result["quartiles"], [0.975, 1.125])


def test_profile_sums_cpu_worker_threads_or_gpu_streams_per_step(monkeypatch):
  profile_step = load_bench_script(monkeypatch, "profile_step")
  event = lambda name, ms: SimpleNamespace(name=name, duration_ns=ms * 1e6)  # noqa: E731
  line = lambda name, *events: SimpleNamespace(name=name, events=events)  # noqa: E731
  gpu = SimpleNamespace(name="/device:GPU:0", lines=[
      line("Stream #14(Compute,Memset)", event("gemm", 30), event("fusion.1", 4)),
      line("Stream #71(Compute)", event("gemm", 10)),
      line("XLA Modules", event("jit_train_step", 50))])  # a module's span, not a kernel
  host = SimpleNamespace(name="/host:CPU", lines=[line("python3", event("gemm", 99))])
  assert profile_step.op_seconds_per_step(SimpleNamespace(planes=[gpu, host]), steps=2) == pytest.approx({
      "gemm": 0.02, "fusion.1": 0.002})
  cpu = SimpleNamespace(name="/host:CPU", lines=[
      line("Eigen worker 0", event("ynn_fusion", 6), event("ThunkExecutor::Execute", 9)),
      line("Eigen worker 1", event("ynn_fusion", 2)), line("python3", event("ynn_fusion", 40))])
  seconds = profile_step.op_seconds_per_step(SimpleNamespace(planes=[cpu]), steps=1)
  assert seconds == pytest.approx({"ynn_fusion": 0.008})
