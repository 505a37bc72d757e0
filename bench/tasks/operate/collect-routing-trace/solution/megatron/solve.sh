#!/usr/bin/env bash
# Oracle of operate/collect-routing-trace on Megatron-Core: trace_run.py is the workspace's launch entry, unchanged,
# with a forward hook on every router and its train_step wrapped to mark the steps.
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
exec "${PYTHON:-python3}" "$(dirname "$0")/trace_run.py"
