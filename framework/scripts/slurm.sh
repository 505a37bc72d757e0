#!/usr/bin/env bash
# Multi-node PithTrain on SLURM: one torchrun per node, one process per GPU; the config's [parallel] table
# (or --set parallel.*) lays the ranks out. From the repository root:
#
#   sbatch --nodes=4 framework/scripts/slurm.sh framework/configs/qwen3-30b-a3b.toml \
#       --set parallel.ep=8 --set parallel.pp=2 --set train.grad_accum=8
#
# pp x dp_replicate x dp_shard must equal nodes x GPUs per node (dp_shard = -1 takes the rest); ep divides
# dp_shard and is innermost in the mesh, so keep ep <= GPUs per node to keep expert all-to-alls inside a node.
#SBATCH --job-name=pithtrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: sbatch [--nodes=N] framework/scripts/slurm.sh CONFIG.toml [--set key=value ...]" >&2
  exit 2
fi
cd "${SLURM_SUBMIT_DIR:-.}"
PY=${PY:-.venv/bin/python}
GPUS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MASTER_PORT:-29500}
export PYTHONPATH="$PWD/framework${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
srun --kill-on-bad-exit=1 "$PY" -m torch.distributed.run \
  --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$GPUS" \
  --rdzv-backend c10d --rdzv-endpoint "$HEAD:$PORT" --rdzv-id "$SLURM_JOB_ID" \
  -m pithtrain.train --config "$@"
