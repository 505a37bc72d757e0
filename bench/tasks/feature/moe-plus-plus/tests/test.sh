#!/usr/bin/env bash
# Hidden verifier of a feature task. Usage: bash test.sh <workspace> <tests_dir> <out_dir>.
# The property tests run on the agent's workspace; the pristine framework ($ATE_BASELINE, else the workspace's
# first git commit) supplies the configs, its own tests, and the models the feature-off check compares with.
set -euo pipefail
WS=$1 TESTS=$2 OUT=$3
# No change against the baseline commit: the feature cannot be there (reward 0 without running the tests).
git_() { GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1 git -c safe.directory='*' -C "$WS" "$@"; }
if ROOT=$(git_ rev-list --max-parents=0 HEAD 2>/dev/null | tail -n 1) && [ -n "$ROOT" ] \
    && git_ diff --quiet "$ROOT" -- . && [ -z "$(git_ ls-files --others --exclude-standard)" ]; then
  echo '{"reward": 0.0, "reason": "the workspace is unchanged: no diff against the baseline commit"}' > "$OUT/reward.json"
  exit 0
fi
PY=${PYTHON:-python3}
WORK=$(mktemp -d "$OUT/../work.XXXXXX")
BASE=${ATE_BASELINE:-}
if [ -z "$BASE" ]; then
  BASE=$WORK/baseline && mkdir -p "$BASE"
  git_ archive "$(git_ rev-list --max-parents=0 HEAD | tail -n 1)" | tar -x -C "$BASE"
fi
export PITHTRAIN_CACHE=$WORK/cache  # tokenize the builtin data afresh, not from a cache the agent could touch
case "${ATE_FRAMEWORK_BASE:-pithtrain}" in
  pithtrain|torchtitan|megatron) exec "$PY" "$TESTS/feature_pytest.py" "$WS" "$BASE" "$OUT/reward.json" "$WORK" "$TESTS" ;;
  *) echo "${ATE_TASK:-feature task}: no verifier for framework ${ATE_FRAMEWORK_BASE}" >&2; exit 2 ;;
esac
