"""Run TorchTitan 0.2.2's unchanged Trainer on CPU, for tests on machines without a GPU.

TorchTitan trains on accelerators only: with none, its device detection answers "cuda". This wrapper makes it
answer "cpu" with a device module that has the few calls TorchTitan makes (names, memory statistics), and gives
torch.histc integer support on CPU (TorchTitan's MoE counts tokens per expert with it; CUDA has it, CPU does not).
Use it where a script would call python, torchrun included:

    python tests/torchtitan_cpu.py -m torch.distributed.run --standalone --nproc_per_node=1 -m torchtitan.train ...
    python tests/torchtitan_cpu.py script.py args ...

torchrun's options are dropped and the target runs in this process as rank 0 of a world of one.
"""

import os
import runpy
import sys
import types

import torch
import torch._utils


class _Properties:
    name, total_memory = "cpu", 16 << 30


class CpuDeviceModule(types.SimpleNamespace):
    """torch.cpu plus no-op stand-ins for the torch.cuda calls TorchTitan makes."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name) if hasattr(torch.cpu, name) else (lambda *a, **k: 0)


def patch() -> None:
    module = CpuDeviceModule(
        get_device_name=lambda *a: "cpu", get_device_properties=lambda *a: _Properties(),
        memory_stats=lambda *a, **k: {"active_bytes.all.peak": 0, "reserved_bytes.all.peak": 0,
                                      "num_alloc_retries": 0, "num_ooms": 0},
        set_device=lambda *a: None, synchronize=lambda *a: None, empty_cache=lambda: None,
        reset_peak_memory_stats=lambda *a: None, current_device=lambda: 0, device_count=lambda: 1)
    histc = torch.histc
    torch.histc = lambda x, *a, **k: (histc(x, *a, **k) if x.is_floating_point()
                                      else histc(x.float(), *a, **k).to(x.dtype))
    torch._utils._get_available_device_type = lambda: "cpu"
    device_module = torch._utils._get_device_module
    torch._utils._get_device_module = lambda t="cuda": module if t == "cpu" else device_module(t)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ[key] = value
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def main(args: list[str]) -> None:
    if args[:2] == ["-m", "torch.distributed.run"]:
        args = args[2:]
        while args and args[0].startswith("--"):  # torchrun's own options (--standalone, --nproc_per_node=1)
            args = args[1:]
    patch()  # before torchtitan is imported: it reads the device type at import time
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        sys.path[0] = os.path.dirname(os.path.abspath(args[0]))  # as `python script.py` has it
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
