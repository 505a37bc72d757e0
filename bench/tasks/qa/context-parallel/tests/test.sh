#!/usr/bin/env bash
# Hidden verifier of a Q&A task: grade the agent's final message against tests/keys/<framework>.toml.
# Usage: bash test.sh <workspace> <tests_dir> <out_dir>; the answer is $ATE_ANSWER (default
# <tests_dir>/../answer.md); qa_keys.py is put beside this script by the harness (bench/harness/verifier.py).
set -euo pipefail
WS=$1 TESTS=$2 OUT=$3
exec "${PYTHON:-python3}" "$TESTS/qa_keys.py" score --key "$TESTS/keys/${ATE_FRAMEWORK_BASE:-pithtrain}.toml" \
  --workspace "$WS" --answer "${ATE_ANSWER:-$TESTS/../answer.md}" --out "$OUT/reward.json"
