"""RMSNorm over the last dimension, with the exact casts of `blocks.RMSNorm`:

    y = weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)

so the normalised value is rounded to x's dtype before the weight multiplies it, and y's dtype is
promote(x.dtype, weight.dtype) (x's dtype when the two agree; fp32 for bf16 x with an fp32 weight).
The Triton path computes in fp32, saves only x and the per-row rstd (fp32), and reduces grad_weight through
fixed per-program partial sums plus a torch sum, so it is deterministic run to run.
"""

import functools

import torch

from pithtrain.ops.triton_util import use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The meaning of the op: blocks.RMSNorm.forward."""
    dtype = x.dtype
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H], weight [H] -> [..., H] in promote(x.dtype, weight.dtype); not changed by autocast."""
    if use_triton(x):
        return torch.ops.pithtrain.rms_norm(x, weight, eps)[0]
    return rms_norm_reference(x, weight, eps)


@functools.cache
def _kernels():
    """Defined on first use, so that the package imports without triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, h, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols < h)[None, :]
        off = rows[:, None] * h + cols[None, :]
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / h + eps)
        normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)  # blocks.RMSNorm's .to(dtype)
        w = tl.load(w_ptr + cols, mask=cols < h, other=0.0).to(tl.float32)
        tl.store(y_ptr + off, (w[None, :] * normed).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, h, blocks_per_program,
            ROWS: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        col_ok = cols < h
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        blk = pid * blocks_per_program
        end = blk + blocks_per_program
        # a contiguous run of row blocks per program; `while` because the interpreter's range() cannot take
        # a runtime bound
        while blk < end:
            rows = blk.to(tl.int64) * ROWS + tl.arange(0, ROWS)
            row_ok = rows < n_rows
            mask = row_ok[:, None] & col_ok[None, :]
            off = rows[:, None] * h + cols[None, :]
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xhat = x * rstd[:, None]
            dw += tl.sum(dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
            # the reference's grad of the normalised value is rounded to x's dtype by the .to(dtype) backward
            g = (dy * w[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
            c = tl.sum(g * xhat, axis=1) / h
            dx = rstd[:, None] * (g - xhat * c[:, None])
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            blk += 1
        tl.store(dw_ptr + pid * h + cols, dw, mask=col_ok)

    return fwd, bwd



def _tile(h: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps): a whole row per tile, ~4K-8K elements per program (many rows for head_dim)."""
    block = 1 << max(0, h - 1).bit_length()
    rows = max(1, min(64, 4096 // block))
    return rows, block, 8 if rows * block >= 8192 else 4


@functools.cache
def _max_programs(device: torch.device) -> int:
    """Programs of the backward: a few per SM. Depends only on the device, so grad_weight's summation order
    (and hence its value) is the same from run to run."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


@torch.library.custom_op("pithtrain::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x.shape[-1]
    xc = x.contiguous()
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    n_rows = x.numel() // max(h, 1)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if x.numel():
        rows, block, warps = _tile(h)
        _kernels()[0][(-(-n_rows // rows),)](
            xc, weight.contiguous(), y, rstd, n_rows, h, eps, ROWS=rows, BLOCK=block, num_warps=warps
        )
    return y, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps):
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    return y, x.new_empty(x.numel() // max(x.shape[-1], 1), dtype=torch.float32)


@torch.library.custom_op("pithtrain::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    h = x.shape[-1]
    n_rows = rstd.numel()
    xc = x.contiguous()
    dx = torch.empty_like(xc)
    if not x.numel():
        return dx, torch.zeros_like(weight)
    rows, block, warps = _tile(h)
    n_blocks = -(-n_rows // rows)
    per_program = -(-n_blocks // min(n_blocks, _max_programs(x.device)))
    programs = -(-n_blocks // per_program)
    partial = torch.empty(programs, h, dtype=torch.float32, device=x.device)
    _kernels()[1][(programs,)](
        grad_y.contiguous(), xc, weight.contiguous(), rstd, dx, partial, n_rows, h, per_program,
        ROWS=rows, BLOCK=block, num_warps=warps,
    )
    return dx, partial.sum(0).to(weight.dtype)


@_rms_norm_backward_op.register_fake
def _(grad_y, x, weight, rstd):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.pithtrain.rms_norm_backward(grad_y, x, weight, rstd)
    return dx, dw, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)
