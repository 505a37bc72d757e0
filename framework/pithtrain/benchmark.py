"""Training throughput: `python -m pithtrain.benchmark --config framework/configs/small-qwen3-moe.toml --steps 20`.

Runs the training step of `pithtrain.train` (same model build, compile, optimizer, clipping) on seeded random
tokens, so every framework in the side-by-side benchmark (adapters/throughput.py) sees the same data, and
reports the steady state after `--warmup` steps:

- tokens/s, TFLOP/s per GPU and MFU. FLOPs per token are the model file's `flops_per_token`:
  6 x (active matmul parameters: attention projections, dense MLPs, router, top-k routed + shared experts,
  lm_head) + 6 x layers x seq x heads x (qk_head_dim + v_head_dim) for attention scores, not halved for
  causality (TorchTitan's convention). MFU divides by the dense bf16 peak (989 TFLOP/s on H100/H200).
- peak memory (torch.cuda.max_memory_allocated),
- a step-time breakdown from the profiler over one extra step: GPU time (CPU time on CPU) of the kernels under
  each `pithtrain.*` region (attention, router, dispatch, experts, combine, mlp, loss, optimizer), forward and
  backward; a backward kernel counts for the region whose forward op created its autograd node. Compiled
  "layers" hide the regions inside them (use "regions" or "none" for the breakdown).

The JSON result (atomic write) goes to --out; a single process (one GPU or the CPU) or torchrun's ranks.
"""

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import pithtrain
from pithtrain.config import ConfigError, load_config, model_module, to_dict
from pithtrain.fileio import write_json_atomic
from pithtrain.parallel.mesh import Parallel
from pithtrain.train import (
    autocast_dtype,
    build_model,
    build_optimizer,
    default_allocator_settings,
    forward_backward,
    lr_factor,
    optimizer_step,
    peak_flops,
    peak_memory_gib,
    resolve_device,
)

REGIONS = ("attention", "router", "dispatch", "experts", "combine", "mlp", "loss", "optimizer")


