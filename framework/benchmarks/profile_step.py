"""Where a training step's GPU time goes, and how the expert grouped GEMM compares with a dense matmul.

    python framework/benchmarks/profile_step.py --config framework/configs/small-qwen3-moe.toml

Prints (1) grouped_mm vs dense bf16 matmul throughput at the config's expert shapes (balanced routing),
(2) the top CUDA kernels of one profiled optimizer step. A measuring aid for the throughput work; needs a GPU.
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pithtrain.config import load_config
from pithtrain.train import build_optimizer


def tflops(fn, flops: float, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return flops * reps / (time.perf_counter() - start) / 1e12


def grouped_vs_dense(cfg, tokens: int) -> None:
    r, hidden, inter = cfg.model.router, cfg.model.hidden_size, cfg.model.moe_intermediate_size
    rows = tokens * r.top_k
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(r.num_experts, hidden, 2 * inter, device="cuda", dtype=torch.bfloat16) * 0.02
    offs = torch.arange(1, r.num_experts + 1, device="cuda", dtype=torch.int32) * (rows // r.num_experts)
    flops = 2 * rows * hidden * 2 * inter
    g = tflops(lambda: torch._grouped_mm(x, w, offs=offs), flops)
    wd = torch.randn(hidden, 2 * inter, device="cuda", dtype=torch.bfloat16)
    d = tflops(lambda: x @ wd, flops)
    print(f"gate_up GEMM, {rows} rows x {hidden} -> {2 * inter}, {r.num_experts} experts: grouped {g:.0f} TFLOP/s, "
          f"dense {d:.0f} TFLOP/s, ratio {g / d:.2f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    t = cfg.train
    grouped_vs_dense(cfg, t.micro_batch_size * t.seq_len)
    from pithtrain.config import model_classes

    torch.manual_seed(0)
    model = model_classes(cfg.family)[1](cfg.model)
    model.init_weights()
    model.cuda().train()
    opt = build_optimizer(model, cfg.optim)
    x = torch.randint(0, 4096, (t.micro_batch_size, t.seq_len), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, labels=x, return_logits=False)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
