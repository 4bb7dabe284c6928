#!/usr/bin/env bash
# The main job: set up, then run the demo pipeline (prepare -> train -> evaluate) on the CPU with
# the embedded default remote (a local directory), push the checkpoints there and verify them.
# Run it again after an interruption (Ctrl-C, kill): training continues from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh demo
. .venv/bin/activate
modelver init
dvc repro
dvc push
dvc metrics show
modelver verify checkpoints
