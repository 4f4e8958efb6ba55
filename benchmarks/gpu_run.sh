#!/usr/bin/env bash
# On the GPU machine (torch preinstalled, no package index), in the shipped working tree with
# .device/ carried (see benchmarks/device_bundle.sh): the issue-7 table, one run.
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
