#!/usr/bin/env bash
# Oracle of operate/report-heavy-kernels on PithTrain: profile_step.py trains 3 steps around the unchanged
# trainer, profiles step 3 and writes the top-3 kernels CSV.
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
exec "${PYTHON:-python3}" "$(dirname "$0")/profile_step.py"