def random_batches(cfg, generator: torch.Generator, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` micro-batches of uniform random token ids in [0, vocab): the same for every framework."""
    t = cfg.train
    out = []
    for _ in range(count):
        tokens = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), generator=generator)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


class RandomTokenStepper:
    """The training step of `pithtrain.train` (its model, AdamW, LR schedule, forward_backward, optimizer_step) on
    seeded random tokens: what the benchmark times, and what the profile-step and estimate-memory skills run.
    `stepper(before_update)` runs one step, calls `before_update()` (if given) between backward and the
    optimizer update, and returns the step's mean cross-entropy over all data-parallel ranks."""

    def __init__(self, cfg, par: Parallel, total_steps: int):
        self.cfg, self.par = cfg, par
        self.amp_dtype = autocast_dtype(cfg, par.device)
        self.model, _, self.n_params = build_model(cfg, par)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda s: lr_factor(s, cfg.optim, total_steps))
        self.generator = torch.Generator().manual_seed(cfg.train.seed + par.dp_rank)

    def __call__(self, before_update=None) -> float:
        t, par = self.cfg.train, self.par
        batches = random_batches(self.cfg, self.generator, t.grad_accum)
        ce_sum = forward_backward(self.model, batches, par, par.device, self.amp_dtype)[0]
        if before_update is not None:
            before_update()
        optimizer_step(self.model, self.optimizer, self.scheduler, par, self.cfg.optim.grad_clip)
        return (par.all_reduce(ce_sum.float().clone()) / (t.grad_accum * par.dp_size)).item()


def region_of(event, forward_regions: dict) -> str | None:
    """The pithtrain region an op belongs to: its own or an enclosing `pithtrain.*` annotation, else (backward)
    the region of the forward op whose autograd node it evaluates."""
    node = event
    while node is not None:
        if node.name.startswith("pithtrain."):
            return node.name.removeprefix("pithtrain.")
        if node.name.startswith("autograd::engine::evaluate_function") and node.sequence_nr >= 0:
            return forward_regions.get((node.fwd_thread, node.sequence_nr))
        node = node.cpu_parent
    return None


def breakdown(prof, on_gpu: bool) -> dict:
    """Milliseconds of self GPU (or CPU) time per region for the profiled step, plus `other` and `total`."""
    events = list(prof.events())
    forward_regions = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::engine"):
            region = region_of(e, {})
            if region is not None:
                forward_regions.setdefault((e.thread, e.sequence_nr), region)
    ms, kernels = defaultdict(float), defaultdict(float)
    for e in events:
        if e.device_type != DeviceType.CPU:  # GPU-side copies of annotations span their kernels: counted below
            continue
        spent = e.self_device_time_total if on_gpu else e.self_cpu_time_total
        if spent <= 0:
            continue
        ms[region_of(e, forward_regions) or "other"] += spent / 1e3
        for k in getattr(e, "kernels", []) if on_gpu else []:
            kernels[k.name] += k.duration / 1e3
    result = {r: round(ms.get(r, 0.0), 3) for r in (*REGIONS, "other")}
    result["total"] = round(sum(result.values()), 3)  # the sum of the rows as printed
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {"regions_ms": result, "top_kernels_ms": [[name[:120], round(t, 3)] for name, t in top]}


def benchmark(cfg, steps: int, warmup: int, profile_step: bool = True) -> dict:
    par = Parallel(cfg, resolve_device(cfg))
    try:
        return _benchmark(cfg, par, steps, warmup, profile_step)
    finally:
        par.close()


def _benchmark(cfg, par: Parallel, steps: int, warmup: int, profile_step: bool) -> dict:
    device, t = par.device, cfg.train
    step = RandomTokenStepper(cfg, par, steps + warmup + 1)
    amp_dtype, n_params = step.amp_dtype, step.n_params
    tokens_per_step = t.micro_batch_size * t.grad_accum * t.seq_len * par.dp_size
    flops_per_token = model_module(cfg.family).flops_per_token(cfg.model, t.seq_len)
    peak = peak_flops(device)
    lead = par.rank == 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    times, losses = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - start)
        if lead:
            phase = "warmup" if i < warmup else "measure"
            print(f"{phase} step {i + 1}/{warmup + steps} | loss {losses[-1]:.4f} | {times[-1] * 1e3:.1f} ms | "
                  f"{tokens_per_step / times[-1]:,.0f} tok/s", flush=True)
    steady = times[warmup:]
    step_time = sum(steady) / len(steady)
    tokens_per_s = tokens_per_step / step_time
    tflops = flops_per_token * tokens_per_s / par.world / 1e12
    result = {
        "framework": "pithtrain",
        "version": pithtrain.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": par.world,
        "config": cfg.source,
        "family": cfg.family,
        "params": n_params,
        "micro_batch": t.micro_batch_size,
        "grad_accum": t.grad_accum,
        "seq_len": t.seq_len,
        "dtype": str(amp_dtype).removeprefix("torch.") if amp_dtype else "float32",
        "compile": t.compile,
        "activation_checkpointing": t.activation_checkpointing,
        "routing": "balanced" if cfg.model.router.force_balanced else "natural",
        "steps": steps,
        "warmup": warmup,
        "tokens_per_step": tokens_per_step,
        "step_time_s": step_time,
        "step_time_median_s": statistics.median(steady),
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "tflops_per_gpu": tflops,
        "mfu": tflops * 1e12 / peak if peak else None,
        "peak_mem_gib": peak_memory_gib(device),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    if profile_step:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with warnings.catch_warnings(), profile(activities=activities) as prof:
            warnings.simplefilter("ignore")  # "Profiler clears events at the end of each cycle": one cycle here
            step()
            sync()
        found = breakdown(prof, device.type == "cuda")
        result["breakdown_ms"], result["top_kernels_ms"] = found["regions_ms"], found["top_kernels_ms"]
    if lead:
        b = result.get("breakdown_ms")
        parts = "" if not b else " | " + ", ".join(f"{k} {v:.1f}" for k, v in b.items() if v and k != "total")
        mfu = f", MFU {result['mfu']:.1%}" if result["mfu"] is not None else ""
        print(f"result: {tokens_per_s:,.0f} tok/s, {tflops:.1f} TFLOP/s per GPU{mfu}, peak {result['peak_mem_gib']:.1f}"
              f" GiB, step {step_time * 1e3:.1f} ms{parts} (ms)", flush=True)
    result["config_values"] = to_dict(cfg)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pithtrain.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="TOML run config, e.g. framework/configs/small-qwen3-moe.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set model.router.force_balanced=true")
    parser.add_argument("--steps", type=int, default=10, help="measured steps after warmup (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first: compile, allocator (default 3)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled step (no breakdown)")
    parser.add_argument("--out", help="write the JSON result here (atomically)")
    args = parser.parse_args(argv)
    default_allocator_settings()
    try:
        if args.steps < 1 or args.warmup < 0:
            raise ConfigError("--steps must be >= 1 and --warmup >= 0")
        cfg = load_config(args.config, args.overrides)
        result = benchmark(cfg, args.steps, args.warmup, not args.no_profile)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["command"] = " ".join(["python -m pithtrain.benchmark", *(argv if argv is not None else sys.argv[1:])])
    if args.out and int(os.environ.get("RANK", "0")) == 0:
        write_json_atomic(Path(args.out), result)
    elif not args.out:
        print(json.dumps({k: v for k, v in result.items() if k != "config_values"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
