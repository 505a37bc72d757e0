"""Router top-k: logits to (expert ids, gate weights, scores) in one kernel, beside its PyTorch reference.

`router_topk_torch` is the math of `Router.forward` for n_group == 1: scores = softmax or sigmoid of the
logits, selection = scores (+ a per-expert bias, which steers selection but never the weights), top-k,
weights = the selected scores, optionally renormalised to sum to 1, times a scaling factor. The Triton kernel
does all of that for a block of tokens in registers (E <= 1024) and also writes the scores, for the balance
loss; a second kernel takes the gradients of both the weights and the scores back to the logits. Both are
custom ops ("pithtrain::router_topk", "pithtrain::router_topk_backward") that torch.compile keeps in a graph.

Ties: the kernel picks experts by repeated argmax, so of equal selection values the lowest expert id is taken
first; torch.topk leaves the order of ties unspecified. With real-valued logits ties do not occur in practice.
"""

import functools
import math

import torch

from pithtrain.ops.triton_util import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path still works
    triton = tl = None

MAX_EXPERTS = 1024  # the Triton kernel holds a [tokens, E] tile in registers; above this, the reference runs


def router_topk_torch(logits, top_k: int, score_func: str = "softmax", expert_bias=None,
                      norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0):
    """logits [T, E] -> (expert_ids [T, k] int64, weights [T, k], scores [T, E]) in the logits' dtype."""
    scores = logits.softmax(dim=-1) if score_func == "softmax" else logits.sigmoid()
    select = scores + expert_bias if expert_bias is not None else scores
    expert_ids = select.topk(top_k, dim=-1).indices
    weights = scores.gather(1, expert_ids)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return expert_ids, weights * routed_scaling_factor, scores


def router_topk(logits, top_k: int, score_func: str = "softmax", expert_bias=None,
                norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0):
    """logits [T, E] -> (expert_ids [T, k] int64, weights [T, k] fp32, scores [T, E] fp32), as the reference.

    Triton on CUDA (or with PITHTRAIN_TRITON=1) when E <= MAX_EXPERTS; the logits are taken in fp32 either
    way.
    Gradients flow to the logits from both the weights and the scores.
    """
    logits = logits.float()
    if not use_triton(logits) or logits.shape[-1] > MAX_EXPERTS:
        args = (top_k, score_func, expert_bias, norm_topk_prob, routed_scaling_factor)
        return router_topk_torch(logits, *args)
    bias = None if expert_bias is None else expert_bias.float().contiguous()
    return router_topk_op(logits.contiguous(), bias, top_k, score_func, norm_topk_prob, routed_scaling_factor)


