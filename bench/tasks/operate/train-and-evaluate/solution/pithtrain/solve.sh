#!/usr/bin/env bash
# Oracle of operate/train-and-evaluate on PithTrain: train 30 steps, export with pithtrain.convert, evaluate the
# export with transformers; all in solve.py, one process.
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
exec "${PYTHON:-python3}" "$(dirname "$0")/solve.py"
