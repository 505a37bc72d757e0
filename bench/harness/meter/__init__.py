"""Run meter (active GPU time from process start/exit) and NVML sampler (busy time, memory, energy)."""

import json
import threading
import time
from pathlib import Path

METER_DIR = Path(__file__).resolve().parent  # put on PYTHONPATH inside the sandbox: loads sitecustomize.py


def meter_intervals(log_text: str, close_at: float, assume_cuda: bool = False):
    """Parse the meter log into (all torch runs, CUDA runs), each a list of (start, end) intervals.

    A start with no end (the process was killed, or outlived the agent) is closed at `close_at`; whether
    it used CUDA is unknown, so it counts as a CUDA run when `assume_cuda` (the trial had GPUs).
    """
    starts, runs, cuda_runs = {}, [], []
    for line in log_text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "start":
            starts[rec["pid"]] = rec["t"]
        elif rec.get("kind") == "end" and rec["pid"] in starts:
            span = (starts.pop(rec["pid"]), rec["t"])
            runs.append(span)
            if rec.get("cuda"):
                cuda_runs.append(span)
    for t in starts.values():
        runs.append((t, max(t, close_at)))
        if assume_cuda:
            cuda_runs.append(runs[-1])
    return runs, cuda_runs


class GpuSampler:
    """Samples the trial's GPUs through NVML every `period` s: busy seconds (utilisation > 0), peak memory
    and energy. Inert (all None) where NVML or the GPUs are missing, e.g. on CPU-only CI."""

    def __init__(self, gpu_uuids: list[str], period: float = 0.5):
        self.uuids, self.period = gpu_uuids, period
        self.busy_s = self.peak_mem_gib = self.energy_j = None
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByUUID(u) for u in self.uuids]
        except Exception:
            return self
        if self._handles:
            self.busy_s, self.peak_mem_gib, self.energy_j = 0.0, 0.0, 0.0
            self._thread = threading.Thread(target=self._loop, args=(pynvml,), daemon=True)
            self._thread.start()
        return self

    def _loop(self, nvml) -> None:
        energy0 = [self._energy(nvml, h) for h in self._handles]
        last = time.time()
        while not self._stop.wait(self.period):
            now = time.time()
            for h in self._handles:
                if nvml.nvmlDeviceGetUtilizationRates(h).gpu > 0:
                    self.busy_s += now - last
                    break
            used = max(nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles) / 2**30
            self.peak_mem_gib = max(self.peak_mem_gib, used)
            last = now
        energy1 = [self._energy(nvml, h) for h in self._handles]
        if None not in energy0 and None not in energy1:
            self.energy_j = sum(b - a for a, b in zip(energy0, energy1)) / 1000.0

    @staticmethod
    def _energy(nvml, handle):
        try:
            return nvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # millijoules
        except Exception:
            return None

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return False
