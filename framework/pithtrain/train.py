"""Training entry point: `python -m pithtrain.train --config framework/configs/<name>.toml [--set key=value ...]`.

One loop, read top to bottom: build the model from the config, AdamW + warmup/cosine or WSD,
gradient accumulation, global grad-norm clipping, bf16 autocast on GPU (fp32 master weights),
aux-loss-free router bias updates, one JSON line of metrics per step, DCP checkpoints with
automatic resume. Bad configuration exits with status 2 and a one-line error naming the key.
Under torchrun the same loop runs distributed, laid out by the `[parallel]` table (parallel/mesh.py);
rank 0 writes the run folder.
"""

import argparse
import json
import math
import os
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import record_function

from pithtrain import checkpoint as ckpt
from pithtrain.config import (
    Config,
    ConfigError,
    OptimConfig,
    load_config,
    model_classes,
    model_module,
    to_dict,
)
from pithtrain.data import DataLoader, TokenShards, builtin_dataset, eval_batches
from pithtrain.fileio import write_json_atomic
from pithtrain.models.blocks import MoE
from pithtrain.parallel.mesh import Parallel

# Dense bf16 tensor-core peaks (datasheet, SXM) used for MFU; unknown devices report no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}


def default_allocator_settings() -> None:
    """Expandable CUDA segments unless the user chose allocator settings: MoE steps allocate many differently
    sized buffers, and fragmentation otherwise costs GiBs (TorchTitan's launcher sets the same). Call before CUDA
    is first used."""
    if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default (parameters and optimizer state stay fp32); none on CPU."""
    if cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def lr_factor(step: int, o: OptimConfig, total_steps: int) -> float:
    """Multiplier of optim.lr for optimizer step `step` (0-based)."""
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "cosine":
        progress = (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_steps = max(1, round(o.decay_fraction * total_steps))  # wsd: warmup, stable, linear decay
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1.0 - o.min_lr_ratio) * min(1.0, (step - decay_start + 1) / decay_steps)


def build_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norms and other vectors do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused (single-kernel) update on CUDA: the foreach one was ~40% of a small-batch step (benchmarks/NOTES.md).
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused, foreach=not fused)


def resolve_data(cfg: Config) -> TokenShards:
    path = builtin_dataset() if cfg.data.path == "builtin" else Path(cfg.data.path)
    if not Path(path).is_dir():
        raise ConfigError(f"data.path: no dataset folder at {path}")
    shards = TokenShards(path)
    vocab = shards.vocab_size
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab} tokens")
    return shards


def load_stats(load: torch.Tensor) -> dict:
    """Per-MoE-layer expert load (tokens per expert): min, max and coefficient of variation."""
    if load.numel() == 0:
        return {}
    load = load.float()
    mean = load.mean(dim=1).clamp_min(1e-9)
    return {
        "load_min": load.min(dim=1).values.long().tolist(),
        "load_max": load.max(dim=1).values.long().tolist(),
        "load_cv": [round(v, 4) for v in (load.std(dim=1, correction=0) / mean).tolist()],
    }


@torch.no_grad()
def evaluate(model, shards: TokenShards, cfg: Config, device, amp_dtype, par: Parallel | None = None) -> float | None:
    """Mean held-out cross-entropy over up to train.eval_batches batches of the val split (every dp rank
    evaluates the same batches; a pipeline runs them forward through its stages)."""
    if not shards.has_split("val"):
        return None
    batches = list(eval_batches(shards, cfg.train.seq_len, cfg.train.micro_batch_size, cfg.train.eval_batches))
    if not batches:
        return None
    model.eval()
    if par is not None and par.pipeline is not None:
        total = par.pipeline.run(batches, amp_dtype, train=False)[0].float()
        total = par.all_reduce(total) / par.dp_size  # the last stage's sum, seen by every rank
    else:
        total = 0.0
        for x, y in batches:
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                total += model(x.to(device), labels=y.to(device), return_logits=False).loss.float().item()
    model.train()
    return float(total) / len(batches)


def peak_memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metric lines of steps after the checkpoint, so the file reads as one run."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def forward_backward(model, batches, par: Parallel, device, amp_dtype) -> tuple:
    """Forward and backward of one optimizer step's micro-batches; gradients are of the mean loss over them.
    Returns this rank's sums of (ce, lb, z) over micro-batches and the expert load [moe layers, E]."""
    if par.pipeline is not None:
        return par.pipeline_step(list(model) if isinstance(model, torch.nn.ModuleList) else [model], batches,
                                 amp_dtype)
    ce_sum = lb_sum = z_sum = torch.zeros((), device=device)
    load = None
    for i, (x, y) in enumerate(batches):
        par.set_gradient_sync([model], i == len(batches) - 1)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            out = model(x, labels=y, return_logits=False)
            loss = (out.loss + out.aux_loss) / len(batches)
        loss.backward()
        ce_sum = ce_sum + out.loss.detach()
        lb_sum, z_sum = lb_sum + out.lb_loss, z_sum + out.z_loss
        load = out.expert_load if load is None else load + out.expert_load
    return ce_sum, lb_sum, z_sum, load


