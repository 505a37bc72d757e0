#!/usr/bin/env bash
# Oracle of feature/moba-attention on PithTrain: a new operator (pithtrain/ops/moba.py, with its test) and
# model.moba_block_size / model.moba_topk in models/deepseek_v2.py, added by solve.py with ast-found anchors;
# a missing anchor or an existing file of the same name stops it (exit 1).
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
SOL=${ATE_SOLUTION:-$(dirname "${BASH_SOURCE[0]}")}
for f in pithtrain/ops/moba.py tests/test_moba.py tests/test_moba_model.py; do
  [ ! -e "$f" ] || { echo "solve.sh: $f already exists" >&2; exit 1; }
done
"${PYTHON:-python3}" "$SOL/solve.py" pithtrain/models/deepseek_v2.py
cp "$SOL/shared/moba.py" pithtrain/ops/moba.py  # the operator and its tests, the same on every framework
sed 's/^from moba import/from pithtrain.ops.moba import/' "$SOL/shared/test_moba.py" > tests/test_moba.py
cp "$SOL/files/tests/test_moba_model.py" tests/test_moba_model.py
