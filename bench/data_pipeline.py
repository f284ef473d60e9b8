"""Data pipeline throughput: batches of the bundled corpus per second, as the trainer draws them.

    python bench/data_pipeline.py [--objective causal_lm] [--batches 300] [--seq-len 256]
                                  [--batch-size 8] [--worker-threads 0] [--no-pack]

Times `--batches` batches after a warm-up of 20 (the TFDS build and the first fills of the
prefetch buffers are not timed) and prints row tokens/s (every position of every row) and
real tokens/s (positions holding a token, segment id > 0), the share of padding, and the
loader's counts of documents split into chunks.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t5x_like.data.config import default_data_config  # noqa: E402
from t5x_like.data.loader import make_loader  # noqa: E402

WARMUP_BATCHES = 20


def measure(objective: str = "causal_lm", batches: int = 300, seq_len: int = 256, batch_size: int = 8,
            worker_threads: int = 0, pack: bool = True) -> dict:
  config = default_data_config()
  config.update(objective=objective, seq_len=seq_len, batch_size=batch_size,
                worker_threads=worker_threads, pack=pack)
  with tempfile.TemporaryDirectory() as data_dir:
    config.data_dir = data_dir
    loader = make_loader(config, "train")
    for _ in range(WARMUP_BATCHES):
      next(loader)
    row_tokens = real_tokens = 0
    start = time.perf_counter()
    for _ in range(batches):
      batch = next(loader)
      segment_ids = [v for k, v in batch.items() if k.endswith("segment_ids")]
      row_tokens += sum(s.size for s in segment_ids)
      real_tokens += sum(int(np.count_nonzero(s)) for s in segment_ids)
    seconds = time.perf_counter() - start
    stats = loader.stats()
    loader.close()
  lengths = (f"input_len {config.input_len}, target_len {config.target_len}"
             if objective == "span_corruption" else f"seq_len {seq_len}")
  return {"setting": f"{objective}, {lengths}, batch {batch_size}, {'packed' if pack else 'padded'}, "
                     f"{worker_threads} worker threads",
          "batches": batches, "seconds": seconds, "row_tokens_per_second": row_tokens / seconds,
          "real_tokens_per_second": real_tokens / seconds, "padding": 1 - real_tokens / row_tokens,
          "documents": stats.get("documents", 0), "split_documents": stats.get("split_documents", 0)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--objective", default="causal_lm")
  parser.add_argument("--batches", type=int, default=300)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--worker-threads", type=int, default=0)
  parser.add_argument("--no-pack", action="store_true")
  args = parser.parse_args()
  r = measure(args.objective, args.batches, args.seq_len, args.batch_size, args.worker_threads,
              not args.no_pack)
  print(f"{r['setting']}: {r['batches']} batches in {r['seconds']:.2f} s")
  print(f"  {r['row_tokens_per_second']:,.0f} row tokens/s, {r['real_tokens_per_second']:,.0f} real tokens/s "
        f"({r['padding']:.1%} padding)")
  print(f"  documents read {r['documents']}, split into chunks {r['split_documents']} "
        "(read ahead of the timed batches included)")


if __name__ == "__main__":
  main()
