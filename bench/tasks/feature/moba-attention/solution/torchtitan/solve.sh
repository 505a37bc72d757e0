#!/usr/bin/env bash
# Oracle of feature/moba-attention on TorchTitan: the operator (torchtitan/models/moba.py, new) and the keys
# model.moba_block_size / model.moba_topk (job config + DeepSeekV3ModelArgs) with their call in MLA (apply.py).
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
SOL=${ATE_SOLUTION:-$(dirname "${BASH_SOURCE[0]}")}
for f in torchtitan/models/moba.py tests/test_moba.py; do
  [ ! -e "$f" ] || { echo "solve.sh: $f already exists" >&2; exit 1; }
done
"${PYTHON:-python3}" "$SOL/apply.py" .
cp "$SOL/files/torchtitan/models/moba.py" torchtitan/models/moba.py
mkdir -p tests && cp "$SOL/files/tests/test_moba.py" tests/test_moba.py
