"""Cross-entropy of a linear head, `F.cross_entropy(F.linear(hidden, weight).float(), labels)`, without the
full [N, V] logits.

Tokens are processed in chunks of `chunk_size` rows. For each chunk the logits are one GEMM in the compute
dtype; a Triton kernel takes the row's logsumexp and loss and, when gradients are wanted, overwrites the
logits in place with d(mean loss)/d(logits) = (softmax - onehot) / num_valid; two more GEMMs turn that into
the chunk's grad_hidden rows and add its share of grad_weight (fp32 accumulator). So the backward is done
during the forward, and autograd's backward only scales the stored gradients by grad_output. Extra memory is
one chunk of logits (chunk_size x V), a compute-dtype copy of the weight and the fp32 grad_weight.

Autocast: under autocast on hidden's device both operands are cast to the autocast dtype, as F.linear would
(so logits, grad_logits and grad_hidden are bf16 under bf16 autocast, and the loss is reduced in fp32 from the
bf16 logits, like the reference's `.float()`); without autocast the compute dtype is hidden's dtype. The
gradient reaches hidden through the cast (autograd casts it back) and the weight in the weight's own dtype.
"""

import functools

import torch
import torch.nn.functional as F

from pithtrain.ops.triton_util import use_triton

MAX_BLOCK_V = 4096  # vocabulary columns per kernel step; a tuning knob (tests lower it to cover several blocks)


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy over labels != ignore_index of hidden [N, H] @ weight [V, H]^T; materialises logits."""
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=ignore_index)


def default_chunk_size(tokens: int, vocab: int) -> int:
    """Rows per chunk: chunks of equal size (a multiple of 128) with at most ~2^29 logits each (1 GiB in bf16).
    On an H100 at V=152K, chunks of 2K-4K rows keep the GEMMs efficient; 1K rows cost ~10% more time."""
    tokens, max_rows = max(tokens, 1), max(128, (1 << 29) // max(vocab, 1))
    per_chunk = -(-tokens // -(-tokens // max_rows))
    return -(-per_chunk // 128) * 128


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """hidden [..., H], weight [V, H], labels [...] (int64) -> mean loss over labels != ignore_index, fp32
    scalar (nan when every label is ignored, like F.cross_entropy). Gradients flow to hidden and weight."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if not use_triton(hidden):
        return linear_cross_entropy_reference(h, weight, y, ignore_index)
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        h = h.to(torch.get_autocast_dtype(device))
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    chunk = chunk_size or default_chunk_size(h.shape[0], weight.shape[0])
    return torch.ops.pithtrain.linear_cross_entropy(h, weight, y, ignore_index, chunk, with_grad)[0]


@functools.cache
def _kernels():
    """Defined on first use, so that the package imports without triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def ce_rows(logits_ptr, labels_ptr, loss_ptr, scale_ptr, vocab, ignore_index,
                BLOCK: tl.constexpr, WITH_GRAD: tl.constexpr):
        """One program per row: online logsumexp over the row, loss, then (WITH_GRAD) the row's gradient
        written over its logits. `while` loops: the interpreter's range() cannot take a runtime bound."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * vocab
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        start = 0
        while start < vocab:
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
            start += BLOCK
        lse = m + tl.log(s)
        in_range = valid & (label >= 0) & (label < vocab)
        target = tl.load(base + label, mask=in_range, other=0.0).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
        if WITH_GRAD:
            scale = tl.where(valid, tl.load(scale_ptr), 0.0)
            start = 0
            while start < vocab:
                cols = start + tl.arange(0, BLOCK)
                mask = cols < vocab
                x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
                p = tl.exp(x - lse)
                g = tl.where(cols == label, p - 1.0, p) * scale
                tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)
                start += BLOCK

    return ce_rows



def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out (+)= a @ b, where out may be fp32 and a, b bf16: on CUDA the GEMM writes fp32 directly (beta=0 for
    the first chunk, so `out` need not be zeroed first); elsewhere through a temporary in a/b's dtype."""
    if out.dtype == a.dtype:
        torch.addmm(out, a, b, beta=int(accumulate), out=out)
    elif out.is_cuda:
        torch.addmm(out, a, b, out_dtype=out.dtype, beta=int(accumulate), out=out)
    elif accumulate:
        out.add_(a @ b)
    else:
        out.copy_(a @ b)


@torch.library.custom_op("pithtrain::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, chunk_size: int,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss, grad_hidden, grad_weight) for a grad_output of 1; the grads are empty when not with_grad."""
    n, vocab = hidden.shape[0], weight.shape[0]
    with torch.autocast(hidden.device.type, enabled=False):
        hidden = hidden.contiguous()
        w, labels = weight.to(hidden.dtype), labels.contiguous()
        num_valid = (labels != ignore_index).sum()
        scale = 1.0 / num_valid.clamp_min(1).float()  # device scalar: no host sync
        loss_rows = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if with_grad else hidden.new_empty(0)
        grad_w = None
        if with_grad:  # fp32 accumulator; the first chunk's GEMM overwrites it, so zeros only without chunks
            grad_w = (torch.empty if n else torch.zeros)(weight.shape, dtype=torch.float32, device=weight.device)
        chunk = max(1, min(chunk_size, n))
        buf = hidden.new_empty(chunk, vocab)
        block = min(MAX_BLOCK_V, 1 << max(0, vocab - 1).bit_length())
        kernel = _kernels()
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            h = hidden[s:e]
            logits = torch.mm(h, w.t(), out=buf[: e - s])
            kernel[(e - s,)](logits, labels[s:e], loss_rows[s:e], scale, vocab, ignore_index,
                             BLOCK=block, WITH_GRAD=with_grad, num_warps=8)
            if with_grad:  # logits now hold d(loss)/d(logits)
                torch.mm(logits, w, out=grad_h[s:e])
                _matmul_into(grad_w, logits.t(), h, accumulate=s > 0)
        loss = loss_rows.sum() / num_valid
    if not with_grad:
        return loss, grad_h, weight.new_empty(0)
    return loss, grad_h, grad_w if weight.dtype == torch.float32 else grad_w.to(weight.dtype)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, labels, ignore_index, chunk_size, with_grad):
    loss = hidden.new_empty((), dtype=torch.float32)
    if not with_grad:
        return loss, hidden.new_empty(0), weight.new_empty(0)
    return loss, torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    _, grad_h, grad_w = output
    ctx.mark_non_differentiable(grad_h, grad_w)
    ctx.save_for_backward(grad_h, grad_w)


def _backward(ctx, grad_loss, _grad_h, _grad_w):
    """The gradients were computed in the forward for grad_output = 1; scale them in place (no copy of the
    [V, H] grad_weight). A second backward through the same graph is refused by autograd's version check."""
    grad_h, grad_w = ctx.saved_tensors
    return grad_h.mul_(grad_loss), grad_w.mul_(grad_loss), None, None, None, None


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)
