#!/usr/bin/env bash
# Oracle of feature/differential-attention on PithTrain: model.diff_attention in models/deepseek_v2.py (added by
# solve.py with ast-found anchors) and its test; a missing anchor or an existing test file stops it (exit 1).
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
SOL=${ATE_SOLUTION:-$(dirname "${BASH_SOURCE[0]}")}
[ ! -e tests/test_diff_attention.py ] || { echo "solve.sh: tests/test_diff_attention.py already exists" >&2; exit 1; }
"${PYTHON:-python3}" "$SOL/solve.py" pithtrain/models/deepseek_v2.py
cp "$SOL/files/tests/test_diff_attention.py" tests/test_diff_attention.py
