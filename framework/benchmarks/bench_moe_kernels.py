"""Time the MoE token-path ops, PyTorch reference vs Triton, forward and forward+backward.

    PYTHONPATH=framework python framework/benchmarks/bench_moe_kernels.py [--tokens 8192] [--iters 20]

Shapes: Qwen3-30B-A3B (H=2048, E=128, k=8, normalised top-k) and DeepSeek-V2-Lite (H=2048, E=64, k=6,
unnormalised), bf16 activations, fp32 router. Routing comes from random router logits (mildly unbalanced).
Prints ms per call and one JSON line with all results. Needs a GPU. `ms` is wall time per call (CUDA events,
back to back), which at these sizes can be bound by the CPU launching kernels; `gpu_ms` sums the time of the
kernels alone (torch.profiler), which is what the ops cost inside a GPU-bound training step.
"""

import argparse
import json

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from pithtrain.ops.permute import permute, permute_torch, unpermute, unpermute_torch
from pithtrain.ops.router import router_topk, router_topk_torch

SHAPES = {"qwen3-30b-a3b": (2048, 128, 8, True), "deepseek-v2-lite": (2048, 64, 6, False)}


def cuda_ms(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def kernel_ms(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]  # not the launching ops
    return sum(e.self_device_time_total for e in kernels) / iters / 1e3


def cases(tokens: int, hidden: int, experts: int, top_k: int, norm: bool):
    """(op, impl, forward fn returning (outputs, inputs to differentiate)) for one shape."""
    dev = "cuda"
    logits = torch.randn(tokens, experts, device=dev, requires_grad=True)
    x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ids, w, _ = router_topk_torch(logits.detach(), top_k, norm_topk_prob=norm)
    w = w.requires_grad_()
    order = permute_torch(x.detach(), ids, experts)[1]
    y = torch.randn(tokens * top_k, hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    for impl, rt, pm, um in (("torch", router_topk_torch, permute_torch, unpermute_torch),
                             ("triton", router_topk, permute, unpermute)):
        yield "router", impl, lambda rt=rt: (rt(logits, top_k, norm_topk_prob=norm)[1::2], (logits,))
        yield "permute", impl, lambda pm=pm: ((pm(x, ids, experts)[0],), (x,))
        yield "unpermute", impl, lambda um=um: ((um(y, order, w),), (y, w))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    results = []
    for name, (hidden, experts, top_k, norm) in SHAPES.items():
        for op, impl, fwd in cases(args.tokens, hidden, experts, top_k, norm):
            outs, inputs = fwd()
            grads = [torch.randn_like(o) for o in outs]

            def fwd_bwd(fwd=fwd, grads=grads):
                outs, inputs = fwd()
                torch.autograd.grad(outs, inputs, grads)

            with torch.no_grad():
                f_ms, f_gpu = cuda_ms(fwd, args.iters), kernel_ms(fwd, args.iters)
            fb_ms, fb_gpu = cuda_ms(fwd_bwd, args.iters), kernel_ms(fwd_bwd, args.iters)
            times = dict(fwd_ms=f_ms, fwd_gpu_ms=f_gpu, fwd_bwd_ms=fb_ms, fwd_bwd_gpu_ms=fb_gpu)
            results.append(dict(shape=name, op=op, impl=impl, **{k: round(v, 4) for k, v in times.items()}))
            print(f"{name:17s} {op:10s} {impl:7s} fwd {f_ms:7.3f} ms (gpu {f_gpu:7.3f})   "
                  f"fwd+bwd {fb_ms:7.3f} ms (gpu {fb_gpu:7.3f})", flush=True)
    print(json.dumps(dict(device=torch.cuda.get_device_name(), tokens=args.tokens, torch=torch.__version__,
                          results=results)))


if __name__ == "__main__":
    main()
