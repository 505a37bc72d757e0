#!/usr/bin/env bash
# Hidden verifier of operate/train-and-evaluate. Usage: bash test.sh <workspace> <tests_dir> <out_dir>.
# The check runs the framework's pristine code ($ATE_BASELINE, else the workspace's first git commit) and
# recomputes what it checks, so edits the agent made to the framework cannot vouch for its own outputs.
set -euo pipefail
WS=$1 TESTS=$2 OUT=$3
PY=${PYTHON:-python3}
WORK=$(mktemp -d "$OUT/../work.XXXXXX")
BASE=${ATE_BASELINE:-}
if [ -z "$BASE" ]; then
  BASE=$WORK/baseline && mkdir -p "$BASE"
  git_() { GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1 git -c safe.directory='*' -C "$WS" "$@"; }
  git_ archive "$(git_ rev-list --max-parents=0 HEAD | tail -n 1)" | tar -x -C "$BASE"
fi
export PITHTRAIN_CACHE=$WORK/cache  # tokenize the builtin data afresh, not from a cache the agent could touch
case "${ATE_FRAMEWORK_BASE:-pithtrain}" in
  pithtrain) exec "$PY" "$TESTS/pithtrain/check.py" "$WS" "$BASE" "$OUT/reward.json" ;;
  torchtitan|megatron) exec "$PY" "$TESTS/$ATE_FRAMEWORK_BASE/check.py" "$WS" "$BASE" "$OUT/reward.json" ;;
  *) echo "train-and-evaluate: no verifier for framework ${ATE_FRAMEWORK_BASE}" >&2; exit 2 ;;
esac
