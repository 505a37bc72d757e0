#!/usr/bin/env bash
# Oracle of operate/report-heavy-kernels on TorchTitan: profile_step.py is TorchTitan's Trainer with its third
# train_step profiled, launched as the workspace's run_train.sh launches torchtitan.train.
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc_per_node=1 "$(dirname "$0")/profile_step.py"
