#!/usr/bin/env bash
# Oracle of operate/train-and-evaluate on TorchTitan: 30 steps through the workspace's run_train.sh with TorchTitan's
# own exporter on the last step (checkpoint.last_save_in_hf), then the export's config.json and its perplexity with
# transformers; all driven by solve.py.
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$(dirname "$0")/solve.py"
