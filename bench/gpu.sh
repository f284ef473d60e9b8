#!/usr/bin/env bash
# The GPU target of issue 7 as one prepared command for a lent NVIDIA machine: the measured
# bf16 matmul peak, then the ~1B decoder's training step in bfloat16 with the cudnn attention
# kernel, cudnn with remat "dots" if that run fails (memory short), then the xla kernel, each
# initialised on the host; last, cudnn initialised on the GPU, to time that compile.
#
#   here, once:  echo /.whl/ >> .git/info/exclude
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                  --implementation cp -d .whl ml-collections==1.1.0
#   there:       the device tool's run, carrying .whl, timeout_s BUDGET + 30:  bash bench/gpu.sh
#
# Its image has jax, flax and optax but not ml-collections; use the image's jax and flax (in
# 2026-12 jax 0.11.2 with flax 0.12.10; our pinned flax 0.12.8 fails to import on that jax).
# Each result is a JSON line appended to $OUT/gpu.log, or the last lines of its error; each
# run's whole output, with JAX's compile times, goes to $OUT/run_<n>.log. The runs share
# BUDGET seconds (default 540) and a run that would start with under a minute left is skipped:
# on the H200 of docs/performance.md item 36 compiling the 1b shape's initialisation alone took
# over two minutes, hence `--init-on-host` (train.init_on_host).
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
python3 bench/matmul_peak.py --size "${PEAK_SIZE:-8192}" | tee -a "$results"
runs=0
run() {  # one measurement within what is left of the budget; fails when it fails or is skipped
  local left=$(( ${BUDGET:-540} - SECONDS ))
  runs=$((runs + 1))
  if [ "$left" -lt 60 ]; then echo "skipped $1: ${left} s left" | tee -a "$results"; return 1; fi
  # shellcheck disable=SC2086  # the options are words
  timeout "$left" python3 bench/train_throughput.py --shape "${SHAPE:-1b}" --dtype bfloat16 \
    --steps "${STEPS:-10}" $1 > "$out/run_$runs.log" 2>&1
  local status=$?
  { echo "run_$runs: $1, exit $status"; grep -v "^WARNING" "$out/run_$runs.log" | tail -n 3; } | tee -a "$results"
  return "$status"
}
run "--attention-kernel cudnn --init-on-host" || run "--attention-kernel cudnn --remat dots --init-on-host"
run "--attention-kernel xla --init-on-host"
run "--attention-kernel cudnn"
grep -H "Finished XLA compilation" "$out"/run_*.log | sed 's/.*\(run_[0-9]*\).log:.*compilation of /\1: /' | tee -a "$results"
