"""t5x_like: one readable JAX/Flax trainer for pretraining, tuning and scaling-law sweeps.

Importing the package sets one XLA:CPU default before any backend starts: YNNPACK runs
plain matmuls, but XLA's own loop fusions run the elementwise work. By default XLA:CPU
(jax 0.10) also fuses elementwise and reduction work into YNNPACK matmul fusions, and
the xla attention kernel's softmax backward then runs several times slower; keeping
YNNPACK for the matmuls keeps bf16 matmul inputs about twice as fast as float32
(docs/performance.md). Only the CPU backend reads xla_cpu_* flags, and flags already
in XLA_FLAGS come later and win; T5X_LIKE_XLA_DEFAULTS=0 leaves XLA_FLAGS alone.
"""

import os

CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
_flags = os.environ.get("XLA_FLAGS", "")
if os.environ.get("T5X_LIKE_XLA_DEFAULTS", "1") != "0" and CPU_XLA_FLAGS not in _flags:
  # Child processes (sweep workers, bench runners) inherit it already set.
  os.environ["XLA_FLAGS"] = f"{CPU_XLA_FLAGS} {_flags}".strip()
