"""The one benchmark command: this machine's matmul peak, our training throughput against it
and against the peer codebases side by side, decoding and data-pipeline throughput.

    python bench/run.py [--shapes tiny,medium,large] [--bf16-shapes tiny] [--steps 9] [--warmup 2]
                        [--rounds 2] [--peers maxtext,easydel,hf_flax_gpt2] [--baselines REV,REV]
                        [--archs default,gpt2,llama] [--dtypes float32,bfloat16]
                        [--venvs ~/.cache/t5x_like/bench_venvs] [--output docs/benchmarks.md]

Every training figure comes from a fresh process, all in this one run: bench/train_throughput.py
for us (our default, GPT-2 and LLaMA architectures; with bf16 matmul inputs; with XLA's own
CPU flags; with glibc's 4 KiB pages where every other runner gets huge pages; with the xla
attention or loss kernel; and each --baselines revision of us in the
same blocks, checked out into a temporary git worktree), bench/matmul_floor.py for the ceiling
of our step (its matmuls alone), bench/peers.py for the peers, each in its own virtual
environment. The runners of a shape take turns for --rounds rounds and each keeps its fastest
round, so a slow spell of a shared machine does not land on one runner only (the table also
gives each runner's median round, and its ratio to the best peer of the same round); the
matmul peak is measured before every round and the highest kept, so no runner's share of it
rests on a slow spell.
Writes the tables to docs/benchmarks.md (--output) with the command that made them.
--archs and --dtypes narrow our runners to the rows in question, so a disputed row can be
run again beside its peer for more rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Importing t5x_like here must not put its XLA:CPU flags into the environment every runner
# inherits: each runner process chooses its own (see run_json).
os.environ["T5X_LIKE_XLA_DEFAULTS"] = "0"
sys.path.insert(0, str(ROOT / "bench"))

import jax  # noqa: E402

import data_pipeline  # noqa: E402
import peers  # noqa: E402
from t5x_like.host_memory import TUNABLE, huge_pages_available, with_huge_pages  # noqa: E402
from train_throughput import ARCHS, SHAPES, VOCAB, WARMUP_STEPS  # noqa: E402

XLA_OWN_FLAGS = {"T5X_LIKE_XLA_DEFAULTS": "0"}
# Every runner, the peers too, gets the huge-page tunable the `t5x-like` command gives itself:
# it speeds up any jax program on CPU (Hugging Face's GPT-2 1.47x at the tiny shape,
# docs/performance.md item 24), so it belongs to the machine, not to one codebase.
# main() adds it to os.environ, which every runner inherits.
SMALL_PAGES = {"GLIBC_TUNABLES": ":".join(
    t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.malloc.hugetlb"))}


def run_json(command: list[str], env: dict | None = None, timeout: float = 1800) -> dict:
  """Runs a bench worker of ours and returns the JSON line it prints last."""
  result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "T5X_LIKE_XLA_DEFAULTS": "1", **(env or {})}, cwd=ROOT)
  if result.returncode:
    raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr[-2000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def ours(shape: str, dtype: str, steps: int, warmup: int, arch: str = "default", env: dict | None = None,
         attention_kernel: str | None = None, loss_kernel: str | None = None,
         bf16_matmul_inputs: bool = False) -> dict:
  options = ["--attention-kernel", attention_kernel] if attention_kernel else []
  options += ["--loss-kernel", loss_kernel] if loss_kernel else []
  options += ["--bf16-matmul-inputs"] if bf16_matmul_inputs else []
  return run_json([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--shape", shape,
                   "--dtype", dtype, "--steps", str(steps), "--warmup", str(warmup), "--arch", arch, *options],
                  env=env)


def matmul_floor(shape: str, steps: int, warmup: int, bf16_matmul_inputs: bool) -> dict:
  options = ["--bf16-matmul-inputs"] if bf16_matmul_inputs else []
  result = run_json([sys.executable, str(ROOT / "bench" / "matmul_floor.py"), "--shape", shape,
                     "--repeats", str(steps), "--warmup", str(warmup), *options])
  return {**result, "arch": "our default block's matmuls, nothing else"}


def seconds(result: dict) -> float:
  """A runner's step time; a failed run counts as infinitely slow."""
  return result.get("step_seconds", float("inf"))


