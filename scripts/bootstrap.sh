#!/usr/bin/env bash
# Create .venv and install modelver with an extra ("test" by default, "demo" for the pipeline).
# The CPU build of torch goes in first: a bare torch requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=${1:-test}
# The Git LFS backend's tests need git-lfs, the HTML report's test a headless Chromium (Debian
# packages); install them where we may.
if [ "$extra" = test ]; then
  need=()
  git lfs version >/dev/null 2>&1 || need+=(git-lfs)
  command -v chromium >/dev/null || need+=(chromium)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
    else
      echo "note: install ${need[*]} (e.g. 'sudo apt-get install ${need[*]}') for the tests" >&2
    fi
  fi
fi
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[$extra]"
