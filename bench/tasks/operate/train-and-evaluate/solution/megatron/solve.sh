#!/usr/bin/env bash
# Oracle of operate/train-and-evaluate on Megatron-Core: 30 steps through the workspace's launch entry (checkpoint of
# step 30, model only), then export.py, a converter of our own (Megatron-Core ships no Hugging Face exporter), and the
# export's perplexity with transformers. Off CUDA (tests only) with the entry's CPU emulation.
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
PY=${PYTHON:-python3}
read -r DEVICE CONFIG < <("$PY" -c "import torch; print('cuda small' if torch.cuda.is_available() else 'cpu tiny')")
"$PY" -m ate_run.pretrain_gpt --config "ate_run/$CONFIG.toml" --train-iters 30 --out runs/train-eval \
  --save-interval 30 --no-save-optim --device "$DEVICE"
exec "$PY" "$(dirname "$0")/export.py" "$CONFIG" "$DEVICE"
