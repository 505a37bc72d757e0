#!/usr/bin/env bash
# Hidden verifier of feature/differential-attention. Usage: bash test.sh <workspace> <tests_dir> <out_dir>.
# The pristine framework ($ATE_BASELINE, else the workspace's first git commit) gives the reference logits of
# the unchanged model and the training config; everything else runs the agent's code from the workspace.
# Every framework: the shared test_differential_attention.py with tests/<framework>/probe.py, through
# feature_pytest.py (on PithTrain also the pristine framework's own tests, against the agent's code).
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
export ATE_FRAMEWORK_BASE=${ATE_FRAMEWORK_BASE:-pithtrain}
case "$ATE_FRAMEWORK_BASE" in
  pithtrain|torchtitan|megatron) ;;
  *) echo "differential-attention: no verifier for framework ${ATE_FRAMEWORK_BASE}" >&2; exit 2 ;;
esac
# The pristine framework's feature-off outputs, which test_unchanged_when_disabled compares with; failing here is ours.
export ATE_PRISTINE=$WORK/pristine.pt
if ! PYTHONPATH="$BASE" OMP_NUM_THREADS=1 "$PY" "$TESTS/test_differential_attention.py" pristine "$ATE_PRISTINE" \
    > "$WORK/pristine.log" 2>&1; then
  echo "verifier: the pristine reference failed:" >&2; tail -n 20 "$WORK/pristine.log" >&2; exit 1
fi
exec "$PY" "$TESTS/feature_pytest.py" "$WS" "$BASE" "$OUT/reward.json" "$WORK" "$TESTS"
