#!/usr/bin/env bash
# Oracle of operate/getting-started on TorchTitan: the tiny config through the workspace's launch script, 5 steps,
# into runs/smoke, with TorchTitan's checkpointer saving the last step (model weights).
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
CONFIG_FILE=ate_run/tiny.toml ate_run/run_train.sh --training.steps 5 --job.dump_folder runs/smoke \
  --checkpoint.enable --checkpoint.interval 5
