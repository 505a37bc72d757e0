#!/usr/bin/env bash
# Oracle of feature/dynmoe on TorchTitan: apply.py adds DynMoE top-any gating to the workspace (it stops with a
# message if the framework no longer has the code it hooks into). Train with it on:
#   CONFIG_FILE=ate_run/tiny.toml ate_run/run_train.sh --model.moe_gating top_any --training.steps 5
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
PY=${PYTHON:-python3}
"$PY" "${ATE_SOLUTION:-$(dirname "$0")}/apply.py" .
