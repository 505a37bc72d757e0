"""Oracle of operate/report-heavy-kernels on TorchTitan: torchtitan.train's Trainer, unchanged, 3 steps of the small
flavor into runs/profile, with the PyTorch profiler around exactly step 3's train_step (its data loading, forward,
backward, optimizer update and metric logging; the checkpointer is off), and the top-3 CUDA kernels by GPU time
written to results/top_kernels.csv.
"""

import csv
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

PROFILED_STEP = 3
OUT = Path("results/top_kernels.csv")
# Before torchtitan is imported: its ConfigManager.parse_args defaults to sys.argv[1:] as of import time.
sys.argv[1:] = ["--job.config_file", "ate_run/small.toml", "--training.steps", str(PROFILED_STEP),
                "--job.dump_folder", "runs/profile"]
from torchtitan.train import Trainer, main  # noqa: E402


class ProfilingTrainer(Trainer):
    def train_step(self, data_iterator):
        if self.step != PROFILED_STEP:
            return super().train_step(data_iterator)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            super().train_step(data_iterator)
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


main(ProfilingTrainer)
