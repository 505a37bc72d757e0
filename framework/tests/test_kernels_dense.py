"""Triton kernels of the dense step (SwiGLU, linear cross-entropy, RMSNorm) against their PyTorch references.

On CPU the kernels run under the Triton interpreter. Whether triton interprets is fixed when triton is first
imported (its own library functions, tl.sigmoid and the like, are decorated then), so one process cannot run
both modes, and other test modules (pytest-xdist workers) may import triton first: `test_interpreted_kernels`
runs this file's `interpreted` tests in a fresh process with TRITON_INTERPRET=1 and PITHTRAIN_TRITON=1. The
interpreter is slow, so their shapes are tiny but non-power-of-two, with ragged blocks and chunks. GPU tests
use real shapes, in this process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pithtrain.ops import cross_entropy
from pithtrain.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from pithtrain.ops.rmsnorm import rms_norm, rms_norm_reference
from pithtrain.ops.swiglu import swiglu, swiglu_reference
from pithtrain.ops.triton_util import triton_available

CHILD = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("PITHTRAIN_TRITON") == "1"
interpreted = pytest.mark.skipif(not CHILD, reason="runs in the interpreter process of test_interpreted_kernels")
cuda = pytest.mark.skipif(CHILD or not torch.cuda.is_available(), reason="needs a GPU (and compiled triton)")


@pytest.mark.skipif(CHILD or not triton_available(), reason="needs triton; not inside the child itself")
def test_interpreted_kernels():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PITHTRAIN_TRITON": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    args = ["-q", "-k", "interpreted and not test_interpreted_kernels", "-p", "no:cacheprovider", "-p", "no:xdist"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, *args],
        capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


def fused(out: torch.Tensor) -> bool:
    """True when `out` came from one of the custom ops (not from the reference's PyTorch ops)."""
    return "pithtrain" in type(out.grad_fn).__name__


def grads(out, inputs, grad_out=None):
    return torch.autograd.grad(out, inputs, grad_out)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---- CPU, Triton interpreter (in the child process) ----


@interpreted
def test_swiglu_interpreted():
    torch.manual_seed(0)
    for shape in [(3, 7, 2 * 45), (37, 2 * 300)]:  # 3-D input; 300 columns = a full and a ragged 256-block
        x = torch.randn(shape, requires_grad=True)
        y, y_ref = swiglu(x), swiglu_reference(x)
        assert fused(y) and y.shape == y_ref.shape
        torch.testing.assert_close(y, y_ref)
        g = torch.randn_like(y)
        torch.testing.assert_close(grads(y, x, g)[0], grads(y_ref, x, g)[0])


@interpreted
def test_rms_norm_interpreted():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 50, requires_grad=True)
    w = (1 + 0.1 * torch.randn(50)).requires_grad_()
    y, y_ref = rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
    assert fused(y)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    got, want = grads(y, (x, w), g), grads(y_ref, (x, w), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    again = grads(rms_norm(x, w, 1e-6), (x, w), g)
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # grad_weight's partial sums: deterministic


@interpreted
def test_rms_norm_casts_like_the_model_interpreted():
    """bf16 x with an fp32 weight (q/k-norm under autocast): the normalised value is rounded to bf16, y is fp32."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 128).bfloat16().requires_grad_()
    w = (1 + 0.1 * torch.randn(128)).requires_grad_()
    y, y_ref = rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
    assert y.dtype == y_ref.dtype == torch.float32
    # one bf16 ulp apart at most (the interpreter truncates fp32 -> bf16 casts; GPUs round to nearest even)
    torch.testing.assert_close(y, y_ref, atol=1e-2, rtol=1e-2)
    g = torch.randn_like(y)
    got, want = grads(y, (x, w), g), grads(y_ref, (x, w), g)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert rel_err(got[0], want[0]) < 1e-2 and rel_err(got[1], want[1]) < 1e-2


@interpreted
def test_linear_cross_entropy_interpreted(monkeypatch):
    monkeypatch.setattr(cross_entropy, "MAX_BLOCK_V", 128)  # V=300: two full vocabulary blocks and a ragged one
    torch.manual_seed(0)
    h = torch.randn(3, 7, 16, requires_grad=True)  # N=21 tokens in chunks of 8, 8, 5
    w = torch.randn(300, 16, requires_grad=True)
    y = torch.randint(0, 300, (3, 7))
    y[0, :3] = -100
    y[2, 5] = -100
    loss = linear_cross_entropy(h, w, y, chunk_size=8)
    ref = linear_cross_entropy_reference(h.view(-1, 16), w, y.view(-1))
    assert fused(loss) and loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref)
    got, want = grads(loss * 3, (h, w)), grads(ref * 3, (h, w))  # grad_output != 1 scales the stored grads
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert got[0][0, :3].abs().max() == 0  # ignored tokens get no gradient
    with torch.no_grad():  # eval: forward only
        torch.testing.assert_close(linear_cross_entropy(h, w, y, chunk_size=8), ref)
        torch.testing.assert_close(linear_cross_entropy(h, w, y, chunk_size=64), ref)  # one chunk


@interpreted
def test_custom_ops_compile_without_graph_breaks_interpreted(monkeypatch):
    """The three ops inside torch.compile(fullgraph=True): a graph break would raise."""
    monkeypatch.setattr(cross_entropy, "MAX_BLOCK_V", 128)
    torch.manual_seed(0)
    n, hid, inter, vocab = 13, 16, 12, 150
    params = [torch.randn(hid), torch.randn(hid, 2 * inter), torch.randn(inter, hid), torch.randn(vocab, hid)]
    params = [p.requires_grad_() for p in params]
    x = torch.randn(n, hid, requires_grad=True)
    y = torch.randint(0, vocab, (n,))
    y[::4] = -100

    def step(x, y, norm, act, loss_fn):
        nw, wu, wd, wo = params
        h = x + act(norm(x, nw, 1e-6) @ wu) @ wd
        return loss_fn(norm(h, nw, 1e-6), wo, y)

    compiled = torch.compile(
        lambda x, y: step(x, y, rms_norm, swiglu, lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=8)),
        fullgraph=True, backend="aot_eager",
    )
    loss = compiled(x, y)
    ref = step(x, y, rms_norm_reference, swiglu_reference, linear_cross_entropy_reference)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(grads(loss, [x, *params]), grads(ref, [x, *params])):
        torch.testing.assert_close(a, b)


# ---- GPU, real shapes ----


@cuda
def test_swiglu_gpu():
    torch.manual_seed(0)
    x = torch.randn(65536, 2 * 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = swiglu(x)
    assert fused(y) and y.dtype == torch.bfloat16
    exact = swiglu_reference(x.float())  # fp32 truth of the bf16 input: the kernel rounds once
    torch.testing.assert_close(y.float(), exact, atol=1e-2, rtol=1e-2)
    assert rel_err(y, exact) <= rel_err(swiglu_reference(x), exact) * 1.01
    g = torch.randn_like(y)
    torch.testing.assert_close(grads(y, x, g)[0], grads(swiglu_reference(x), x, g)[0], atol=2e-2, rtol=2e-2)


@cuda
def test_linear_cross_entropy_gpu_matches_and_saves_memory():
    torch.manual_seed(0)
    n, hid, vocab = 8192, 2048, 151936
    h = torch.randn(n, hid, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hid, device="cuda") * 0.02).requires_grad_()  # fp32 master weight
    y = torch.randint(0, vocab, (n,), device="cuda")
    y[::7] = -100

    def run(fn):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h, w, y)
        loss.backward()
        torch.cuda.synchronize()
        return loss.detach(), h.grad, w.grad, torch.cuda.max_memory_allocated() - base

    loss, gh, gw, peak = run(linear_cross_entropy)
    ref, gh_ref, gw_ref, peak_ref = run(linear_cross_entropy_reference)
    assert loss.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-3, rtol=1e-4)
    assert rel_err(gh, gh_ref) < 1e-2 and rel_err(gw, gw_ref) < 1e-2
    assert peak < 0.35 * peak_ref, (peak / 2**30, peak_ref / 2**30)


@cuda
def test_rms_norm_gpu():
    torch.manual_seed(0)
    x = torch.randn(16384, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(2048, device="cuda")).bfloat16().requires_grad_()
    y, y_ref = rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
    assert fused(y) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=1e-2)
    g = torch.randn_like(y)
    got, want = grads(y, (x, w), g), grads(y_ref, (x, w), g)
    assert rel_err(got[0], want[0]) < 1e-2 and rel_err(got[1], want[1]) < 1e-2
    again = grads(rms_norm(x, w, 1e-6), (x, w), g)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


@cuda
def test_rms_norm_gpu_casts_like_the_model():
    """q/k-norm under autocast: bf16 x over heads, fp32 weight; the rounding to bf16 matches nearly everywhere."""
    torch.manual_seed(0)
    x = torch.randn(4096, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(128, device="cuda")).requires_grad_()
    y, y_ref = rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=1e-2)
    assert (y != y_ref).float().mean() < 0.01  # only where rstd's last bit moves a value across a rounding tie
    g = torch.randn_like(y)
    got, want = grads(y, (x, w), g), grads(y_ref, (x, w), g)
    assert rel_err(got[0], want[0]) < 1e-2 and rel_err(got[1], want[1]) < 1e-3
