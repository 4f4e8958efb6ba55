#!/usr/bin/env bash
# Packs what the GPU machine lacks (benchmarks/device-packages.txt) into .device/ (ignored by git,
# ~37 MB). DeepSpeed ships only as source: it is built into a wheel here, against the project's
# venv, hence the venv first on PATH. Then, with the device tool: carry [".device"] and run
#   bash benchmarks/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
test -x .venv/bin/python || make setup
PATH="$PWD/.venv/bin:$PATH" ../shared/tools/device-bundle $(grep -v '^#' benchmarks/device-packages.txt)
