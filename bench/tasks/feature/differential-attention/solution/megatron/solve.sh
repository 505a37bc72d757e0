#!/usr/bin/env bash
# Oracle of feature/differential-attention on Megatron-Core: TransformerConfig.diff_attention and the differential
# attention in MultiLatentAttention (apply.py, exact anchors of megatron-core 0.16.1; a missing anchor exits 1).
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
SOL=${ATE_SOLUTION:-$(dirname "${BASH_SOURCE[0]}")}
"${PYTHON:-python3}" "$SOL/apply.py"
