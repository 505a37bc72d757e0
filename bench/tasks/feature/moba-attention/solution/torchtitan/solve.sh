#!/usr/bin/env bash
# Oracle of feature/moba-attention on TorchTitan: the operator (torchtitan/models/moba.py, new) and the keys
# model.moba_block_size / model.moba_topk (job config + DeepSeekV3ModelArgs) with their call in MLA (apply.py).
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
SOL=${ATE_SOLUTION:-$(dirname "${BASH_SOURCE[0]}")}
[ ! -e torchtitan/models/moba.py ] || { echo "solve.sh: torchtitan/models/moba.py already exists" >&2; exit 1; }
"${PYTHON:-python3}" "$SOL/apply.py" .
cp "$SOL/files/torchtitan/models/moba.py" torchtitan/models/moba.py
