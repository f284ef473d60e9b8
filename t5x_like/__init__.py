"""t5x_like: one readable JAX/Flax trainer for pretraining, tuning and scaling-law sweeps.

Importing the package sets one XLA:CPU default before any backend starts. By default
XLA:CPU (jax 0.10) fuses elementwise and reduction work into YNNPACK matmul fusions; in
training steps those fusions, the attention softmax backward above all, run several
times slower than Eigen's matmuls beside XLA's own loop fusions (docs/benchmarks.md
measures both). Only the CPU backend reads xla_cpu_* flags, and flags already in
XLA_FLAGS come later and win; T5X_LIKE_XLA_DEFAULTS=0 leaves XLA_FLAGS alone. Float32 is
the compute dtype to use on CPU with this setting: bf16 matmuls are fast there only
through YNNPACK.
"""

import os

CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="
_flags = os.environ.get("XLA_FLAGS", "")
if os.environ.get("T5X_LIKE_XLA_DEFAULTS", "1") != "0" and CPU_XLA_FLAGS not in _flags:
  # Child processes (sweep workers, bench runners) inherit it already set.
  os.environ["XLA_FLAGS"] = f"{CPU_XLA_FLAGS} {_flags}".strip()
