#!/usr/bin/env bash
# Throughput of the parallel layouts on one multi-GPU node (used for the closing notes):
#   scripts/gpu_layouts.sh OUT_DIR [1gpu ep2 fsdp2 pp2 dpv dpv-nooverlap ...]
# Each layout trains framework/configs/small-qwen3-moe.toml for $STEPS steps (default 6) with bf16
# autocast and writes OUT_DIR/<layout>.log; the last line of each log is the run's summary.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1; shift
mkdir -p "$out"
export PYTHONPATH=$PWD/framework PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
C=framework/configs/small-qwen3-moe.toml
S="--set train.steps=${STEPS:-6} --set train.log_every=1 --set train.eval_batches=1"
for layout in "$@"; do
  case $layout in
    1gpu) launch="python3"; A="" ;;
    ep2) launch="torchrun --nproc-per-node 2"; A="--set parallel.ep=2" ;;
    fsdp2) launch="torchrun --nproc-per-node 2"; A="" ;;
    pp2) launch="torchrun --nproc-per-node 2"; A="--set parallel.pp=2 --set train.grad_accum=2" ;;
    dpv) launch="torchrun --nproc-per-node 2"; A="--set parallel.pp=2 --set parallel.pp_schedule=dualpipev --set train.grad_accum=4" ;;
    dpv-nooverlap) launch="torchrun --nproc-per-node 2"; A="--set parallel.pp=2 --set parallel.pp_schedule=dualpipev --set parallel.pp_overlap=false --set train.grad_accum=4" ;;
    *) echo "unknown layout $layout" >&2; exit 2 ;;
  esac
  [ "$launch" = python3 ] && export CUDA_VISIBLE_DEVICES=0 || unset CUDA_VISIBLE_DEVICES
  [ "$launch" != python3 ] && launch="$launch --master-port $((29500 + RANDOM % 1000))"
  echo "== $layout: $launch -m pithtrain.train --config $C $S $A"
  timeout "${LIMIT:-240}" $launch -m pithtrain.train --config $C $S --set train.run_dir=/tmp/layout-$layout $A \
    > "$out/$layout.log" 2>&1
  echo "   rc=$? $(grep -E '^step' "$out/$layout.log" | tail -1)"
done
