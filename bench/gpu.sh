#!/usr/bin/env bash
# The GPU target of issue 7 as one prepared command for a lent NVIDIA machine: the measured
# bf16 matmul peak, then the ~1B decoder's training step in bfloat16 with the xla and the
# cudnn attention kernels, and cudnn with remat "dots" in case memory runs short.
#
#   here, once:  echo /.whl/ >> .git/info/exclude
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                  --implementation cp -d .whl ml-collections==1.1.0
#   there:       the device tool's run, carrying .whl:  bash bench/gpu.sh
#
# Its image has jax, flax and optax but not ml-collections. Each result is a JSON line, also
# appended to $OUT/gpu.log with the last lines of any error; a failed run does not stop the next.
# SHAPE=tiny STEPS=2 PEAK_SIZE=256 bash bench/gpu.sh runs the same sequence on a CPU.
set -u
results=${OUT:-.}/gpu.log
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
python3 bench/matmul_peak.py --size "${PEAK_SIZE:-8192}" | tee -a "$results"
for options in "--attention-kernel xla" "--attention-kernel cudnn" "--attention-kernel cudnn --remat dots"; do
  # shellcheck disable=SC2086  # the options are words
  timeout 240 python3 bench/train_throughput.py --shape "${SHAPE:-1b}" --dtype bfloat16 \
    --steps "${STEPS:-10}" $options 2>&1 | tail -n 3 | tee -a "$results"
done
