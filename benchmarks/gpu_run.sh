#!/usr/bin/env bash
# On the GPU machine (torch preinstalled, no package index), in the shipped working tree with
# .device/ carried (see benchmarks/device_bundle.sh): the issue-7 table and the issue-16 plan check, one run.
#   bash benchmarks/gpu_run.sh [extra gpu_mfu.py args, e.g. --rows compile,ds2c,ds3c,ours2,ours3]
set -uo pipefail
cd "$(dirname "$0")/.."
source .device/install.sh
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, ray, deepspeed; print('torch', torch.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__)" \
    | tee -a "$out/gpu.txt"
python3 benchmarks/gpu_mfu.py --shape gpt2-small --json "$out/gpu_mfu.json" "$@" 2>&1 | tee "$out/gpu_mfu.log"
# Issue 16: the plan's per-GPU memory vs torch.cuda.max_memory_allocated, gpt-125m at ZeRO 0-3 (~1-2 min).
python3 benchmarks/plan_gpu.py --preset gpt-125m --micro 8 --set trainer.compile=false \
    --json "$out/plan_gpu.json" 2>&1 | tee "$out/plan_gpu.log"
