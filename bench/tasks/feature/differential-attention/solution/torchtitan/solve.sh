#!/usr/bin/env bash
# Oracle of feature/differential-attention on TorchTitan: the job config's model.diff_attention, copied into
# DeepSeekV3ModelArgs.diff_attention, and the differential attention in DeepSeek-V3's Attention (apply.py, exact
# anchors of torchtitan 0.2.2; a missing anchor exits 1).
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
SOL=${ATE_SOLUTION:-$(dirname "${BASH_SOURCE[0]}")}
"${PYTHON:-python3}" "$SOL/apply.py"
