#!/usr/bin/env bash
# Oracle of feature/moba-attention on TorchTitan: the operator (torchtitan/models/moba.py, new) and the keys
# model.moba_block_size / model.moba_topk (job config + DeepSeekV3ModelArgs) with their call in MLA (apply.py).
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
SOL=${ATE_SOLUTION:-$(dirname "${BASH_SOURCE[0]}")}
"${PYTHON:-python3}" "$SOL/apply.py" .  # the edits, and shared/moba.py with its tests as new files
