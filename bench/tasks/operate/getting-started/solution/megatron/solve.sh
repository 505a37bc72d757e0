#!/usr/bin/env bash
# Oracle of operate/getting-started on Megatron-Core: the tiny config through the workspace's launch entry, 5 steps,
# into runs/smoke (it checkpoints after the last step). Off CUDA (tests only) with the entry's CPU emulation.
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
PY=${PYTHON:-python3}
DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
"$PY" -m ate_run.pretrain_gpt --config ate_run/tiny.toml --train-iters 5 --out runs/smoke --device "$DEVICE"
