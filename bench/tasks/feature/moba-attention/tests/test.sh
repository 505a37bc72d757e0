#!/usr/bin/env bash
# Hidden verifier of feature/moba-attention. Usage: bash test.sh <workspace> <tests_dir> <out_dir>.
# The pristine framework ($ATE_BASELINE, else the workspace's first git commit) gives the reference logits of
# the unchanged model and the training config; everything else runs the agent's code from the workspace.
# Every framework: the shared property tests test_moba.py through feature_pytest.py, with tests/<framework>/probe.py
# ($PYTHON also runs TorchTitan's training; on PithTrain feature_pytest.py also runs the framework's own tests).
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
  *) echo "moba-attention: no verifier for framework ${ATE_FRAMEWORK_BASE}" >&2; exit 2 ;;
esac