def fastest_with_median(rounds: list[dict]) -> dict:
  """A runner's fastest round, carrying the median of its rounds' model FLOP/s and every
  round's figure (None where that round failed) as well.

  The fastest round reads past a shared machine's slow spells; the median says what a
  typical round gave. Where the two verdicts differ, the fastest round alone would flatter.
  The rounds in order let `same_round_ratio` compare runners timed minutes apart.
  """
  done = [result for result in rounds if "error" not in result]
  if not done:
    return rounds[-1]
  return {**min(done, key=seconds),
          "median_round_flops_per_second": statistics.median(r["model_flops_per_second"] for r in done),
          "round_flops_per_second": [r.get("model_flops_per_second") for r in rounds]}


def matmul_peaks() -> dict[str, float]:
  """The better of XLA's own CPU flags and ours, per dtype (see bench/matmul_peak.py)."""
  command = [sys.executable, str(ROOT / "bench" / "matmul_peak.py")]
  runs = [run_json(command), run_json(command, env=XLA_OWN_FLAGS)]
  return {dtype: max(run[dtype] for run in runs) for dtype in ("float32", "bfloat16")}


def baseline_tree(revision: str, parent: pathlib.Path) -> pathlib.Path:
  """A detached git worktree of the revision, so an older trainer runs with today's bench script."""
  path = parent / revision
  result = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), revision],
                          capture_output=True, text=True)
  if result.returncode:
    raise SystemExit(f"--baselines {revision}: git worktree add failed: {result.stderr.strip()}")
  return path


def cpu_name() -> str:
  """The CPU's model name and the vector extensions that set its matmul speed.

  Virtual machines often report a bare "AMD EPYC"; the extensions tell an AVX2 Zen 3 from an
  AVX-512 Zen 5 with bf16 dot products, whose figures differ fourfold.
  """
  info = {}
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else ():
    if not line.strip():
      break  # the first processor describes them all
    key, _, value = line.partition(":")
    info[key.strip()] = value.strip()
  name = info.get("model name") or platform.processor() or platform.machine()
  flags = set(info.get("flags", "").split())
  extensions = [label for flag, label in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
                                          ("amx_tile", "AMX")) if flag in flags]
  if "cpu family" in info:
    name += f", family {info['cpu family']} model {info.get('model', '?')}"
  return f"{name}; {', '.join(extensions)}" if extensions else name


def cpu_times() -> list[int]:
  """The machine's CPU time counters (/proc/stat), empty where there are none."""
  stat = pathlib.Path("/proc/stat")
  return [int(value) for value in stat.read_text().split("\n", 1)[0].split()[1:9]] if stat.exists() else []


def steal_share(before: list[int], after: list[int]) -> float | None:
  """The share of CPU time the hypervisor gave other guests between two cpu_times() readings.

  On a shared VM stolen time slows whichever runners it lands on, so the table states it (it is
  not all the noise: a run with 0% steal still saw rounds differ by a fifth, performance.md item 16).
  """
  if not before or not after:
    return None
  deltas = [b - a for a, b in zip(before, after)]
  return deltas[7] / sum(deltas) if sum(deltas) else None


