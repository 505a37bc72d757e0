#!/usr/bin/env bash
# Oracle of feature/dynmoe on Megatron-Core: apply.py adds DynMoE top-any gating to the workspace (it stops with a
# message if the framework no longer has the code it hooks into); then two training steps of the tiny config with
# it on, through the launch entry.
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
PY=${PYTHON:-python3}
"$PY" "${ATE_SOLUTION:-$(dirname "$0")}/apply.py" .
DEVICE=$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
RUN=$(mktemp -d)
sed 's/^\[model\]$/[model]\nmoe_router_gating = "top_any"/' ate_run/tiny.toml > "$RUN/tiny-top-any.toml"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m ate_run.pretrain_gpt --config "$RUN/tiny-top-any.toml" \
  --train-iters 2 --out "$RUN/run" --device "$DEVICE" --no-save-optim
tail -n 1 "$RUN/run/metrics.jsonl"
rm -rf "$RUN"
