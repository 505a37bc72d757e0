"""Per-rank memory estimate of a config and layout, and (--measure) a check of it against a real run.

    python skills/estimate-memory/check.py --config configs/small-qwen3-moe.toml --nproc 8 --set parallel.ep=8
    python skills/estimate-memory/check.py --config configs/tiny-qwen3-moe.toml --nproc 2 \
        --set parallel.ep=2 --measure

Static part, exact: the model is built on the meta device and every parameter is placed as parallel/mesh.py
places it (pipeline stages, experts split over ep, FSDP2 dim-0 chunks over dp_shard or efsdp), then
    params = P_local * param_bytes (4: fp32 master weights)    grads = the same (grads have the param's dtype)
    optim  = P_local * 4 * optim_states (AdamW: exp_avg, exp_avg_sq) + 4 bytes of `step` per parameter tensor.
Activations, approximate (formula in activation_bytes_per_token and SKILL.md), and the GPU peak:
    peak = params + optim + max(grads, activations in flight + loss + FSDP gathers) + cuBLAS workspaces.
The last stdout line is PASS/FAIL; bad arguments (an impossible layout) exit 2 with one line.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

F32 = 4
# cuBLAS keeps a workspace per thread that runs matmuls (the forward's and autograd's): 32 MiB each on Hopper
# (PyTorch's default CUBLAS_WORKSPACE_CONFIG there); it dominates the peak of tiny models.
CUBLAS_WORKSPACES = 2 * 32 * 2**20


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def fmt(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def is_routed_expert(name: str) -> bool:
    return name.endswith((".mlp.experts.w_gate_up", ".mlp.experts.w_down"))


# ---- layout ----


def coords(cfg, world: int, rank: int) -> dict:
    """Where `rank` sits in the mesh (pp, dp_replicate, efsdp, ep), ep innermost, as Parallel builds it."""
    p = cfg.parallel
    dp = p.dp_replicate * p.dp_shard
    return {"pp": rank // dp, "dp_shard": rank % p.dp_shard, "efsdp": rank % p.dp_shard // p.ep,
            "ep": rank % p.ep, "fsdp": world > 1 and dp > 1}


def stages_of(cfg) -> tuple[list[list[int]], list[list[int]]]:
    """(stages of each pp rank, layers of each stage), from the pipeline's own functions."""
    from pithtrain.parallel.pipeline import rank_stages, stage_layers

    p = cfg.parallel
    if p.pp == 1:
        return [[0]], [list(range(cfg.model.num_hidden_layers))]
    mine = rank_stages(p.pp, p.pp_schedule)
    return mine, stage_layers(cfg.model.num_hidden_layers, sum(map(len, mine)))


def stage_of_param(name: str, layer_stage: dict, last: int) -> int:
    if name.startswith("layers."):
        return layer_stage[int(name.split(".")[1])]
    return 0 if name.startswith("embed_tokens.") else last