def shape_runners(shape: str, dtype: str, args, trees: dict) -> list:
  """(label, measure) for every runner of one shape and dtype, in the order they take turns.

  Our blocks in --archs; in float32 also the variants (bf16 matmul inputs for the GPT-2 and
  LLaMA blocks; XLA's flags, small pages, the xla kernels and the matmul floors for the
  default block); then each baseline revision in each block of --archs, and each peer.
  """
  archs, timing = args.archs.split(","), (args.steps, args.warmup)
  runners = [("t5x_like", lambda arch=arch: ours(shape, dtype, *timing, arch)) for arch in archs]
  if dtype == "float32":
    runners += [("t5x_like", lambda arch=arch: ours(shape, dtype, *timing, arch, bf16_matmul_inputs=True))
                for arch in ("gpt2", "llama") if arch in archs]
    if "default" in archs:
      runners += [("t5x_like, XLA's own CPU flags", lambda: ours(shape, dtype, *timing, env=XLA_OWN_FLAGS))]
      if TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):  # main() turned huge pages on
        runners += [("t5x_like, glibc's 4 KiB pages", lambda: ours(shape, dtype, *timing, env=SMALL_PAGES))]
      runners += [("t5x_like, xla attention kernel", lambda: ours(shape, dtype, *timing, attention_kernel="xla")),
                  ("t5x_like, xla loss kernel", lambda: ours(shape, dtype, *timing, loss_kernel="xla"))]
      runners += [("matmul floor", lambda bf16=bf16: matmul_floor(shape, *timing, bf16)) for bf16 in (False, True)]
  runners += [(f"t5x_like@{rev}", lambda tree=tree, arch=arch: ours(
      shape, dtype, *timing, arch, env={"T5X_LIKE_CODE_ROOT": str(tree)})) for rev, tree in trees.items()
      for arch in archs]
  runners += [(name, lambda name=name: peers.run_peer(
      name, SHAPES[shape], VOCAB, dtype, *timing, args.venvs)) for name in args.peers.split(",") if name]
  return runners


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", default="tiny,medium,large")
  parser.add_argument("--bf16-shapes", default="tiny", help="shapes also run in bfloat16 (all run float32)")
  parser.add_argument("--archs", default=",".join(ARCHS), help="which of our blocks to run")
  parser.add_argument("--dtypes", default="float32,bfloat16", help="bfloat16 runs on --bf16-shapes only")
  parser.add_argument("--steps", type=int, default=9)
  parser.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="untimed steps after compilation, every runner")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--peers", default=",".join(peers.PEERS))
  parser.add_argument("--baselines", default="", help="comma-separated git revisions of this repo")
  parser.add_argument("--venvs", default=str(peers.DEFAULT_CACHE_DIR))
  parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
  args = parser.parse_args()
  if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
    parser.error("--rounds and --steps must be at least 1, --warmup at least 0")
  shapes, dtypes = args.shapes.split(","), args.dtypes.split(",")
  bf16_shapes = [shape for shape in args.bf16_shapes.split(",") if shape]
  choices = (("--shapes", shapes, SHAPES), ("--bf16-shapes", bf16_shapes, SHAPES),
             ("--archs", args.archs.split(","), ARCHS), ("--dtypes", dtypes, ("float32", "bfloat16")),
             ("--peers", [p for p in args.peers.split(",") if p], peers.PEERS))
  for option, values, known in choices:
    if not set(values) <= set(known):
      parser.error(f"{option} takes some of {','.join(known)}; got {','.join(values)}")
  revisions = [r for r in args.baselines.split(",") if r]
  if jax.default_backend() != "cpu":  # the peers and the matmul peak are CPU runs
    parser.error(f"bench/run.py compares runs on the CPU, and this backend is {jax.default_backend()!r}; "
                 f"on a GPU use bench/gpu.sh")
  os.environ.update(with_huge_pages(dict(os.environ)))

  start_times = cpu_times()
  peak = {"float32": 0.0, "bfloat16": 0.0}  # measured again before every round

  rows = []  # (shape, runner, result or error)
  with tempfile.TemporaryDirectory() as scratch:
    trees = {}
    try:
      for rev in revisions:
        trees[rev] = baseline_tree(rev, pathlib.Path(scratch))
      for shape in shapes:
        for dtype in [d for d in dtypes if d == "float32" or shape in bf16_shapes]:
          runners = shape_runners(shape, dtype, args, trees)
          results: list[list[dict]] = [[] for _ in runners]
          for _ in range(args.rounds):
            # A shared VM's speed drifts by tens of percent between spells; the highest peak
            # seen in the run keeps `of peak` from flattering a runner timed in a slow spell.
            try:
              peak = {dtype: max(peak[dtype], again) for dtype, again in matmul_peaks().items()}
            except Exception as error:  # the rows measured so far outweigh one round's peak
              print(f"matmul peak not measured this round ({str(error).strip().splitlines()[-1][:200]}); "
                    f"keeping the highest so far", flush=True)
            print(f"matmul peak so far: f32 {peak['float32'] / 1e9:.0f} GFLOP/s, bf16 inputs + f32 "
                  f"accumulation {peak['bfloat16'] / 1e9:.0f} GFLOP/s", flush=True)
            for i, (runner, measure) in enumerate(runners):
              try:
                result = measure()
              except Exception as error:  # one failing peer must not lose the others' figures
                result = {"dtype": dtype, "error": str(error).strip().splitlines()[-1][:200]}
              print(shape, runner, json.dumps(result), flush=True)
              results[i].append(result)
          rows += [(shape, runner, fastest_with_median(rounds)) for (runner, _), rounds in zip(runners, results)]
    finally:
      for tree in trees.values():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)

  # The training rows took the most time: a failure from here on must not lose them.
  try:
    decode = run_json([sys.executable, str(ROOT / "bench" / "decode_throughput.py")])
  except Exception as error:
    decode = {"error": str(error).strip().splitlines()[-1][:200]}
  try:
    data = data_pipeline.measure()
  except Exception as error:
    data = {"error": str(error).strip().splitlines()[-1][:200]}
  command = " ".join(["python", "bench/run.py", *sys.argv[1:]])
  steal = steal_share(start_times, cpu_times())
  text = render(rows, peak, decode, data, shapes, command, args.rounds, args.warmup, steal)
  pathlib.Path(args.output).write_text(text)
  print(text)


