"""SwiGLU activation on a fused gate/up projection: silu(gate) * up.

The Triton path reads gate_up once, computes in fp32 and rounds once at the store. Its backward recomputes
silu from gate_up (the only saved tensor) and writes the [N, 2I] gradient of both halves in one kernel, so
no intermediate activation is kept between forward and backward.
"""

import functools

import torch
import torch.nn.functional as F

from pithtrain.ops.triton_util import use_triton


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2*I] with gate first, up second -> [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2*I] with gate first, up second -> [..., I] in gate_up's dtype."""
    if use_triton(gate_up):
        return torch.ops.pithtrain.swiglu(gate_up)
    return swiglu_reference(gate_up)


@functools.cache
def _kernels():
    """Defined on first use, so that the package imports without triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(gu_ptr, out_ptr, n_rows, inter, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = (rows < n_rows)[:, None] & (cols < inter)[None, :]
        src = gu_ptr + rows[:, None] * (2 * inter) + cols[None, :]
        g = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(src + inter, mask=mask, other=0.0).to(tl.float32)
        out = g * tl.sigmoid(g) * u
        tl.store(out_ptr + rows[:, None] * inter + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def bwd(gu_ptr, dout_ptr, dgu_ptr, n_rows, inter, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = (rows < n_rows)[:, None] & (cols < inter)[None, :]
        off = rows[:, None] * (2 * inter) + cols[None, :]
        g = tl.load(gu_ptr + off, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + off + inter, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(dout_ptr + rows[:, None] * inter + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dg = d * u * s * (1.0 + g * (1.0 - s))
        du = d * g * s
        dt = dgu_ptr.dtype.element_ty
        tl.store(dgu_ptr + off, dg.to(dt), mask=mask)
        tl.store(dgu_ptr + off + inter, du.to(dt), mask=mask)

    return fwd, bwd



def _config(n_rows: int, inter: int) -> tuple[tuple[int, int], int, int, int]:
    """(grid, ROWS, BLOCK, num_warps): [ROWS, BLOCK] tiles of ~2K elements, BLOCK a power of two up to 256
    (768 = 3 x 256 without waste)."""
    block = min(256, 1 << max(0, inter - 1).bit_length())
    rows = max(1, 2048 // block)
    return (-(-n_rows // rows), -(-inter // block)), rows, block, 4


@torch.library.custom_op("pithtrain::swiglu", mutates_args=())
def _swiglu_op(gate_up: torch.Tensor) -> torch.Tensor:
    inter = gate_up.shape[-1] // 2
    x = gate_up.contiguous()
    out = x.new_empty(*x.shape[:-1], inter)
    n_rows = out.numel() // max(inter, 1)
    if out.numel():
        grid, rows, block, warps = _config(n_rows, inter)
        _kernels()[0][grid](x, out, n_rows, inter, ROWS=rows, BLOCK=block, num_warps=warps)
    return out


@_swiglu_op.register_fake
def _(gate_up):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@torch.library.custom_op("pithtrain::swiglu_backward", mutates_args=())
def _swiglu_backward_op(gate_up: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    inter = gate_up.shape[-1] // 2
    x, d = gate_up.contiguous(), grad_out.contiguous()
    grad = torch.empty_like(x)
    n_rows = d.numel() // max(inter, 1)
    if d.numel():
        grid, rows, block, warps = _config(n_rows, inter)
        _kernels()[1][grid](x, d, grad, n_rows, inter, ROWS=rows, BLOCK=block, num_warps=warps)
    return grad


@_swiglu_backward_op.register_fake
def _(gate_up, grad_out):
    return torch.empty_like(gate_up, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad_out):
    (gate_up,) = ctx.saved_tensors
    return torch.ops.pithtrain.swiglu_backward(gate_up, grad_out)


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)
