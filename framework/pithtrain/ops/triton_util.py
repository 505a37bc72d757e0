"""When to take the Triton fast path, shared by the kernel files.

Triton runs for CUDA tensors; `PITHTRAIN_TRITON=1` forces it elsewhere, so CPU tests can run the same kernels
under the interpreter. TRITON_INTERPRET=1 must be in the environment before triton is first imported (triton
decides then, for its own library functions too), so such tests run in a fresh process. Triton is optional:
the package imports without it and then always takes the PyTorch reference paths.
"""

import importlib.util
import os

import torch

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _HAS_TRITON


def use_triton(t: torch.Tensor) -> bool:
    """True when `t` should go through a Triton kernel rather than the PyTorch reference."""
    return _HAS_TRITON and (t.is_cuda or os.environ.get("PITHTRAIN_TRITON") == "1")
