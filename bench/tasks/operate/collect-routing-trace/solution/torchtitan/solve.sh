#!/usr/bin/env bash
# Oracle of operate/collect-routing-trace on TorchTitan: trace_run.py is TorchTitan's Trainer with a forward hook
# on every router, launched as the workspace's run_train.sh launches torchtitan.train.
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc_per_node=1 "$(dirname "$0")/trace_run.py"
