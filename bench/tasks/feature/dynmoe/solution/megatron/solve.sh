#!/usr/bin/env bash
# Oracle of feature/dynmoe on Megatron-Core: apply.py adds DynMoE top-any gating to the workspace (it stops with a
# message if the framework no longer has the code it hooks into). Train with it on:
#   sed 's/^\[model\]$/[model]\nmoe_router_gating = "top_any"/' ate_run/tiny.toml > /tmp/tiny-top-any.toml
#   python -m ate_run.pretrain_gpt --config /tmp/tiny-top-any.toml --train-iters 5 --out runs/top-any
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
PY=${PYTHON:-python3}
"$PY" "${ATE_SOLUTION:-$(dirname "$0")}/apply.py" .