def balanced_assignment(num_tokens: int, top_k: int, num_experts: int, device=None, stride: int = 1):
    """expert_ids [T, k] int64 giving every expert the same number of slots (+-1) and each token k distinct
    experts (k <= E): slot j = t*k + s goes to expert (j mod E) * stride mod E. For throughput benchmarks with
    forced balance. With stride 1 a token's experts are consecutive ids (few expert-parallel ranks per token);
    a stride coprime to E, e.g. E // k + 1, spreads them over the ranks. Made on the device, no host sync."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"balanced_assignment: top_k={top_k} must be in [1, num_experts={num_experts}]")
    if math.gcd(stride, num_experts) != 1:
        raise ValueError(f"balanced_assignment: stride={stride} must be coprime to num_experts={num_experts}")
    slots = torch.arange(num_tokens * top_k, device=device).view(num_tokens, top_k)
    return slots % num_experts * stride % num_experts


# ---- Triton kernel ----


@functools.cache  # built on first use: importing this module compiles nothing
def _kernels():
    @triton.jit
    def router_fwd(logits, bias, ids, weights, scores, T, scale, E: tl.constexpr, K: tl.constexpr,
                   E_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, SIGMOID: tl.constexpr,
                   HAS_BIAS: tl.constexpr, NORM: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        rows = tl.minimum(rows, T - 1).to(tl.int64)  # past-the-end rows repeat the last one, never stored
        cols = tl.arange(0, E_PAD)
        cmask = cols < E
        x = tl.load(logits + rows[:, None] * E + cols[None, :], mask=cmask[None, :], other=float("-inf"))
        x = x.to(tl.float32)
        if SIGMOID:
            p = tl.where(cmask[None, :], tl.sigmoid(x), 0.0)
        else:
            e = tl.exp(x - tl.max(x, axis=1)[:, None])
            p = e / tl.sum(e, axis=1)[:, None]
        tl.store(scores + rows[:, None] * E + cols[None, :], p, mask=rmask[:, None] & cmask[None, :])
        select = p
        if HAS_BIAS:
            select = p + tl.load(bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        select = tl.where(cmask[None, :], select, float("-inf"))
        slot = tl.arange(0, K_PAD)[None, :]
        top_ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
        top_w = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
        for s in tl.static_range(K):  # repeated argmax; ties go to the lowest expert id
            best = tl.argmax(select, axis=1)
            hit = cols[None, :] == best[:, None]
            top_w = tl.where(slot == s, tl.sum(tl.where(hit, p, 0.0), axis=1)[:, None], top_w)
            top_ids = tl.where(slot == s, best[:, None], top_ids)
            select = tl.where(hit, float("-inf"), select)
        if NORM:
            top_w = top_w / tl.sum(top_w, axis=1)[:, None]
        out = rows[:, None] * K + slot
        omask = rmask[:, None] & (slot < K)
        tl.store(ids + out, top_ids.to(tl.int64), mask=omask)
        tl.store(weights + out, top_w * scale, mask=omask)

    @triton.jit
    def router_bwd(scores, ids, grad_w, grad_scores, grad_logits, T, scale, E: tl.constexpr, K: tl.constexpr,
                   E_PAD: tl.constexpr, BLOCK_T: tl.constexpr, SIGMOID: tl.constexpr, NORM: tl.constexpr,
                   HAS_GW: tl.constexpr, HAS_GS: tl.constexpr):
        """w = c * g / sum(g) (or c * g), g = p[ids], so dg = c * (dw - sum(dw * g) / sum(g)) / sum(g)
        (or c * dw); scattered into dp (a token's ids are distinct), plus the scores' own gradient, then
        through p = softmax or sigmoid."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        rows = tl.minimum(rows, T - 1).to(tl.int64)
        cols = tl.arange(0, E_PAD)
        cmask = cols < E
        tile = rows[:, None] * E + cols[None, :]
        p = tl.load(scores + tile, mask=cmask[None, :], other=0.0)
        dp = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
        if HAS_GS:
            dp = tl.load(grad_scores + tile, mask=cmask[None, :], other=0.0).to(tl.float32)
        if HAS_GW:
            total = tl.zeros([BLOCK_T], dtype=tl.float32)
            dot = tl.zeros([BLOCK_T], dtype=tl.float32)
            if NORM:
                for s in tl.static_range(K):
                    hit = cols[None, :] == tl.load(ids + rows * K + s)[:, None]
                    g = tl.sum(tl.where(hit, p, 0.0), axis=1)
                    total += g
                    dot += tl.load(grad_w + rows * K + s).to(tl.float32) * g
            for s in tl.static_range(K):
                hit = cols[None, :] == tl.load(ids + rows * K + s)[:, None]
                dg = tl.load(grad_w + rows * K + s).to(tl.float32) * scale
                if NORM:
                    dg = (dg - scale * dot / total) / total
                dp += tl.where(hit, dg[:, None], 0.0)
        if SIGMOID:
            dx = dp * p * (1.0 - p)
        else:
            dx = p * (dp - tl.sum(dp * p, axis=1)[:, None])
        tl.store(grad_logits + tile, dx, mask=rmask[:, None] & cmask[None, :])

    return router_fwd, router_bwd


def _block_t(experts: int) -> int:
    return max(1, min(32, 4096 // triton.next_power_of_2(experts)))


@torch.library.custom_op("pithtrain::router_topk", mutates_args=())
def router_topk_op(
    logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, score_func: str, norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E] fp32 contiguous -> (expert_ids [T, k] int64, weights [T, k] fp32, scores [T, E] fp32)."""
    tokens, experts = logits.shape
    ids = logits.new_empty(tokens, top_k, dtype=torch.int64)
    weights = logits.new_empty(tokens, top_k)
    scores = torch.empty_like(logits)
    if tokens:
        block_t = _block_t(experts)
        _kernels()[0][(triton.cdiv(tokens, block_t),)](
            logits, logits if bias is None else bias, ids, weights, scores, tokens, routed_scaling_factor,
            E=experts, K=top_k, E_PAD=triton.next_power_of_2(experts), K_PAD=triton.next_power_of_2(top_k),
            BLOCK_T=block_t, SIGMOID=score_func == "sigmoid", HAS_BIAS=bias is not None, NORM=norm_topk_prob,
            num_warps=4)
    return ids, weights, scores


@router_topk_op.register_fake
def _(logits, bias, top_k, score_func, norm_topk_prob, routed_scaling_factor):
    tokens = logits.shape[0]
    return (logits.new_empty(tokens, top_k, dtype=torch.int64), logits.new_empty(tokens, top_k),
            torch.empty_like(logits))


@torch.library.custom_op("pithtrain::router_topk_backward", mutates_args=())
def router_topk_backward(
    scores: torch.Tensor, ids: torch.Tensor, grad_weights: torch.Tensor | None,
    grad_scores: torch.Tensor | None, score_func: str, norm_topk_prob: bool, routed_scaling_factor: float,
) -> torch.Tensor:
    """Gradient of router_topk_op's logits from those of its weights and scores (None: zero)."""
    tokens, experts = scores.shape
    grad_logits = torch.empty_like(scores)
    if tokens:
        block_t = _block_t(experts)
        _kernels()[1][(triton.cdiv(tokens, block_t),)](
            scores, ids, scores if grad_weights is None else grad_weights,
            scores if grad_scores is None else grad_scores, grad_logits, tokens, routed_scaling_factor,
            E=experts, K=ids.shape[1], E_PAD=triton.next_power_of_2(experts), BLOCK_T=block_t,
            SIGMOID=score_func == "sigmoid", NORM=norm_topk_prob, HAS_GW=grad_weights is not None,
            HAS_GS=grad_scores is not None, num_warps=4)
    return grad_logits


@router_topk_backward.register_fake
def _(scores, ids, grad_weights, grad_scores, score_func, norm_topk_prob, routed_scaling_factor):
    return torch.empty_like(scores)


def _setup(ctx, inputs, output):
    _, _, _, ctx.score_func, ctx.norm, ctx.scale = inputs
    ids, _, scores = output
    ctx.save_for_backward(ids, scores)


def _backward(ctx, _grad_ids, grad_weights, grad_scores):
    ids, scores = ctx.saved_tensors
    grads = [None if g is None else g.contiguous() for g in (grad_weights, grad_scores)]
    grad_logits = router_topk_backward(scores, ids, *grads, ctx.score_func, ctx.norm, ctx.scale)
    return grad_logits, None, None, None, None, None


router_topk_op.register_autograd(_backward, setup_context=_setup)