def median_round(result: dict) -> float:
  """The median of a runner's rounds' model FLOP/s (a result without rounds is its own median)."""
  return result.get("median_round_flops_per_second", result["model_flops_per_second"])


def block(result: dict) -> str:
  """The dtype block a runner was timed in ('float32, bf16 matmul inputs' runs with float32)."""
  return result["dtype"].split(",")[0]


def same_round_ratio(result: dict, peer_results: list[dict]) -> float | None:
  """The median over rounds of a runner's model FLOP/s over the best peer's in the same round.

  A round's runners run within minutes of each other, so a machine that drifts between
  spells (its matmul peak moved 5% between two runs, performance.md item 29) moves both
  sides of each ratio alike; rounds where the runner or every peer failed are left out.
  Only the peers of the runner's own dtype block share its rounds: a shape's float32 rounds
  all run before its bfloat16 ones.
  """
  peer_results = [p for p in peer_results if block(p) == block(result)]
  ratios = []
  for ours, *peers_then in zip(result["round_flops_per_second"], *(p["round_flops_per_second"] for p in peer_results)):
    best = max(filter(None, peers_then), default=None)
    if ours and best:
      ratios.append(ours / best)
  return statistics.median(ratios) if ratios else None


def share_of_peak(result: dict, peak: dict) -> str:
  """Model FLOP/s over the f32 matmul peak; rows with bf16 matmuls also over the bf16 peak."""
  if not peak["float32"] or not peak["bfloat16"]:
    return "n/a (no peak measured)"
  f32 = f"{result['model_flops_per_second'] / peak['float32']:.0%}"
  if "bf" not in result["dtype"]:
    return f32
  return f"{f32} f32, {result['model_flops_per_second'] / peak['bfloat16']:.0%} bf16"


