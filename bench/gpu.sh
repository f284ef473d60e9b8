#!/usr/bin/env bash
# The GPU target of issue 7 as one prepared command for a lent NVIDIA machine: the GPU-only
# tests, the measured matmul peak, then the ~1B decoder's training step in bfloat16,
# initialised on the host unless said: ours (cuDNN attention, `auto`'s GPU choice; with remat
# "dots" if that fails, memory short), the revision in .base if one was carried (before/after
# in one run), the step's profile, ours initialised on the GPU (to time that compile), then
# the xla kernel.
#
#   here, once:  echo /.whl/ >> .git/info/exclude
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                  --implementation cp -d .whl ml-collections==1.1.0 \
#                  pytest pluggy iniconfig packaging pygments   # for the GPU-only tests
#   a baseline:  echo /.base/ >> .git/info/exclude; mkdir -p .base
#                git archive REVISION models t5x_like | tar -x -C .base
#   there:       the device tool's run, carrying .whl (and .base), timeout_s BUDGET + 30:
#                bash bench/gpu.sh
#
# Its image has jax, flax and optax but not ml-collections; use the image's jax and flax (in
# 2026-12 jax 0.11.2 with flax 0.12.10; our pinned flax 0.12.8 fails to import on that jax).
# Each result is a JSON line appended to $OUT/gpu.log, or the last lines of its error; each
# run's whole output, with JAX's compile times, goes to $OUT/run_<n>.log, the profile to
# $OUT/profile.log. The runs share BUDGET seconds (default 540) and one that would start with
# under a minute left is skipped (docs/performance.md, items 36 and 37).
# SHAPE=tiny STEPS=2 PEAK_SIZE=256 bash bench/gpu.sh runs the same sequence on a CPU.
set -u
out=${OUT:-.}
results=$out/gpu.log
export PYTHONUNBUFFERED=1 JAX_LOG_COMPILES=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
if command -v nvidia-smi > /dev/null && python3 -c "import pytest" 2> /dev/null; then
  # The tests that run only on a GPU (cuDNN's attention against ours), under this image's jax.
  JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider tests/models/test_fused_attention.py -k on_a_gpu 2>&1 | tail -n 2 | tee -a "$results"
fi
python3 bench/matmul_peak.py --size "${PEAK_SIZE:-8192}" | tee -a "$results"
runs=0
left() { echo $(( ${BUDGET:-540} - SECONDS )); }
run() {  # one measurement within what is left of the budget; fails when it fails or is skipped
  local left; left=$(left)
  runs=$((runs + 1))
  if [ "$left" -lt 60 ]; then echo "skipped $1: ${left} s left" | tee -a "$results"; return 1; fi
  # shellcheck disable=SC2086  # the options are words
  timeout "$left" python3 bench/train_throughput.py --shape "${SHAPE:-1b}" --dtype bfloat16 \
    --steps "${STEPS:-10}" $1 > "$out/run_$runs.log" 2>&1
  local status=$?
  { echo "run_$runs: $1, exit $status"; grep -v "^WARNING" "$out/run_$runs.log" | tail -n 3; } | tee -a "$results"
  return "$status"
}
run "--init-on-host" || run "--remat dots --init-on-host"
if [ -d .base ]; then T5X_LIKE_CODE_ROOT=$PWD/.base run "--attention-kernel cudnn --init-on-host"; fi
if [ "$(left)" -ge 60 ]; then
  timeout "$(left)" python3 bench/profile_step.py --shape "${SHAPE:-1b}" --dtype bfloat16 --init-on-host \
    --top 40 > "$out/profile.log" 2>&1
  { echo "profile: exit $?"; grep -A 14 "ms/step wall" "$out/profile.log"; } | tee -a "$results"
fi
run ""
run "--attention-kernel xla --init-on-host"
grep -H "Finished XLA compilation" "$out"/run_*.log | sed 's/.*\(run_[0-9]*\).log:.*compilation of /\1: /' | tee -a "$results"
