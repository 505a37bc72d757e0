#!/usr/bin/env bash
# Oracle of feature/moba-attention on Megatron-Core: the operator (megatron/core/transformer/moba.py, new) and the
# TransformerConfig fields moba_block_size / moba_topk with their call in DotProductAttention (apply.py).
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
SOL=${ATE_SOLUTION:-$(dirname "${BASH_SOURCE[0]}")}
"${PYTHON:-python3}" "$SOL/apply.py" .  # the edits, and shared/moba.py with its tests as new files
