"""Oracle of operate/report-heavy-kernels on Megatron-Core: ate_run.pretrain_gpt's main, unchanged, 3 steps of the
small config into runs/profile, with the PyTorch profiler around exactly step 3's train_step (forward, backward,
optimizer and LR step; the step's batch is already drawn, checkpointing comes after), and the top-3 CUDA kernels by
GPU time written to results/top_kernels.csv.
"""

import csv
import sys
from pathlib import Path

import ate_run.pretrain_gpt as pg
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

PROFILED_STEP = 3
OUT = Path("results/top_kernels.csv")


def train_step(*args, _inner=pg.train_step):
    train_step.step += 1
    if train_step.step != PROFILED_STEP:
        return _inner(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = _inner(*args)
        torch.cuda.synchronize()
    # GPU-side copies of record_function ranges (user annotations) span kernels: they are not kernels.
    rows = sorted(((e.key, e.self_device_time_total / 1e3, e.count) for e in prof.key_averages()
                   if e.device_type == DeviceType.CUDA and not e.is_user_annotation), key=lambda r: -r[1])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kernel_name", "total_time_ms", "instances", "mean_time_ms"])
        for name, total, count in rows[:3]:
            w.writerow([name, f"{total:.4f}", count, f"{total / count:.4f}"])
    return result


train_step.step = 0
pg.train_step = train_step
sys.exit(pg.main(["--config", "ate_run/small.toml", "--train-iters", str(PROFILED_STEP), "--out", "runs/profile"]))
