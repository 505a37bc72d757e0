"""Reference vs Triton for the dense kernels of a training step: SwiGLU, linear cross-entropy, RMSNorm.

    python framework/benchmarks/bench_dense_kernels.py [--reps 20] [--only ce]

Each case runs forward + backward of one call and reports: wall ms (CUDA events around the call, median over
reps; includes CPU dispatch gaps, which dominate the small ops), GPU ms (the sum of the call's kernel times from
the profiler: what the call costs when the GPU is kept busy, as in training), and the peak memory the call
allocates above what was live before it. Prints a table, then one JSON line with every number. Needs a GPU.
"""

import argparse
import json
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from pithtrain.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from pithtrain.ops.rmsnorm import rms_norm, rms_norm_reference
from pithtrain.ops.swiglu import swiglu, swiglu_reference


def measure(step, reps: int) -> tuple[float, float, float]:
    """(median wall ms, GPU kernel ms, peak MiB above the memory live before the call) of step()."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    gpu_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1000
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return statistics.median(times), gpu_ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def fwd_bwd(fn, inputs, grads=None):
    """A step: out = fn(); out.backward(grad); the parameters' grads are dropped so nothing accumulates."""

    def step():
        for t in inputs:
            t.grad = None
        out = fn()
        out.backward(grads if grads is not None else None)
        for t in inputs:
            t.grad = None

    return step


def case_swiglu(reps):
    n, inter = 65536, 768
    x = torch.randn(n, 2 * inter, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(n, inter, device="cuda", dtype=torch.bfloat16)
    return {
        "name": f"swiglu N={n} I={inter} bf16",
        "reference": measure(fwd_bwd(lambda: swiglu_reference(x), [x], g), reps),
        "triton": measure(fwd_bwd(lambda: swiglu(x), [x], g), reps),
    }


def case_ce(reps, chunk_size=None):
    n, h, v = 8192, 2048, 151936
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, h, device="cuda") * 0.02).requires_grad_()  # fp32 master weight, bf16 autocast
    y = torch.randint(0, v, (n,), device="cuda")
    y[::10] = -100

    def ref():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return linear_cross_entropy_reference(x, w, y)

    def fused():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return linear_cross_entropy(x, w, y, chunk_size=chunk_size)

    return {
        "name": f"linear_cross_entropy N={n} H={h} V={v} bf16 autocast, fp32 weight, chunk={chunk_size or 'default'}",
        "reference": measure(fwd_bwd(ref, [x, w]), reps),
        "triton": measure(fwd_bwd(fused, [x, w]), reps),
    }


def case_rmsnorm(reps, n=16384, h=2048, x_dtype=torch.bfloat16, w_dtype=torch.bfloat16):
    x = torch.randn(n, h, device="cuda", dtype=x_dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(h, device="cuda")).to(w_dtype).requires_grad_()
    g = torch.randn(n, h, device="cuda", dtype=torch.promote_types(x_dtype, w_dtype))
    name = f"rms_norm N={n} H={h} x {str(x_dtype)[6:]} w {str(w_dtype)[6:]}"
    return {
        "name": name,
        "reference": measure(fwd_bwd(lambda: rms_norm_reference(x, w, 1e-6), [x, w], g), reps),
        "triton": measure(fwd_bwd(lambda: rms_norm(x, w, 1e-6), [x, w], g), reps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--only", choices=["swiglu", "ce", "rmsnorm"], default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = {
        "swiglu": lambda: [case_swiglu(args.reps)],
        "ce": lambda: [case_ce(args.reps), case_ce(args.reps, chunk_size=4096), case_ce(args.reps, chunk_size=1024)],
        "rmsnorm": lambda: [
            case_rmsnorm(args.reps),
            case_rmsnorm(args.reps, x_dtype=torch.float32, w_dtype=torch.float32),  # the residual stream
            case_rmsnorm(args.reps, n=16384 * 32, h=128, w_dtype=torch.float32),  # q_norm over heads
        ],
    }
    results = []
    for key, run in cases.items():
        if args.only in (None, key):
            results += run()
            torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    head = ("wall ms ref", "triton", "GPU ms ref", "triton", "speedup", "peak MiB ref", "triton")
    print(f"{'case':<84}" + "".join(f"{h:>13}" for h in head))
    record = []
    for r in results:
        (rw, rg, rm), (tw, tg, tm) = r["reference"], r["triton"]
        print(f"{r['name']:<84}" + "".join(f"{v:13.3f}" for v in (rw, tw, rg, tg, rg / tg)) + f"{rm:13.0f}{tm:13.0f}")
        record.append({"case": r["name"], "ref_wall_ms": rw, "triton_wall_ms": tw, "ref_gpu_ms": rg,
                       "triton_gpu_ms": tg, "ref_peak_mib": rm, "triton_peak_mib": tm})
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": record}))


if __name__ == "__main__":
    main()
