#!/usr/bin/env bash
# Oracle of feature/moba-attention on Megatron-Core: the operator (megatron/core/transformer/moba.py, new) and the
# TransformerConfig fields moba_block_size / moba_topk with their call in DotProductAttention (apply.py).
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
SOL=${ATE_SOLUTION:-$(dirname "${BASH_SOURCE[0]}")}
f=megatron/core/transformer/moba.py
for g in "$f" tests/test_moba.py; do
  [ ! -e "$g" ] || { echo "solve.sh: $g already exists" >&2; exit 1; }
done
"${PYTHON:-python3}" "$SOL/apply.py" .
cp "$SOL/files/$f" "$f"
mkdir -p tests && cp "$SOL/files/tests/test_moba.py" tests/test_moba.py