def chunk_rows(rows: int, parts: int, index: int) -> int:
    """Rows of FSDP2's dim-0 chunk `index` of `parts` (torch.chunk: ceil-sized, the last short or empty)."""
    size = -(-rows // parts)
    return max(0, min(size, rows - index * size))


def local_numel(name: str, shape: tuple, cfg, c: dict) -> int:
    rows, rest = shape[0], 1
    for d in shape[1:]:
        rest *= d
    p = cfg.parallel
    if is_routed_expert(name) and p.ep > 1:
        rows //= p.ep
        if c["fsdp"]:
            rows = chunk_rows(rows, p.dp_shard // p.ep, c["efsdp"])
    elif c["fsdp"]:
        rows = chunk_rows(rows, p.dp_shard, c["dp_shard"])
    return rows * rest


def full_numel(name: str, shape: tuple, cfg) -> int:
    """Elements of a parameter once FSDP has gathered it (experts stay split over ep)."""
    n = 1
    for d in shape:
        n *= d
    return n // cfg.parallel.ep if is_routed_expert(name) else n


# ---- activations ----


def activation_bytes_per_token(cfg, layer, a: int) -> int:
    """Bytes autograd keeps per token for one decoder layer (no checkpointing), on the GPU path (the Triton
    RMSNorm, router, permute, SwiGLU and combine kernels). `a`: compute dtype size (2 under bf16 autocast, 4
    in fp32); the residual stream and RMSNorm outputs of fp32 inputs are fp32 (f = 4). Under autocast each
    Linear fed by an fp32 tensor keeps its own a-byte cast of it; in fp32 they share the tensor (`cast`)."""
    from pithtrain.models.blocks import MoE

    m, f, h = cfg.model, F32, cfg.model.hidden_size

    def cast(n_linears: int, width: int) -> int:
        return n_linears * a * width if a < f else f * width

    total = 2 * f * h + 8  # layer input and mid-layer residual (kept by the norms, with their rstd)
    heads = m.num_attention_heads
    if hasattr(m, "kv_lora_rank"):  # DeepSeek MLA
        nope, v, c = m.qk_nope_head_dim, m.v_head_dim, m.kv_lora_rank
        qk = nope + m.qk_rope_head_dim
        total += cast(2, h) + a * (c + m.qk_rope_head_dim) + cast(1, c)  # kv_a output (kept by its norm)
        if m.q_lora_rank:
            total += a * m.q_lora_rank + cast(1, m.q_lora_rank)
        # SDPA keeps q, k (heads x qk), the kv_b output that v views, its output; o_proj a copy of that
        total += a * heads * (2 * qk + nope + 3 * v) + f * heads
    else:  # Qwen3 GQA: q/k norms keep q_proj/k_proj outputs, SDPA keeps q, k (cast after RoPE), v, output
        qd, kd = heads * m.head_dim, m.num_key_value_heads * m.head_dim
        total += cast(3, h) + a * (4 * qd + 3 * kd) + f * heads  # 4 qd: + SDPA output, o_proj's input copy
    mlp = layer.mlp
    if isinstance(mlp, MoE):
        r = m.router
        inter = mlp.experts.w_down.shape[1]
        total += cast(1, h) + f * r.num_experts + (a * r.num_experts if r.z_loss_coef else 0) + 12 * r.top_k
        total += r.top_k * (a * (2 * h + 3 * inter) + 16)  # permuted input, gate_up, SwiGLU out, expert out
        if mlp.shared_experts is not None:
            total += cast(2, h) + 4 * a * mlp.shared_experts.down_proj.in_features
    else:
        total += cast(2, h) + 4 * a * mlp.down_proj.in_features
    return total


def head_bytes(cfg, a: int, tokens: int, gpu: bool) -> tuple[int, int]:
    """(kept from forward to backward, extra while the loss runs) for final norm + lm_head + loss. The chunked
    linear cross-entropy (blocks uses ops/cross_entropy.py) keeps grad_hidden and an fp32 grad of lm_head,
    and runs with a compute-dtype copy of lm_head and one chunk of logits; the plain path keeps fp32 logits
    through log_softmax and needs two more [tokens, V] fp32 gradients at the start of backward (on CPU the
    chunked loss falls back to it)."""
    from pithtrain.models import blocks

    h, v, f = cfg.model.hidden_size, cfg.model.vocab_size, F32
    copy = a * h * v if a < f else 0  # lm_head cast to the compute dtype
    if gpu and hasattr(blocks, "linear_cross_entropy"):
        from pithtrain.ops.cross_entropy import default_chunk_size

        chunk = min(tokens, default_chunk_size(tokens, v))
        return (f + a) * h * tokens + f * h * v, copy + a * chunk * v
    return (2 * f * h + (a * h if a < f else 0) + f * v) * tokens + copy, 2 * f * v * tokens


def in_flight(cfg, mine: list[int]) -> dict[int, int]:
    """Most micro-batches whose activations a stage holds at once, from the pipeline's own schedule."""
    from pithtrain.parallel.pipeline import schedule_1f1b, schedule_dualpipev

    p, m = cfg.parallel, cfg.train.grad_accum
    if p.pp == 1:
        return {0: 1}
    orders = (schedule_dualpipev if p.pp_schedule == "dualpipev" else schedule_1f1b)(p.pp, m)
    live, most = dict.fromkeys(mine, 0), dict.fromkeys(mine, 0)
    for action in orders[mine[0]]:  # pp rank r holds stage r first (and 2 pp - 1 - r under dualpipev)
        for kind, stage, _ in sorted(action, key=lambda x: x[0] != "F"):  # an F paired with a B: F first
            live[stage] += 1 if kind == "F" else -1
            most[stage] = max(most[stage], live[stage])
    return most


def estimate(cfg, world: int, rank: int, meta_model, param_bytes: int, optim_states: int, a: int,
             gpu: bool = True) -> dict:
    p, t = cfg.parallel, cfg.train
    c = coords(cfg, world, rank)
    rank_stages, layers = stages_of(cfg)
    mine = rank_stages[c["pp"]]
    layer_stage = {i: s for s, ls in enumerate(layers) for i in ls}
    last = len(layers) - 1
    n_local = n_tensors = stage_full = root_full = 0
    layer_full, layer_mm = {}, {}  # gathered elements per layer: all, and of matrices (autocast copies them)
    for name, param in meta_model.named_parameters():
        s = stage_of_param(name, layer_stage, last)
        if s not in mine:
            continue
        n_local += local_numel(name, tuple(param.shape), cfg, c)
        n_tensors += 1
        full = full_numel(name, tuple(param.shape), cfg)
        stage_full += full
        if name.startswith("layers."):
            i = int(name.split(".")[1])
            layer_full[i] = layer_full.get(i, 0) + full
            layer_mm[i] = layer_mm.get(i, 0) + (full if param.dim() >= 2 else 0)
        else:
            root_full += full
    out = {"rank": rank, "pp_rank": c["pp"], "params": n_local * param_bytes, "grads": n_local * param_bytes,
           "optim": n_local * F32 * optim_states + F32 * n_tensors}
    tokens = t.micro_batch_size * t.seq_len
    flight = in_flight(cfg, mine)
    copy = a if a < F32 else 0  # under autocast each forward's matmul weights are cast, the copies kept
    acts = loss_extra = 0
    for s in mine:
        per_layer = [activation_bytes_per_token(cfg, meta_model.layers[str(i)], a) * tokens
                     for i in layers[s]]
        weights = [copy * layer_mm[i] for i in layers[s]]
        if t.activation_checkpointing:  # fp32 layer inputs kept; one layer recomputed at a time in backward
            stage = len(per_layer) * F32 * cfg.model.hidden_size * tokens * flight[s]
            stage += max((x + w for x, w in zip(per_layer, weights)), default=0)
        else:
            stage = (sum(per_layer) + sum(weights)) * flight[s]
        if s == last:
            kept, loss_extra = head_bytes(cfg, a, tokens, gpu)
            stage += kept * flight[s]
        acts += stage
    acts += loss_extra
    gathers = 0
    if c["fsdp"]:  # FSDP2 all-gathers fp32 weights (no mixed-precision policy): what is whole at once
        if p.pp > 1:  # stages stay gathered for the step; unsharded grads accumulate until the last backward
            gathers = 2 * param_bytes * stage_full
        else:  # root (embedding, head) whole through the step; ~2 layers gathered and 1 layer of grads
            gathers = param_bytes * (2 * root_full + 3 * max(layer_full.values(), default=0))
    base = out["params"] + out["optim"] + (CUBLAS_WORKSPACES if gpu else 0)
    out.update(activations=acts, gathers=gathers, peak=base + max(out["grads"], acts + gathers))
    return out


def meta_model(cfg):
    import torch

    from pithtrain.config import model_classes

    with torch.device("meta"):
        return model_classes(cfg.family)[1](cfg.model)


# ---- measurement ----


def measure(cfg, steps: int, out_dir: Path) -> None:
    """Run `steps` training steps (random tokens, as the benchmark); before the last optimizer step sum the
    bytes of this rank's parameters, gradients and optimizer states, read the CUDA peak; write rank<N>.json"""
    import torch
    from torch.distributed.tensor import DTensor

    from pithtrain.benchmark import RandomTokenStepper
    from pithtrain.parallel.mesh import Parallel
    from pithtrain.train import resolve_device

    def nbytes(tensors) -> int:
        total = 0
        for x in tensors:
            x = x.to_local() if isinstance(x, DTensor) else x
            total += x.numel() * x.element_size()
        return total

    device = resolve_device(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    par = Parallel(cfg, device)
    try:
        stepper = RandomTokenStepper(cfg, par, steps)
        found = {}

        def count_bytes():  # after the last backward, before its update: every buffer is live
            params = list(stepper.model.parameters())
            grads = [q.grad for q in params if q.grad is not None]
            states = [v for st in stepper.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
            found.update(params=nbytes(params), grads=nbytes(grads), optim=nbytes(states))

        for i in range(steps):
            stepper(count_bytes if i == steps - 1 else None)
        if par.device.type == "cuda":
            torch.cuda.synchronize()
            found["peak"] = torch.cuda.max_memory_allocated()
        found.update(rank=par.rank, device=str(par.device))
        (out_dir / f"rank{par.rank}.json").write_text(json.dumps(found))
    finally:
        par.close()


def launch_measure(args, nproc: int, out_dir: Path) -> int:
    """One process: here. Several: torchrun over this script in --worker mode (gloo on CPU, NCCL on GPUs)."""
    if nproc == 1:
        from pithtrain.config import load_config

        measure(load_config(args.config, args.overrides), args.steps, out_dir)
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           __file__, "--config", args.config, "--steps", str(args.steps), "--worker", str(out_dir),
           *[x for s in args.overrides for x in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if r.returncode:
        print(r.stdout[-2000:] + r.stderr[-3000:], file=sys.stderr)
    return r.returncode


def main(argv=None) -> int:
    p = Parser(prog="python skills/estimate-memory/check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="TOML run config, e.g. configs/small-qwen3-moe.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set parallel.ep=2 (repeatable)")
    p.add_argument("--nproc", type=int, help="processes (GPUs) in all; default pp x dp_replicate x dp_shard")
    p.add_argument("--device", choices=["cuda", "cpu"],
                   help="device the estimate is for (default: train.device, or cuda: planning a GPU run)")
    p.add_argument("--budget-gib", type=float, help="memory per GPU to fit in (default: this GPU's, else 80)")
    p.add_argument("--measure", action="store_true", help="run --steps steps and compare the estimate")
    p.add_argument("--steps", type=int, default=2, help="steps for --measure (default and least: 2)")
    p.add_argument("--static-tol", type=float, default=0.01, help="params/grads/optim tolerance (1%%)")
    p.add_argument("--total-tol", type=float, default=0.15, help="GPU peak tolerance (default 15%%)")
    p.add_argument("--param-bytes", type=int, default=4, help="what-if: bytes per parameter and gradient (4)")
    p.add_argument("--optim-states", type=int, default=2, help="what-if: fp32 states per parameter (2)")
    p.add_argument("--timeout", type=int, default=600, help="seconds for a distributed --measure (600)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a torchrun rank of --measure
    args = p.parse_args(argv)
    from pithtrain.config import ConfigError, load_config, validate_parallel

    if args.worker is not None:
        measure(load_config(args.config, args.overrides), args.steps, args.worker)
        return 0
    if args.steps < 2 or args.param_bytes < 1 or args.optim_states < 0:
        p.error("--steps must be >= 2, --param-bytes >= 1, --optim-states >= 0")
    try:
        cfg = load_config(args.config, args.overrides)
        q = cfg.parallel
        world = args.nproc or (q.pp * q.dp_replicate * q.dp_shard if q.dp_shard != -1 else 1)
        validate_parallel(cfg, world)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    gpu = torch.cuda.is_available()
    device = args.device or (cfg.train.device if cfg.train.device != "auto" else "cuda")
    if args.measure:
        device = "cuda" if gpu and cfg.train.device != "cpu" else "cpu"
        if device == "cuda" and world > torch.cuda.device_count():
            p.error(f"--measure with {world} processes needs {world} GPUs; this machine has "
                    f"{torch.cuda.device_count()}")
    bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device == "cuda")
    a = 2 if bf16 else 4
    model = meta_model(cfg)
    per_rank = [estimate(cfg, world, r, model, args.param_bytes, args.optim_states, a, device == "cuda")
                for r in range(world)]
    t, pl = cfg.train, cfg.parallel
    n_params = sum(x.numel() for x in model.parameters())
    fsdp = "on" if world > 1 and pl.dp_replicate * pl.dp_shard > 1 else "off"
    print(f"{cfg.family} {n_params / 1e6:.2f}M params | world {world} = pp {pl.pp} ({pl.pp_schedule}) x "
          f"dp_replicate {pl.dp_replicate} x dp_shard {pl.dp_shard} (efsdp {pl.dp_shard // pl.ep} x ep "
          f"{pl.ep}) | FSDP2 {fsdp} | micro-batch {t.micro_batch_size} x seq {t.seq_len}, {t.grad_accum} "
          f"micro-batches/step | "
          f"{'bf16 autocast' if bf16 else 'fp32'} on {device} | activation checkpointing "
          f"{'on' if t.activation_checkpointing else 'off'}")
    cols = ("params", "grads", "optim", "activations", "gathers", "peak")
    print(f"{'rank':>5} {'pp':>3} " + " ".join(f"{c:>12}" for c in cols))
    shown = set()
    for e in per_rank:
        key = tuple(e[c] for c in cols)
        if key in shown and world > 8:
            continue
        shown.add(key)
        print(f"{e['rank']:>5} {e['pp_rank']:>3} " + " ".join(f"{fmt(e[c]):>12}" for c in cols))
    worst = max(per_rank, key=lambda e: e["peak"])
    if not args.measure:
        budget = args.budget_gib or (torch.cuda.get_device_properties(0).total_memory / 2**30 if gpu else 80)
        if worst["peak"] > budget * 2**30:
            print(f"FAIL: rank {worst['rank']} needs ~{fmt(worst['peak'])} > {budget:.1f} GiB: raise "
                  "ep/dp_shard/pp, lower train.micro_batch_size, or set train.activation_checkpointing=true")
            return 1
        print(f"PASS: peak ~{fmt(worst['peak'])} per rank (rank {worst['rank']}) fits {budget:.1f} GiB "
              f"(static exact, activations approximate; --measure checks it)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        rc = launch_measure(args, world, Path(tmp))
        found = {int(f.stem[4:]): json.loads(f.read_text()) for f in Path(tmp).glob("rank*.json")}
    if rc or len(found) != world:
        print(f"FAIL: the measuring run failed (exit {rc}, {len(found)} of {world} ranks reported)")
        return 1
    failures, worst_rel = [], {}
    print(f"{'rank':>5} {'what':>8} {'estimate':>12} {'measured':>12} {'rel err':>8}")
    for r in range(world):
        e, m = per_rank[r], found[r]
        checks = [(k, args.static_tol) for k in ("params", "grads", "optim")] + (
            [("peak", args.total_tol)] if "peak" in m else [])
        for k, tol in checks:
            rel = abs(e[k] - m[k]) / max(m[k], 1)
            worst_rel[k] = max(worst_rel.get(k, 0.0), rel)
            bad = rel > tol
            flag = f"  > {tol:.0%}" if bad else ""
            print(f"{r:>5} {k:>8} {fmt(e[k]):>12} {fmt(m[k]):>12} {rel:>8.2%}{flag}")
            if bad:
                failures.append(f"rank {r} {k} off by {rel:.1%} (> {tol:.0%})")
    summary = ", ".join(f"{k} {v:.2%}" for k, v in worst_rel.items())
    if failures:
        print(f"FAIL: {failures[0]}" + (f" and {len(failures) - 1} more" if len(failures) > 1 else "") +
              f"; worst errors: {summary}")
        return 1
    scope = "static and GPU peak" if "peak" in found[0] else "static part (CPU: no peak to compare)"
    print(f"PASS: estimate matches {world} rank(s) within tolerance on the {scope}; worst errors: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
