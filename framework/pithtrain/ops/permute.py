"""Token permute / unpermute: group token copies by expert, and sum them back with gate weights.

Each token is routed to k experts, so permute makes T*k rows sorted by expert id (stable, so
ties keep token order and results are deterministic); unpermute scatters expert outputs back
to their tokens and combines them weighted by the gate.

Two implementations with one meaning: the PyTorch reference (`permute_torch`, `unpermute_torch`) and
Triton kernels driven by the inverse permutation `inv[t, s]` (the sorted row of token t's slot s). Each
kernel program owns one token and touches exactly its k rows, so forward and backward are gathers and
scatters to distinct rows: no atomics, bit-for-bit deterministic, and no host-device sync (shapes follow
from T, k, H). The kernels are `torch.library` custom ops ("pithtrain::moe_permute", "pithtrain::moe_combine",
"pithtrain::moe_combine_backward") with fake and autograd registrations, so `torch.compile(fullgraph=True)`
keeps them in the graph.
"""

import functools

import torch

from pithtrain.ops.triton_util import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference paths still work
    triton = tl = None


# ---- PyTorch reference ----


def permute_torch(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int):
    """x [T, H], expert_ids [T, k] -> (x_sorted [T*k, H], order [T*k], counts [E] int64).

    `order[i]` is the flat (token*k + slot) index of sorted row i.
    """
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    token_of_row = order // expert_ids.shape[1]
    return x[token_of_row], order, counts


def unpermute_torch(y_sorted: torch.Tensor, order: torch.Tensor, gate_weights: torch.Tensor) -> torch.Tensor:
    """y_sorted [T*k, H] in expert order, gate_weights [T, k] -> [T, H] = sum_k w[t,k] * y[t,k]."""
    num_tokens, top_k = gate_weights.shape
    y = torch.empty_like(y_sorted)
    y[order] = y_sorted
    y = y.view(num_tokens, top_k, y.shape[-1])
    return torch.einsum("tkh,tk->th", y, gate_weights.to(y.dtype))


def unpermute_reference(y_sorted, order, gate_weights):
    """Loop form of `unpermute`, used by tests to pin its meaning."""
    num_tokens, top_k = gate_weights.shape
    out = y_sorted.new_zeros(num_tokens, y_sorted.shape[-1])
    for row, flat in enumerate(order.tolist()):
        t, s = divmod(flat, top_k)
        out[t] += gate_weights[t, s].to(y_sorted.dtype) * y_sorted[row]
    return out


# ---- public entry points: Triton on CUDA (or PITHTRAIN_TRITON=1), else the reference ----


def permute(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int):
    """x [T, H], expert_ids [T, k] -> (x_sorted [T*k, H], order [T*k] int64, counts [E] int64), see above.

    The fast path counts rows per expert by a searchsorted on the sorted ids, not bincount, whose output size
    depends on the data (a host sync on CUDA).
    """
    if not use_triton(x):
        return permute_torch(x, expert_ids, num_experts)
    sorted_ids, order = torch.sort(expert_ids.reshape(-1).int(), stable=True)  # int32: half the radix passes
    bounds = torch.arange(num_experts + 1, device=sorted_ids.device, dtype=sorted_ids.dtype)
    counts = torch.searchsorted(sorted_ids, bounds).diff()
    return moe_permute(x.contiguous(), inverse_order(order, expert_ids.shape)), order, counts


def unpermute(y_sorted: torch.Tensor, order: torch.Tensor, gate_weights: torch.Tensor) -> torch.Tensor:
    """y_sorted [T*k, H] in expert order, gate_weights [T, k] -> [T, H] in y's dtype; see `unpermute_torch`.

    The fast path multiplies by the fp32 weights and accumulates in fp32 (the reference casts the weights to
    y's dtype first), so in bf16 it is slightly more accurate than the reference.
    """
    if not use_triton(y_sorted):
        return unpermute_torch(y_sorted, order, gate_weights)
    inv = inverse_order(order, gate_weights.shape)
    return moe_combine(y_sorted.contiguous(), inv, gate_weights.contiguous())


def inverse_order(order: torch.Tensor, shape) -> torch.Tensor:
    """order [T*k] (token*k + slot of each sorted row) -> inv [T, k]: the sorted row of each (token, slot)."""
    rows = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return torch.empty_like(order).scatter_(0, order, rows).view(shape)


# ---- Triton kernels ----


