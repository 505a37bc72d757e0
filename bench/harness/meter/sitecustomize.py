"""ATE-Bench run meter, loaded by every Python process the agent starts (PYTHONPATH points here).

Active GPU Time is the wall time of the training/verify runs the agent launched, each from start to
exit. A run is a Python process that imports torch: when torch is first imported we log a `start`
line, and at exit an `end` line saying whether CUDA was initialised. A process killed before atexit
leaves only its start line; the harness closes it at the agent's end. Silent and inert unless
ATE_METER_LOG names the log file. Stdlib only: it must not slow down or break the agent's Python.
"""

import os
import sys
import time

_LOG = os.environ.get("ATE_METER_LOG")


def _write(kind: str, **fields) -> None:
    import json

    try:
        line = json.dumps({"kind": kind, "pid": os.getpid(), "t": time.time(), **fields})
        fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, (line + "\n").encode())  # one write of a short line: atomic with O_APPEND
        finally:
            os.close(fd)
    except OSError:
        pass


def _at_exit() -> None:
    torch = sys.modules.get("torch")
    cuda = False
    try:
        cuda = bool(torch is not None and torch.cuda.is_initialized())
    except Exception:
        pass
    _write("end", cuda=cuda)


class _TorchWatcher:
    """A meta-path finder that only notices the first `import torch`, then steps aside."""

    seen = False

    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not self.seen:
            self.seen = True
            import atexit

            _write("start", argv=sys.argv[:8], ppid=os.getppid())
            atexit.register(_at_exit)
        return None


if _LOG:
    sys.meta_path.insert(0, _TorchWatcher())
