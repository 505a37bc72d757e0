#!/usr/bin/env bash
# Oracle of feature/moe-plus-plus on PithTrain: apply.py adds MoE++ to the workspace (it stops with a message
# if the framework no longer has the code it hooks into); then one forward of the tiny model with every option
# on.
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
PY=${PYTHON:-python3}
"$PY" "${ATE_SOLUTION:-$(dirname "$0")}/apply.py" .
"$PY" - <<'PY'
import torch
from pithtrain.config import load_config, model_classes
sets = ["model.router.num_zero_experts=1", "model.router.num_copy_experts=1",
        "model.router.num_constant_experts=2", "model.router.gating_residual=true"]
cfg = load_config("configs/tiny-deepseek-v2-lite.toml", sets)
model = model_classes(cfg.family)[1](cfg.model)
model.init_weights()
out = model(torch.randint(0, 4096, (2, 16)), labels=torch.randint(0, 4096, (2, 16)), return_logits=False)
print(f"MoE++ forward: loss {out.loss.item():.4f}, load per choice {out.expert_load.tolist()}")
PY
