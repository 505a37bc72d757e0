#!/usr/bin/env bash
# Oracle of feature/dynmoe on TorchTitan: apply.py adds DynMoE top-any gating to the workspace (it stops with a
# message if the framework no longer has the code it hooks into); then one forward and backward of the tiny
# flavor's model with it on.
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
PY=${PYTHON:-python3}
"$PY" "${ATE_SOLUTION:-$(dirname "$0")}/apply.py" .
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'PY'
import copy

import torch
from torchtitan.config import ConfigManager
from torchtitan.protocols import train_spec

import ate_run.deepseek_v2_lite  # noqa: F401  (registers the train spec)

config = ConfigManager().parse_args(["--job.config_file", "ate_run/tiny.toml", "--model.moe_gating", "top_any"])
spec = train_spec.get_train_spec(config.model.name)
args = copy.deepcopy(spec.model_args[config.model.flavor])
args.update_from_config(config)
device = "cuda" if torch.cuda.is_available() else "cpu"
if device == "cpu":  # TorchTitan counts tokens per expert with torch.histc on integer ids, which CPU lacks
    histc = torch.histc
    torch.histc = lambda x, *a, **k: histc(x.float(), *a, **k).to(x.dtype) if not x.is_floating_point() else histc(x, *a, **k)
with torch.device(device), torch.no_grad():
    model = spec.model_cls(args)
    model.init_weights(buffer_device=torch.device(device))
x = torch.randint(0, 4096, (2, 16), device=device)
loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1).float(), x.roll(-1, 1).flatten())
loss.backward()
moes = [m for m in model.modules() if getattr(getattr(m, "router", None), "gating", None) == "top_any"]
print(f"top-any: loss {loss.item():.4f}, experts per token {[float(m.tokens_per_expert.sum()) / 32 for m in moes]}")
PY