def optimizer_step(model, optimizer, scheduler, par: Parallel, grad_clip: float) -> torch.Tensor:
    """Clip the global gradient norm to grad_clip (0: no clipping; the norm is returned either way), step, and
    clear the gradients. The fused AdamW applies the clip factor itself (its `grad_scale` input divides every
    gradient), which saves a read and a write of all gradients; the foreach path scales them first."""
    with record_function("pithtrain.optimizer"):
        params = [p for p in model.parameters() if p.grad is not None]
        norm = par.grad_norm(params)
        if grad_clip > 0:
            factor = (grad_clip / (norm + 1e-6)).clamp(max=1.0)
            if optimizer.defaults.get("fused"):
                optimizer.grad_scale = 1.0 / factor
            elif params:
                grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
                torch._foreach_mul_(grads, factor.to(grads[0].device))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return norm


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def build_model(cfg: Config, par: Parallel) -> tuple[torch.nn.Module, list[int], int]:
    """(this rank's model, layer index of each MoE layer, parameter count of the full model). Every rank
    initialises the full model from train.seed, so any layout starts from the same weights; par.build keeps
    this rank's pipeline stages (a ModuleList when it has two), shards experts and parameters, moves to device."""
    torch.manual_seed(cfg.train.seed)
    _, model_cls = model_classes(cfg.family)
    model = model_cls(cfg.model)
    model.init_weights()
    model.activation_checkpointing = cfg.train.activation_checkpointing
    n_params = sum(p.numel() for p in model.parameters())
    moe_ids = [int(name.split(".")[-3]) for name, m in model.named_modules() if hasattr(m, "update_bias")]
    chunks = par.build(model)
    for chunk in chunks:
        apply_compile(chunk, cfg.train.compile)
    model = chunks[0] if len(chunks) == 1 else torch.nn.ModuleList(chunks)
    model.train()
    return model, moe_ids, n_params


def apply_compile(model: torch.nn.Module, mode: str) -> None:
    """torch.compile each decoder layer ("layers") or each region inside it ("regions": attention, norms, router,
    expert GEMMs, dense and shared MLPs, final norm), by replacing `forward`, so module hooks (FSDP's) stay outside
    the compiled graphs. "regions" keeps the profiler annotations between regions (the benchmark breakdown);
    "layers" lets the compiler fuse across them."""
    if mode == "none":
        return
    for layer in model.layers.values():
        if mode == "layers":
            layer.forward = torch.compile(layer.forward)
            continue
        parts = [layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm]
        if isinstance(layer.mlp, MoE):
            parts += [layer.mlp.gate] + ([layer.mlp.shared_experts] if layer.mlp.shared_experts is not None else [])
            layer.mlp.experts.run = torch.compile(layer.mlp.experts.run)
        else:
            parts.append(layer.mlp)
        for part in parts:
            part.forward = torch.compile(part.forward)
    if getattr(model, "norm", None) is not None:
        model.norm.forward = torch.compile(model.norm.forward)


