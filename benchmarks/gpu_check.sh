#!/usr/bin/env bash
# The device-machine check for CUDA state: GPU tests, the blocking-time benchmark, then the delta
# size benchmark of the ~110M-parameter LM on that machine's cores and disk.
# Runs where torch (with CUDA), safetensors, numpy, xxhash, zstandard and pytest are installed;
# no DVC needed.
set -u
out=${OUT:-/tmp}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc
python3 -c "import torch, safetensors, xxhash, zstandard; print('torch', torch.__version__)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -5
timeout 240 python3 benchmarks/gpu_async_save.py --gib 4.2 --runs 3 --json "$out/gpu_async.json" 2>&1 \
  | tee "$out/gpu_async.txt"
timeout 150 python3 benchmarks/delta_size.py --model lm --saves 6 2>&1 | tee "$out/delta_lm.txt"
