#!/usr/bin/env bash
# On a lent GPU machine (the device tool): W48-C forward and train step against the PyTorch statement on
# the same GPU, float32 and bfloat16, at the IDRiD training crop (960x1440) and global batch 4. Run
# benchmarks/gpu_wheels.sh here first, then carry .whl:
#   run(command='bash benchmarks/gpu.sh', carry=['.whl'], timeout_s=600)
# The figures also go to $OUT/gpu.txt. Each benchmark has its own time limit, so that one that hangs
# leaves the others their time. JAX allocates on demand (no 75% preallocation), so that PyTorch in the
# same process has the rest of the GPU's memory. Float32 rows are each side at its default precision:
# XLA's DEFAULT and cuDNN's allow_tf32 may both use TF32 for float32 convolutions.
# WIDTH, SIZE and BATCH (default 48, 960x1440, 4) shrink it for a rehearsal on a CPU, in a Python 3.12
# environment with the machine's packages (KINDS.md's list: jax 0.11.2, numpy 2.5.2, torch 2.11):
#   WIDTH=18 SIZE=128x192 BATCH=2 bash benchmarks/gpu.sh
set -uo pipefail
WIDTH=${WIDTH:-48} SIZE=${SIZE:-960x1440} BATCH=${BATCH:-4}
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import m2mrf_jax, jax, flax, torch; print("jax", jax.__version__, jax.devices(),
    "flax", flax.__version__, "torch", torch.__version__, torch.cuda.is_available())'
  timeout 120 python3 benchmarks/model_forward.py --variants=c --width="$WIDTH" --sizes="$SIZE" \
      --batch="$BATCH" --repeats=10
  timeout 120 python3 benchmarks/model_forward.py --variants=c --width="$WIDTH" --sizes="$SIZE" \
      --batch="$BATCH" --repeats=10 --bf16
  timeout 320 python3 benchmarks/train_step.py --variants=c --width="$WIDTH" --crop="$SIZE" \
      --batch="$BATCH" --steps=10 --bf16=both
} 2>&1 | tee "${OUT:-/tmp}/gpu.txt"