@functools.cache  # built on first use: importing this module compiles nothing
def _kernels():
    @triton.jit
    def expand(src, inv, w, y, out, dw, H: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
               BLOCK_H: tl.constexpr, HAS_W: tl.constexpr, HAS_DW: tl.constexpr):
        """out[inv[t, s]] = w[t, s] * src[t] for each slot s of token t; with HAS_DW also
        dw[t, s] = dot(y[inv[t, s]], src[t]) (the unpermute backward, src being the output gradient)."""
        t = tl.program_id(0).to(tl.int64)
        s = tl.arange(0, K_PAD)
        smask = s < K
        rows = tl.load(inv + t * K + s, mask=smask, other=0).to(tl.int64)
        if HAS_W:
            ws = tl.load(w + t * K + s, mask=smask, other=0.0).to(tl.float32)
        acc = tl.zeros([K_PAD], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            hmask = h < H
            mask = smask[:, None] & hmask[None, :]
            v = tl.load(src + t * H + h, mask=hmask, other=0.0).to(tl.float32)
            if HAS_W:
                val = ws[:, None] * v[None, :]
            else:
                val = tl.broadcast_to(v[None, :], (K_PAD, BLOCK_H))
            off = rows[:, None] * H + h[None, :]
            tl.store(out + off, val.to(out.dtype.element_ty), mask=mask)
            if HAS_DW:
                yv = tl.load(y + off, mask=mask, other=0.0).to(tl.float32)
                acc += tl.sum(yv * v[None, :], axis=1)
        if HAS_DW:
            tl.store(dw + t * K + s, acc.to(dw.dtype.element_ty), mask=smask)

    @triton.jit
    def combine(y, inv, w, out, H: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
                HAS_W: tl.constexpr):
        """out[t] = sum_s w[t, s] * y[inv[t, s]] (w = 1 without HAS_W), accumulated in fp32."""
        t = tl.program_id(0).to(tl.int64)
        s = tl.arange(0, K_PAD)
        smask = s < K
        rows = tl.load(inv + t * K + s, mask=smask, other=0).to(tl.int64)
        if HAS_W:
            ws = tl.load(w + t * K + s, mask=smask, other=0.0).to(tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            hmask = h < H
            mask = smask[:, None] & hmask[None, :]
            yv = tl.load(y + rows[:, None] * H + h[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                yv = yv * ws[:, None]
            tl.store(out + t * H + h, tl.sum(yv, axis=0).to(out.dtype.element_ty), mask=hmask)

    return expand, combine


def _blocks(top_k: int, hidden: int) -> tuple[int, int]:
    """(K_PAD, BLOCK_H): tiles of about 8K elements per 4-warp program ran near HBM bandwidth on an H100 at
    H=2048, k=8 (4K-element tiles made the gather-sum 1.6x slower)."""
    k_pad = triton.next_power_of_2(top_k)
    return k_pad, min(triton.next_power_of_2(hidden), max(128, 8192 // k_pad))


def _expand(src, inv, w, y, out, dw):
    tokens, top_k = inv.shape
    if tokens == 0 or src.shape[1] == 0:
        return
    k_pad, block_h = _blocks(top_k, src.shape[1])
    expand, _ = _kernels()
    dummy = out  # never read when the matching flag is off
    expand[(tokens,)](src, inv, dummy if w is None else w, dummy if y is None else y, out,
                      dummy if dw is None else dw, src.shape[1], K=top_k, K_PAD=k_pad, BLOCK_H=block_h,
                      HAS_W=w is not None, HAS_DW=dw is not None, num_warps=4)


# ---- custom ops ----


@torch.library.custom_op("pithtrain::moe_permute", mutates_args=())
def moe_permute(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """x [T, H] contiguous, inv [T, k] -> x_sorted [T*k, H] with x_sorted[inv[t, s]] = x[t]."""
    out = x.new_empty(inv.numel(), x.shape[1])
    _expand(x, inv, None, None, out, None)
    return out


@moe_permute.register_fake
def _(x, inv):
    return x.new_empty(inv.numel(), x.shape[1])


@torch.library.custom_op("pithtrain::moe_combine", mutates_args=())
def moe_combine(y: torch.Tensor, inv: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """y [T*k, H] contiguous, inv [T, k], w [T, k] or None (ones) -> [T, H]: sum_s w[t, s] y[inv[t, s]]."""
    tokens, top_k = inv.shape
    out = y.new_empty(tokens, y.shape[1])
    if tokens and y.shape[1]:
        k_pad, block_h = _blocks(top_k, y.shape[1])
        _, combine = _kernels()
        combine[(tokens,)](y, inv, out if w is None else w, out, y.shape[1], K=top_k, K_PAD=k_pad,
                           BLOCK_H=block_h, HAS_W=w is not None, num_warps=4)
    return out


@moe_combine.register_fake
def _(y, inv, w):
    return y.new_empty(inv.shape[0], y.shape[1])


@torch.library.custom_op("pithtrain::moe_combine_backward", mutates_args=())
def moe_combine_backward(
    grad: torch.Tensor, inv: torch.Tensor, w: torch.Tensor, y: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad [T, H] of moe_combine's output -> (grad_y [T*k, H] in grad's dtype, grad_w [T, k] in w's dtype).
    grad_w needs the saved y; without it (no gate gradient wanted) it comes back empty."""
    grad_y = grad.new_empty(inv.numel(), grad.shape[1])
    grad_w = w.new_empty(0) if y is None else torch.empty_like(w)
    _expand(grad, inv, w, y, grad_y, None if y is None else grad_w)
    return grad_y, grad_w


@moe_combine_backward.register_fake
def _(grad, inv, w, y):
    return grad.new_empty(inv.numel(), grad.shape[1]), w.new_empty(0) if y is None else torch.empty_like(w)


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _permute_backward(ctx, grad):
    (inv,) = ctx.saved_tensors
    return moe_combine(grad.contiguous(), inv, None), None


def _combine_setup(ctx, inputs, output):
    y, inv, w = inputs
    ctx.has_w = w is not None
    if ctx.has_w:  # y only feeds the gate gradient
        ctx.save_for_backward(y if ctx.needs_input_grad[2] else None, inv, w)
    else:
        ctx.save_for_backward(inv)


def _combine_backward(ctx, grad):
    grad = grad.contiguous()
    if not ctx.has_w:
        (inv,) = ctx.saved_tensors
        return moe_permute(grad, inv), None, None
    y, inv, w = ctx.saved_tensors
    if y is None:
        return moe_combine_backward(grad, inv, w, None)[0], None, None
    grad_y, grad_w = moe_combine_backward(grad, inv, w, y)
    return grad_y, None, grad_w


moe_permute.register_autograd(_permute_backward, setup_context=_permute_setup)
moe_combine.register_autograd(_combine_backward, setup_context=_combine_setup)