def train(cfg: Config) -> dict:
    par = Parallel(cfg, resolve_device(cfg))
    try:
        return _train(cfg, par)
    finally:
        par.close()


def _train(cfg: Config, par: Parallel) -> dict:
    device = par.device
    amp_dtype = autocast_dtype(cfg, device)
    t = cfg.train
    run_dir = Path(t.run_dir)
    lead = par.rank == 0  # writes the run folder and prints
    shards = resolve_data(cfg)  # before anything is written: a bad data path leaves no run folder
    init_from = cfg.checkpoint.init_from
    if init_from and not (Path(init_from) / ".metadata").is_file():
        raise ConfigError(f"checkpoint.init_from: no DCP checkpoint at {init_from}")
    latest = ckpt.latest_checkpoint(run_dir) if cfg.checkpoint.resume else None
    if latest is not None and ckpt.is_weights_only(latest):
        raise ConfigError(f"checkpoint.resume: {latest} holds model weights only (checkpoint.weights_only), not "
                          f"the optimizer and data state a resume needs; start a new run_dir with "
                          f"checkpoint.init_from={latest}, or set checkpoint.resume=false")

    model, moe_ids, n_params = build_model(cfg, par)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.optim, t.steps))
    loader = DataLoader(shards, t.seq_len, t.micro_batch_size, t.grad_accum, par.dp_rank, par.dp_size, seed=t.seed)
    # Routers by layer index; row j of the logged load is the j-th MoE layer of the full model.
    routers = {int(name.split(".")[-3]): m for name, m in model.named_modules() if hasattr(m, "update_bias")}

    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", to_dict(cfg))
    metrics_path = run_dir / "metrics.jsonl"
    start_step = 0
    if latest is not None:
        start_step, data_state = ckpt.load_checkpoint(latest, model, optimizer, scheduler, loader.state_dict())
        loader.load_state_dict(data_state)
    elif cfg.checkpoint.init_from:
        ckpt.load_model_weights(cfg.checkpoint.init_from, model)
    if lead:
        truncate_metrics(metrics_path, start_step)
        if latest is not None:
            print(f"resumed from {latest} at step {start_step}", flush=True)
        elif cfg.checkpoint.init_from:
            print(f"initialised weights from {cfg.checkpoint.init_from}", flush=True)

    tokens_per_step = t.micro_batch_size * t.grad_accum * t.seq_len * par.dp_size
    flops_per_token = model_module(cfg.family).flops_per_token(cfg.model, t.seq_len)
    peak = peak_flops(device)
    layout = "" if not par.distributed else (
        f" | {par.world} ranks: pp {cfg.parallel.pp} ({cfg.parallel.pp_schedule}), dp {par.dp_size} "
        f"(replicate {cfg.parallel.dp_replicate} x shard {cfg.parallel.dp_shard}), ep {cfg.parallel.ep}")
    if lead:
        print(
            f"pithtrain: {cfg.family} {n_params / 1e6:.2f}M params on {device}"
            f"{' (bf16 autocast)' if amp_dtype else ' (fp32)'} | {t.steps} steps x {tokens_per_step} tokens"
            f"{layout} | run dir {run_dir}",
            flush=True,
        )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_loss = last_loss = None
    train_start = time.perf_counter()
    with open(metrics_path, "a") if lead else nullcontext() as metrics_file:
        for step in range(start_step + 1, t.steps + 1):
            step_start = time.perf_counter()
            batches = [loader.next_batch() for _ in range(t.grad_accum)]
            ce_sum, lb_sum, z_sum, load = forward_backward(model, batches, par, device, amp_dtype)
            lr = scheduler.get_last_lr()[0]
            grad_norm = optimizer_step(model, optimizer, scheduler, par, cfg.optim.grad_clip)
            # Sums over micro-batches, dp ranks and pipeline stages; the load is the global batch's.
            sums = par.all_reduce(torch.stack([ce_sum.float(), lb_sum.float(), z_sum.float()]))
            load = par.all_reduce(load)
            for row, layer in enumerate(moe_ids):
                if layer in routers:
                    routers[layer].update_bias(load[row])

            ce, lb, z = (sums / (t.grad_accum * par.dp_size)).tolist()  # the one host sync per step
            loss_value = ce
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_time = time.perf_counter() - step_start
            tokens_per_s = tokens_per_step / step_time
            first_loss = loss_value if first_loss is None else first_loss
            last_loss = loss_value
            record = {
                "step": step,
                "loss": loss_value,
                "lb_loss": lb,
                "z_loss": z,
                "grad_norm": grad_norm.item(),
                "lr": lr,
                "tokens": step * tokens_per_step,
                "step_time_s": step_time,
                "tokens_per_s": tokens_per_s,
                "mfu": flops_per_token * tokens_per_s / (peak * par.world) if peak else None,
                "peak_mem_gib": peak_memory_gib(device),
                **load_stats(load),
            }
            if t.eval_every and step % t.eval_every == 0:
                record["val_loss"] = evaluate(model, shards, cfg, device, amp_dtype, par)
            if not math.isfinite(loss_value):
                print(f"error: loss is {loss_value} at step {step}; stopping", file=sys.stderr, flush=True)
                if lead:
                    metrics_file.write(json.dumps(record) + "\n")
                raise SystemExit(1)
            if lead:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if lead and (step % t.log_every == 0 or step == t.steps):
                done = step - start_step
                eta = (time.perf_counter() - train_start) / done * (t.steps - step)
                mfu = f" | mfu {record['mfu']:.1%}" if record["mfu"] is not None else ""
                print(
                    f"step {step:>5}/{t.steps} | loss {loss_value:.4f} | lb {record['lb_loss']:.3f}"
                    f" | gnorm {record['grad_norm']:.3f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s{mfu}"
                    f" | mem {record['peak_mem_gib']:.2f} GiB | eta {format_duration(eta)}",
                    flush=True,
                )
            due = (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == t.steps
            if cfg.checkpoint.enabled and due:
                ckpt.save_checkpoint(run_dir, step, model, optimizer, scheduler, loader.state_dict(),
                                     keep=cfg.checkpoint.keep, weights_only=cfg.checkpoint.weights_only)

    elapsed = time.perf_counter() - train_start
    val_loss = evaluate(model, shards, cfg, device, amp_dtype, par)
    summary = {
        "family": cfg.family,
        "config": cfg.source,
        "run_dir": str(run_dir),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "params": n_params,
        "world_size": par.world,
        "steps": t.steps,
        "resumed_from_step": start_step,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "val_loss": val_loss,
        "train_time_s": elapsed,
        "peak_mem_gib": peak_memory_gib(device),
    }
    if not lead:
        return summary
    write_json_atomic(run_dir / "summary.json", summary)
    if first_loss is not None:
        val = f", held-out loss {val_loss:.4f}" if val_loss is not None else ""
        print(
            f"done: {t.steps - start_step} steps in {format_duration(elapsed)}; loss {first_loss:.4f} -> "
            f"{last_loss:.4f}{val}; metrics in {metrics_path}",
            flush=True,
        )
    else:
        print(f"nothing to do: {run_dir} already holds step {start_step} of {t.steps}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pithtrain.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="TOML run config, e.g. framework/configs/tiny-qwen3-moe.toml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.steps=20 --set model.router.top_k=2 (repeatable)",
    )
    args = parser.parse_args(argv)
    default_allocator_settings()
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
