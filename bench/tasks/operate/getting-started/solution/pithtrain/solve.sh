#!/usr/bin/env bash
# Oracle of operate/getting-started on PithTrain: the README's tiny CPU config, 5 steps, into runs/smoke.
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
PY=${PYTHON:-python3}
"$PY" -c "import torch, pithtrain"  # the environment: torch plus the workspace's package on PYTHONPATH
"$PY" -m pithtrain.train --config configs/tiny-deepseek-v2-lite.toml --set train.steps=5 --set train.run_dir=runs/smoke
