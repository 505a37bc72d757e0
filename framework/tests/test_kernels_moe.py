"""Triton MoE kernels (permute / unpermute, router top-k) against their PyTorch references.

On CPU the kernels run under the Triton interpreter, which must be on before triton is first imported; so
`test_triton_interpreter` reruns this file in a fresh process with TRITON_INTERPRET=1 and PITHTRAIN_TRITON=1,
where the `interp` tests run (run that way directly, they run in-process). The `gpu` tests: real shapes, bf16.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pithtrain.ops.permute import permute, permute_torch, unpermute, unpermute_reference, unpermute_torch
from pithtrain.ops.router import balanced_assignment, router_topk, router_topk_torch
from pithtrain.ops.triton_util import use_triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("PITHTRAIN_TRITON") == "1"
interp = pytest.mark.skipif(not INTERPRETED, reason="run by test_triton_interpreter in a fresh process")
gpu = pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs CUDA, no interpreter")


def skewed_ids(tokens, experts, top_k, device=None):
    """Distinct experts per token, expert 0 hot, experts 1 and 2 never chosen."""
    scores = torch.rand(tokens, experts, device=device)
    scores[:, 0] += 1.0
    scores[:, 1:3] = -1.0
    return scores.topk(top_k, dim=-1).indices


def grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


# ---- CPU, Triton interpreter ----


def test_triton_interpreter():
    """Run the `interp` tests of this file in a process that has the interpreter on from the start."""
    if INTERPRETED:
        pytest.skip("already interpreting")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PITHTRAIN_TRITON": "1"}
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


@interp
@pytest.mark.parametrize("top_k", [2, 3])
def test_permute_unpermute_match_reference(top_k):
    torch.manual_seed(top_k)
    tokens, hidden, experts = 13, 24, 8
    ids = skewed_ids(tokens, experts, top_k)
    x = torch.randn(tokens, hidden, requires_grad=True)
    assert use_triton(x)
    xs, order, counts = permute(x, ids, experts)
    xs_ref, order_ref, counts_ref = permute_torch(x, ids, experts)
    assert torch.equal(xs, xs_ref) and torch.equal(order, order_ref) and torch.equal(counts, counts_ref)
    assert counts[1] == counts[2] == 0 and counts.dtype == torch.long
    g = torch.randn_like(xs)
    torch.testing.assert_close(grads(xs, x, g), grads(xs_ref, x, g))

    y = torch.randn(tokens * top_k, hidden, requires_grad=True)
    w = torch.rand(tokens, top_k, requires_grad=True)
    out, ref = unpermute(y, order, w), unpermute_torch(y, order, w)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out, unpermute_reference(y.detach(), order, w.detach()))
    g = torch.randn_like(out)
    torch.testing.assert_close(grads(out, (y, w), g), grads(ref, (y, w), g))
    (grad_y,) = grads(unpermute(y, order, w.detach()), y, g)  # no gate gradient wanted: skips the dot
    torch.testing.assert_close(grad_y, grads(unpermute_torch(y, order, w), y, g)[0])


@interp
@pytest.mark.parametrize(
    "experts,score_func,norm,bias,scale",
    [(8, "softmax", True, False, 1.0), (8, "softmax", False, False, 2.5), (6, "softmax", True, True, 1.0),
     (8, "sigmoid", True, True, 2.5), (6, "sigmoid", False, False, 1.0)],
)
def test_router_matches_reference(experts, score_func, norm, bias, scale):
    torch.manual_seed(experts)
    tokens, top_k = 13, 3
    logits = torch.randn(tokens, experts, requires_grad=True)
    expert_bias = torch.randn(experts) if bias else None
    args = (top_k, score_func, expert_bias, norm, scale)
    ids, w, scores = router_topk(logits, *args)
    ids_ref, w_ref, scores_ref = router_topk_torch(logits, *args)
    assert ids.dtype == torch.long and w.dtype == scores.dtype == torch.float32
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close((w, scores), (w_ref, scores_ref))
    if bias:  # the bias changes selection only: the weights are still the selected (unbiased) scores
        assert not torch.equal(ids_ref, router_topk_torch(logits, top_k, score_func, None, norm, scale)[0])
    gw, gs = torch.randn_like(w), torch.randn_like(scores)
    torch.testing.assert_close(grads(w, logits, gw), grads(w_ref, logits, gw))
    ids, w, scores = router_topk(logits, *args)
    ids_ref, w_ref, scores_ref = router_topk_torch(logits, *args)
    loss, loss_ref = (w * gw).sum() + (scores * gs).sum(), (w_ref * gw).sum() + (scores_ref * gs).sum()
    torch.testing.assert_close(torch.autograd.grad(loss, logits), torch.autograd.grad(loss_ref, logits))


def moe_token_path(x, router_weight, num_experts, top_k):
    ids, w, scores = router_topk(x @ router_weight.t(), top_k)
    xs, order, counts = permute(x, ids, num_experts)
    scale = counts.repeat_interleave(counts, output_size=xs.shape[0]) / x.shape[0]  # a stand-in "expert"
    return unpermute(xs * scale[:, None], order, w), scores


@interp
def test_custom_ops_compile_without_graph_breaks():
    torch.manual_seed(0)
    x, wr = torch.randn(13, 24, requires_grad=True), torch.randn(8, 24, requires_grad=True)
    compiled = torch.compile(moe_token_path, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (compiled, moe_token_path):
        y, scores = fn(x, wr, 8, 2)
        outs.append((y, scores, *torch.autograd.grad(y.square().sum() + scores.square().sum(), (x, wr))))
    torch.testing.assert_close(outs[0], outs[1])


# ---- no Triton needed ----


@pytest.mark.parametrize(
    "tokens,top_k,experts,stride", [(13, 3, 8, 1), (7, 8, 8, 1), (64, 8, 128, 17), (5, 6, 64, 11)]
)
def test_balanced_assignment(tokens, top_k, experts, stride):
    ids = balanced_assignment(tokens, top_k, experts, stride=stride)
    assert ids.shape == (tokens, top_k) and ids.dtype == torch.long
    counts = torch.bincount(ids.reshape(-1), minlength=experts)
    assert counts.max() - counts.min() <= 1
    assert all(len(set(row)) == top_k for row in ids.tolist())
    with pytest.raises(ValueError, match="coprime"):
        balanced_assignment(tokens, top_k, experts, stride=2)


def test_reference_path_without_cuda_or_flag(monkeypatch):
    monkeypatch.delenv("PITHTRAIN_TRITON", raising=False)
    assert not use_triton(torch.zeros(1))


# ---- GPU, real shapes (Qwen3-30B-A3B: E=128, k=8; DeepSeek-V2-Lite: E=64, k=6) ----


@gpu
@pytest.mark.parametrize("experts,top_k", [(128, 8), (64, 6)])
def test_gpu_permute_unpermute(experts, top_k):
    torch.manual_seed(0)
    tokens, hidden = 8192, 2048
    ids = skewed_ids(tokens, experts, top_k, device="cuda")
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    xs, order, counts = permute(x, ids, experts)
    xs_ref, order_ref, counts_ref = permute_torch(x, ids, experts)
    assert torch.equal(xs, xs_ref) and torch.equal(order, order_ref) and torch.equal(counts, counts_ref)
    g = torch.randn_like(xs)
    x32 = x.detach().float().requires_grad_()
    (gx,) = grads(xs, x, g)
    torch.testing.assert_close(gx.float(), grads(permute_torch(x32, ids, experts)[0], x32, g.float())[0],
                               rtol=1e-2, atol=1e-5)  # fp32 sum, then one bf16 rounding

    y = torch.randn(tokens * top_k, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(tokens, top_k, device="cuda", requires_grad=True)
    y32 = y.detach().float().requires_grad_()
    out, ref = unpermute(y, order, w), unpermute_torch(y32, order, w)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-3)
    g = torch.randn_like(out)
    grad_y, grad_w = grads(out, (y, w), g)
    grad_y_ref, grad_w_ref = grads(ref, (y32, w), g.float())
    torch.testing.assert_close(grad_y.float(), grad_y_ref, rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(grad_w, grad_w_ref, rtol=1e-3, atol=1e-3)
    again = grads(unpermute(y, order, w), (y, w), g)
    assert torch.equal(again[0], grad_y) and torch.equal(again[1], grad_w)  # deterministic


@gpu
@pytest.mark.parametrize(
    "experts,top_k,score_func,norm,bias,scale",
    [(128, 8, "softmax", True, False, 1.0), (64, 6, "softmax", False, False, 1.0),
     (256, 8, "sigmoid", True, True, 2.5)],
)
def test_gpu_router(experts, top_k, score_func, norm, bias, scale):
    torch.manual_seed(0)
    logits = torch.randn(8192, experts, device="cuda", requires_grad=True)
    expert_bias = 0.1 * torch.randn(experts, device="cuda") if bias else None
    args = (top_k, score_func, expert_bias, norm, scale)
    ids, w, scores = router_topk(logits, *args)
    ids_ref, w_ref, scores_ref = router_topk_torch(logits, *args)
    same = (ids == ids_ref).all(dim=1)  # near-ties may order differently: 1 ulp differences in exp
    assert same.float().mean() > 0.999
    torch.testing.assert_close(scores, scores_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w[same], w_ref[same], rtol=1e-5, atol=1e-6)
    gw, gs = torch.randn_like(w), torch.randn_like(scores)
    (g,) = torch.autograd.grad((w * gw).sum() + (scores * gs).sum(), logits)
    (g_ref,) = torch.autograd.grad((w_ref * gw).sum() + (scores_ref * gs).sum(), logits)
    torch.testing.assert_close(g[same], g_ref[same], rtol=1e-4, atol=1e-6)


@gpu
def test_gpu_compile_inductor():
    torch.manual_seed(0)
    x = torch.randn(512, 256, device="cuda", requires_grad=True)
    wr = torch.randn(64, 256, device="cuda", requires_grad=True)
    compiled = torch.compile(moe_token_path, fullgraph=True)
    outs = []
    for fn in (compiled, moe_token_path):
        y, scores = fn(x, wr, 64, 6)
        outs.append((y, scores, *torch.autograd.grad(y.square().sum() + scores.square().sum(), (x, wr))))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
