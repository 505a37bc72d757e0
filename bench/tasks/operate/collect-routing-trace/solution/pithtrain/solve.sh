#!/usr/bin/env bash
# Oracle of operate/collect-routing-trace on PithTrain: trace_run.py trains 4 steps around the unchanged trainer
# and saves each step's routing (a forward hook), with checkpoints to recompute it from.
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
exec "${PYTHON:-python3}" "$(dirname "$0")/trace_run.py"
