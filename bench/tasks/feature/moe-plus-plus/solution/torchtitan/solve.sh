#!/usr/bin/env bash
# Oracle of feature/moe-plus-plus on TorchTitan: apply.py adds MoE++ to the workspace's TorchTitan and the tiny_moepp
# flavor to ate_run (it stops with a message if TorchTitan no longer has the code it hooks into); then one forward and
# backward of the tiny_moepp model on the device there is.
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
PY=${PYTHON:-python3}
"$PY" "${ATE_SOLUTION:-$(dirname "$0")}/apply.py" .
CHECK=$(mktemp --suffix .py)  # a file, not stdin: $PYTHON may be a wrapper that runs a script path
trap 'rm -f "$CHECK"' EXIT
cat > "$CHECK" <<'PY'
import torch
import torch.nn.functional as F

import ate_run.deepseek_v2_lite as spec
from torchtitan.models.deepseek_v3 import DeepSeekV3Model

device = "cuda" if torch.cuda.is_available() else "cpu"
if device == "cpu":  # TorchTitan counts tokens per expert with torch.histc on integer ids, which CPU lacks
    histc = torch.histc
    torch.histc = lambda x, *a, **k: histc(x.float(), *a, **k).to(x.dtype)
args = spec.FLAVORS["tiny_moepp"]
args.moe_impl, args.moe_args.use_grouped_mm = "standard", False
with torch.device(device), torch.no_grad():
    model = DeepSeekV3Model(args)
    model.init_weights(buffer_device=torch.device(device))
x = torch.randint(0, 4096, (2, 16), device=device)
loss = F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
loss.backward()
load = torch.stack([b.moe.tokens_per_expert for b in model.layers.values() if b.moe_enabled])
print(f"MoE++ forward: loss {loss.item():.4f}, load per choice {load.tolist()}")
PY
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$CHECK"
