#!/usr/bin/env bash
# Oracle of feature/moe-plus-plus on Megatron-Core: apply.py adds MoE++ to the workspace (it stops with a message if
# the framework no longer has the code it hooks into). Train with it on:
#   sed 's/^\[model\]$/[model]\nmoe_zero_experts = 1\nmoe_copy_experts = 1\nmoe_constant_experts = 2\nmoe_router_gating_residual = true/' \
#       ate_run/tiny.toml > /tmp/tiny-moepp.toml
#   python -m ate_run.pretrain_gpt --config /tmp/tiny-moepp.toml --train-iters 20 --out runs/moepp
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
PY=${PYTHON:-python3}
"$PY" "${ATE_SOLUTION:-$(dirname "$0")}/apply.py" .
