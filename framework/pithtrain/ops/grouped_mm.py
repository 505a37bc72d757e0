"""Grouped matrix multiply for experts: rows of `x` sorted by expert times per-expert weights.

`torch._grouped_mm` runs all experts in one kernel on Hopper (sm90+) for bf16. Elsewhere (CPU,
older GPUs, fp32) a per-expert loop over the same layout gives the same result; it is the
reference the fast path is tested against.
"""

import torch


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, in] sorted by expert, w [E, in, out], offsets [E] int32 cumulative row ends -> [M, out]."""
    ends = offsets.tolist()
    outs, start = [], 0
    for e, end in enumerate(ends):
        outs.append(x[start:end] @ w[e])
        start = end
    if start < x.shape[0]:  # rows past the last offset belong to no expert (padding): zeros
        outs.append(x.new_zeros(x.shape[0] - start, w.shape[-1]))
    return torch.cat(outs, dim=0)


def use_fused_grouped_mm(x: torch.Tensor) -> bool:
    """Fused kernel on Hopper bf16; an empty input (an expert-parallel rank that received no tokens) takes the
    loop, which still connects the weights to autograd with zero gradients."""
    return x.is_cuda and x.shape[0] > 0 and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Expert grouped GEMM; shapes as in `grouped_mm_reference`."""
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"grouped_mm: x has {x.shape[-1]} input features but w {tuple(w.shape)} expects {w.shape[1]}")
    if torch.is_autocast_enabled(x.device.type):  # autocast does not cover this op: cast like a matmul
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if use_fused_grouped_mm(x):
        return torch._grouped_mm(x, w.to(x.dtype), offs=offsets)
    return grouped_mm_reference(x, w.to(x.dtype), offsets)
