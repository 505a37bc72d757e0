#!/usr/bin/env bash
# Launch TorchTitan's trainer on this machine's GPUs, as TorchTitan's own run_train.sh does (the wheel lacks it).
#   CONFIG_FILE=ate_run/tiny.toml ate_run/run_train.sh --training.steps 5 --job.dump_folder runs/smoke
# NGPU (default 1) processes; extra arguments go to TorchTitan's config manager and override the TOML.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
exec "${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc_per_node="${NGPU:-1}" \
  -m torchtitan.train --job.config_file "${CONFIG_FILE:-ate_run/tiny.toml}" "$@"
