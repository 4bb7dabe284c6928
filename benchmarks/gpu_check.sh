#!/usr/bin/env bash
# The device-machine check for CUDA state: GPU tests, then the blocking-time benchmark.
# Runs where torch (with CUDA), safetensors, numpy, xxhash and pytest are installed; no DVC needed.
set -u
out=${OUT:-/tmp}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, safetensors, xxhash; print('torch', torch.__version__)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -5
timeout 300 python3 benchmarks/gpu_async_save.py --gib 4.2 --runs 3 --json "$out/gpu_async.json" 2>&1 \
  | tee "$out/gpu_async.txt"
