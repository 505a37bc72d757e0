#!/usr/bin/env bash
# Oracle of feature/dynmoe on PithTrain: apply.py adds DynMoE top-any gating to the workspace (it stops with
# a message if the framework no longer has the code it hooks into); then one forward of the tiny model with it
# on.
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
PY=${PYTHON:-python3}
"$PY" "${ATE_SOLUTION:-$(dirname "$0")}/apply.py" .
"$PY" - <<'PY'
import torch
from pithtrain.config import load_config, model_classes
cfg = load_config("configs/tiny-deepseek-v2-lite.toml", ['model.router.gating="top_any"'])
model = model_classes(cfg.family)[1](cfg.model)
model.init_weights()
out = model(torch.randint(0, 4096, (2, 16)), labels=torch.randint(0, 4096, (2, 16)), return_logits=False)
print(f"top-any: loss {out.loss.item():.4f}, experts per token {(out.expert_load.sum(1) / 32).tolist()}")
PY