def render(rows, peak, decode, data, shapes, command, rounds, warmup, steal=None) -> str:
  lines = [
      "# Benchmarks",
      "",
      f"Measured {datetime.date.today()} on {cpu_name()} ({os.cpu_count()} cores; jax {jax.__version__}, "
      f"{jax.devices()[0].platform}), all in one run of:",
      "",
      f"    {command}",
      "",
      f"Matmul peak (2048^3, best of 9, measured before every round, the highest kept): "
      f"**f32 {peak['float32'] / 1e9:.0f} GFLOP/s**; bf16 inputs with f32 accumulation "
      f"{peak['bfloat16'] / 1e9:.0f} GFLOP/s."
      + (f" The hypervisor took {steal:.0%} of the CPU time during the run (steal, /proc/stat)."
         if steal is not None else ""),
      "",
      "## Training throughput, side by side",
      "",
      "Model FLOPs by PaLM's count (app. B) for each runner's own architecture: 6 x matmul parameters "
      "(vocabulary projection included) + 12 x layers x context x attention width, per token; "
      f"recomputation not counted. Median step time after compilation and {warmup} untimed steps, each "
      "runner in a fresh process. "
      "`of peak` divides model FLOP/s by the f32 matmul peak above, and rows whose matmuls take bf16 "
      "inputs also by the bf16 peak; `vs best peer` divides by the "
      "fastest peer's model FLOP/s on the same shape (any dtype), `vs same-architecture peer` by the "
      "fastest peer running the same block (gpt2 or llama). The `matmul floor` rows time only the "
      "matmuls of our default block's step (bench/matmul_floor.py): no step of that block whose matmuls "
      "go through XLA can beat them. "
      + ("Every runner, ours and the peers, runs with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, as the "
         "`t5x-like` command restarts itself (t5x_like/host_memory.py); the `glibc's 4 KiB pages` row "
         "runs without it. " if huge_pages_available() else "")
      + (f"Each runner's fastest of {rounds} rounds taken in turns; `median rounds vs best peer` divides "
         "the median of a runner's rounds by the best such median among the peers, `same-round vs best "
         "same-dtype peer` is the median over rounds of a runner's FLOP/s over the best peer's of the same "
         "dtype in that round "
         "(a shape's float32 rounds run before its bfloat16 ones)." if rounds > 1 else
         "Each runner ran once, in turn."),
  ]
  for shape in shapes:
    s = SHAPES[shape]
    lines += ["", f"### {shape}: d_model {s['emb_dim']}, {s['num_layers']} layers, {s['num_heads']} heads, "
              f"ffn {s['mlp_dim']}, seq {s['seq_len']}, batch {s['batch_size']}, vocab {VOCAB}", "",
              "| runner | architecture | dtype | ms/step | tokens/s | GFLOP/s | of peak | vs best peer "
              "| median rounds vs best peer | same-round vs best same-dtype peer | vs same-architecture peer |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    shape_rows = [(runner, r) for sh, runner, r in rows if sh == shape]
    peer_results = [r for runner, r in shape_rows if runner in peers.PEERS and "error" not in r]
    best_peer = max((r["model_flops_per_second"] for r in peer_results), default=None)
    best_peer_median = max(map(median_round, peer_results), default=None)
    for runner, r in shape_rows:
      if "error" in r:
        lines.append(f"| {runner} | | {r['dtype']} | failed: {r['error']} | | | | | | | |")
        continue
      versus = f"{r['model_flops_per_second'] / best_peer:.2f}x" if best_peer else "n/a"
      versus_median = f"{median_round(r) / best_peer_median:.2f}x" if best_peer_median else "n/a"
      paired = same_round_ratio(r, peer_results)
      versus_paired = f"{paired:.2f}x" if paired else "n/a"
      same = [p["model_flops_per_second"] for name, p in shape_rows if name in peers.PEERS
              and "error" not in p and p["arch"].split(":")[0] == r.get("arch", "").split(":")[0]]
      versus_same = (f"{r['model_flops_per_second'] / max(same):.2f}x"
                     if same and runner.startswith("t5x_like") else "")
      if "version" in r:
        runner = f"{runner} {r['version']} (jax {r['jax']})"
      lines.append(f"| {runner} | {r.get('arch', '')} | {r['dtype']} | {r['step_seconds'] * 1e3:.0f} | "
                   f"{r['tokens_per_second']:,.0f} | {r['model_flops_per_second'] / 1e9:.0f} | "
                   f"{share_of_peak(r, peak)} | {versus} | {versus_median} | {versus_paired} | {versus_same} |")
  lines += ["", "## Decoding", "", decoding_summary(decode), "", "## Data pipeline", "", data_summary(data, rows), ""]
  return "\n".join(lines)


def decoding_summary(decode: dict) -> str:
  if "error" in decode:
    return f"bench/decode_throughput.py failed: {decode['error']}"
  return (f"{decode['shape'].capitalize()} decoder, greedy, batch {decode['batch']}, prompt {decode['prompt_len']}, "
          f"{decode['new_tokens']} new tokens, best of 3 after compilation: "
          f"{decode['cached_tokens_per_second']:,.0f} new tokens/s with the KV cache "
          f"(`t5x_like.decoding.generate`) against {decode['uncached_tokens_per_second']:,.0f} rerunning the "
          f"full forward pass per token "
          f"({decode['cached_tokens_per_second'] / decode['uncached_tokens_per_second']:.0f}x); "
          f"in bfloat16, {decode['bfloat16_cached_tokens_per_second']:,.0f} with the KV cache.")


def data_summary(data: dict, rows) -> str:
  if "error" in data:
    return f"bench/data_pipeline.py failed: {data['error']}"
  fastest = max((r["tokens_per_second"] for _, runner, r in rows if runner.startswith("t5x_like") and "error" not in r),
                default=None)
  versus = f", {data['real_tokens_per_second'] / fastest:.0f}x the fastest training run above" if fastest else ""
  return (f"{data['setting']}: {data['real_tokens_per_second']:,.0f} real tokens/s "
          f"({data['padding']:.1%} padding){versus}.")


if __name__ == "__main__":
  main()
