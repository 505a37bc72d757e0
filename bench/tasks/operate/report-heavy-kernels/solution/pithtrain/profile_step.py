"""Oracle of operate/report-heavy-kernels on PithTrain: 3 steps of pithtrain.train, unchanged, with the third
profiled, and the top-3 kernels written as CSV (one process: each Python start imports torch, which takes
tens of seconds in some sandboxes). Config: the tiny DeepSeek-V2-Lite on CPU, the small one on a GPU.

Wrapping the loop's `forward_backward` and `optimizer_step` puts exactly step 3's forward, backward and
optimizer update inside the profiler. Kernels: CUDA kernels by GPU time on a GPU, else aten ops by self CPU
time (on one thread, as the task asks).
"""

import csv
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import pithtrain.train as train

PROFILED_STEP = 3
OUT = Path("results/top_kernels.csv")
state = {"step": 0, "prof": None}


def top_kernels(prof, on_gpu: bool, n: int = 3) -> list[tuple[str, float, int]]:
    """(name, total ms, instances) of the n kernels with the most total time, most first. On the GPU side the
    profiler also lists copies of record_function ranges (user annotations) that span kernels: not kernels."""
    rows = []
    for e in prof.key_averages():
        if on_gpu and e.device_type == DeviceType.CUDA and not e.is_user_annotation:
            rows.append((e.key, e.self_device_time_total / 1e3, e.count))
        elif not on_gpu and e.key.startswith("aten::"):
            rows.append((e.key, e.self_cpu_time_total / 1e3, e.count))
    return sorted(rows, key=lambda r: -r[1])[:n]


def forward_backward(*args, _inner=train.forward_backward):
    state["step"] += 1
    if state["step"] == PROFILED_STEP:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        state["prof"] = profile(activities=acts)
        state["prof"].__enter__()
    return _inner(*args)


def optimizer_step(*args, _inner=train.optimizer_step):
    norm = _inner(*args)
    prof = state["prof"]
    if state["step"] == PROFILED_STEP and prof is not None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        with open(OUT, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["kernel_name", "total_time_ms", "instances", "mean_time_ms"])
            for name, total, count in top_kernels(prof, torch.cuda.is_available()):
                w.writerow([name, f"{total:.4f}", count, f"{total / count:.4f}"])
    return norm


gpu = torch.cuda.is_available()
if not gpu:
    torch.set_num_threads(1)
train.forward_backward, train.optimizer_step = forward_backward, optimizer_step
config = f"configs/{'small' if gpu else 'tiny'}-deepseek-v2-lite.toml"
sys.exit(train.main(["--config", config, "--set", "train.steps=3", "--set", "train.run_dir=runs/profile"]))
