"""GPU hand-out shared by every sandbox backend (no Docker dependency: GPU hosts often run the local one)."""

from __future__ import annotations

import subprocess
import threading


class GpuPool:
    """GPU UUIDs handed out to trials, one live trial per GPU (thread-safe)."""

    def __init__(self, uuids: list[str]) -> None:
        self._free = list(uuids)
        self._all = set(uuids)
        self._cond = threading.Condition()

    @classmethod
    def from_spec(cls, spec: str) -> GpuPool:
        """--gpus: 'none', 'auto' (every GPU nvidia-smi lists on this host, by UUID) or a comma list."""
        if spec == "none":
            return cls([])
        if spec != "auto":
            return cls([g.strip() for g in spec.split(",") if g.strip()])
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        return cls([u.strip() for u in out.splitlines() if u.strip().startswith("GPU-")])

    def __len__(self) -> int:
        return len(self._all)

    def acquire(self, n: int, timeout: float | None = None) -> list[str]:
        """Take `n` free GPUs, waiting up to `timeout` s (None: forever) for other trials to release them."""
        if n > len(self._all):
            raise ValueError(f"asked for {n} GPUs, the pool has {len(self._all)}")
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._free) >= n, timeout=timeout):
                raise TimeoutError(f"no {n} free GPUs within {timeout} s")
            taken, self._free = self._free[:n], self._free[n:]
            return taken

    def release(self, uuids: list[str]) -> None:
        with self._cond:
            for u in uuids:
                if u in self._all and u not in self._free:
                    self._free.append(u)
            self._cond.notify_all()
