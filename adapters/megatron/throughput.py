"""Megatron-Core throughput runner for the PithTrain / TorchTitan / Megatron-Core comparison on one GPU.

Megatron-LM's pretrain_gpt.py is not in the megatron-core wheel, so this is the launch entry around Megatron-Core's
own parts: parallel_state for a world of one, GPTModel built from the local (no Transformer Engine) layer spec with
its MoELayer, router and token dispatcher, Float16Module + DistributedDataParallel (fp32 main grads), the
DistributedOptimizer (bf16 params, fp32 master weights, Adam, grad clipping) and the forward_backward_no_pipelining
schedule. Only the data is ours: uniform random token ids, as every framework in the comparison uses.

    python -m adapters.megatron.throughput --shape qwen3 --routing balanced --micro-batch 2 --recompute none \
        --steps 10 --warmup 5 --out result.json
    python -m adapters.megatron.throughput --shape deepseek --dry-run          # CPU: build, count parameters
    python -m adapters.megatron.throughput --shape qwen3 --tiny --device cpu   # CPU: a few tiny training steps

The model shape is read from PithTrain's config (framework/configs/small-*.toml) and mapped field by field; what
cannot be matched goes to the result's "notes". README.md beside this file says why this Megatron path.
"""

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

# The Megatron-generic parts (layer spec, TE-less fixes, CPU emulation, world of one, training wrappers and step)
# live in the launch entry that ATE-Bench ships into Megatron workspaces; this runner adds PithTrain's config mapping.
from adapters.megatron.ate_run.pretrain_gpt import (
    PINNED,
    CudaOnCpu,
    fix_mcore_without_te,
    init_world,
    layer_specs,
    megatron_step,
    patch_cuda_for_cpu,
    use_torch_grouped_mm,
    wrap_model,
)

REPO = Path(__file__).resolve().parents[2]
SHAPES = {"qwen3": "small-qwen3-moe.toml", "deepseek": "small-deepseek-v2-lite.toml"}
TINY = {"qwen3": "tiny-qwen3-moe.toml", "deepseek": "tiny-deepseek-v2-lite.toml"}
LB_LEVEL = {"micro_batch": "aux_loss", "sequence": "seq_aux_loss", "global_batch": "global_aux_loss"}


def load_shape(shape: str, tiny: bool = False, config: str | None = None):
    """PithTrain's resolved config (dataclass defaults filled in) for the shape."""
    sys.path.insert(0, str(REPO / "framework"))
    from pithtrain.config import load_config

    return load_config(config or REPO / "framework" / "configs" / (TINY if tiny else SHAPES)[shape])


# ---- PithTrain config -> Megatron-Core TransformerConfig ----


def transformer_config(cfg, args) -> tuple[object, dict, list[str]]:
    """-> (TransformerConfig or MLATransformerConfig, GPTModel keyword arguments, notes). Raises ValueError for a
    setting it does not map, so that a config change cannot be dropped silently."""
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    m, r = cfg.model, cfg.model.router
    notes = [
        "init: Megatron's own (N(0, init_std), output projections scaled by 1/sqrt(2 * layers), RMSNorm ones); "
        "PithTrain uses N(0, init_std) everywhere: losses differ slightly, shapes and FLOPs do not",
        f"optimizer: Megatron DistributedOptimizer (world of one) over torch.optim.AdamW (Megatron's fallback without "
        f"Apex/TE FusedAdam), constant lr {args.lr}, betas ({cfg.optim.beta1}, {cfg.optim.beta2}), weight decay "
        f"{cfg.optim.weight_decay} (not on norms), clip {cfg.optim.grad_clip}; no warmup/decay schedule",
    ]
    if r.score_func != "softmax":
        raise ValueError(f"router.score_func={r.score_func!r} is not mapped (both benchmark shapes use softmax)")
    if r.n_group != 1:
        raise ValueError("group-limited routing (router.n_group > 1) is not mapped")
    if r.expert_bias:
        raise ValueError("router.expert_bias (aux-loss-free balancing) is not mapped")
    if m.tie_word_embeddings:
        raise ValueError("tied embeddings are not mapped (both benchmark shapes are untied)")
    kw = dict(
        num_layers=m.num_hidden_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.intermediate_size, normalization="RMSNorm", layernorm_epsilon=m.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=m.init_std, qk_layernorm=True,
        num_moe_experts=r.num_experts, moe_ffn_hidden_size=m.moe_intermediate_size, moe_router_topk=r.top_k,
        moe_router_score_function="softmax",
        # Softmax after top-k is PithTrain's norm_topk_prob (renormalised); softmax before top-k without
        # renormalisation is norm_topk_prob=false.
        moe_router_pre_softmax=not r.norm_topk_prob,
        moe_router_topk_scaling_factor=None if r.routed_scaling_factor == 1.0 else r.routed_scaling_factor,
        moe_router_load_balancing_type=LB_LEVEL[r.lb_loss_level] if r.lb_loss_coef else "none",
        moe_aux_loss_coeff=r.lb_loss_coef, moe_z_loss_coeff=r.z_loss_coef or None,
        moe_router_dtype="fp32", moe_router_force_load_balancing=args.routing == "balanced",
        # One GPU: no expert parallelism, so allgather (Megatron's default) permutes locally without communication;
        # alltoall would add a per-expert chunk sort and needs CUDA side streams.
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=args.experts != "sequential",
        bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
        attention_backend=AttnBackend.local,
        # Megatron's torch.compile'd (jit_fuser) SwiGLU and bias-dropout-add need neither Apex nor TE.
        bias_activation_fusion=True, bias_dropout_fusion=True,
        # These need Apex, TE or Megatron-LM's compiled kernels, none of which the wheel ships.
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, moe_permute_fusion=False, moe_router_fusion=False,
        use_cpu_initialization=args.device == "cpu", perform_initialization=not args.dry_run,
    )
    if args.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif args.recompute == "selective":
        kw.update(recompute_granularity="selective", recompute_modules=args.recompute_modules)
    notes.append(
        "MoE balance loss: Megatron's 'aux_loss' (Switch loss over the micro-batch, E * sum f_i * P_i with P from the "
        f"softmax over all experts) with coeff {r.lb_loss_coef}, the same formula as PithTrain's {r.lb_loss_level} "
        "loss; Megatron takes its f_i from a top-k of the learned scores even when routing is forced"
        if r.lb_loss_coef else "MoE balance loss: off, as in the PithTrain config")
    if args.routing == "balanced":
        notes.append(
            "routing=balanced: Megatron's moe_router_force_load_balancing (router logits replaced by random values "
            "with a straight-through gradient): loads are balanced in expectation, not exactly equal per expert as "
            "PithTrain's force_balanced makes them")
    gpt = dict(vocab_size=m.vocab_size, share_embeddings_and_output_weights=False, position_embedding_type="rope")
    if cfg.family == "qwen3_moe":
        kw.update(num_query_groups=m.num_key_value_heads, kv_channels=m.head_dim,
                  moe_layer_freq=[int(m.is_moe_layer(i)) for i in range(m.num_hidden_layers)])
        gpt.update(rotary_base=m.rope_theta)
        notes.append(f"qwen3: all fields mapped (GQA {m.num_attention_heads}/{m.num_key_value_heads} heads of "
                     f"{m.head_dim}, per-head q/k RMSNorm, RoPE theta {m.rope_theta:g} rotating halves as Qwen3); "
                     "q/k/v are one fused matrix (linear_qkv) with the same parameters")
        return TransformerConfig(**kw), gpt, notes
    if cfg.family != "deepseek_v2":
        raise ValueError(f"model family {cfg.family!r} is not mapped")
    yarn = m.rope_scaling_type == "yarn"
    kw.update(
        q_lora_rank=m.q_lora_rank or None, kv_lora_rank=m.kv_lora_rank, qk_head_dim=m.qk_nope_head_dim,
        qk_pos_emb_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, kv_channels=m.v_head_dim,
        rope_type="yarn" if yarn else "rope", rotary_base=m.rope_theta, rotary_scaling_factor=m.rope_factor,
        original_max_position_embeddings=m.original_max_position_embeddings, beta_fast=m.beta_fast,
        # MLA scales its softmax by YaRN's mscale_all_dim whatever rope_type is: 0 turns that off without YaRN.
        beta_slow=m.beta_slow, mscale=m.mscale, mscale_all_dim=m.mscale_all_dim if yarn else 0.0,
        moe_layer_freq=[int(i >= m.first_k_dense_replace) for i in range(m.num_hidden_layers)],
        moe_shared_expert_intermediate_size=m.n_shared_experts * m.moe_intermediate_size or None,
    )
    notes += [
        f"deepseek: all fields mapped: MLA (q rank {m.q_lora_rank or 'none'}, kv latent {m.kv_lora_rank} + RMSNorm, "
        f"nope {m.qk_nope_head_dim} / rope {m.qk_rope_head_dim} / v {m.v_head_dim}), {m.rope_scaling_type} RoPE "
        f"and its softmax scale, {m.first_k_dense_replace} dense layer(s) of ffn {m.intermediate_size}, "
        f"{m.n_shared_experts} shared experts as one ungated MLP of {m.n_shared_experts} x {m.moe_intermediate_size}, "
        f"softmax top-{r.top_k} {'with' if r.norm_topk_prob else 'without'} renormalisation",
        "deepseek RoPE pairing: Megatron's MLA gathers the even and odd dims, then rotates halves (it rejects "
        "rotary_interleaved): adjacent pairs, as PithTrain and the released weights, with q and k dims permuted "
        "alike, so the same attention scores",
    ]
    return MLATransformerConfig(**kw), gpt, notes


def backend_label(args) -> str:
    experts = {"sequential": "SequentialMLP experts (one GEMM pair per expert)",
               "grouped": "GroupedMLP experts (grouped_gemm package)",
               "grouped-torch": "GroupedMLP experts on torch._grouped_mm (stand-in for the grouped_gemm package)"}
    attention = {"local": "Megatron unfused DotProductAttention",
                 "sdpa": "torch SDPA core attention (not Megatron's)"}
    return f"local spec (no Transformer Engine), {experts[args.experts]}, {attention[args.attention]}"


# ---- runtime ----


def build_model(cfg, args, seq_len: int):
    """-> (bare GPTModel, config, notes)."""
    from megatron.core.models.gpt import GPTModel

    config, gpt, notes = transformer_config(cfg, args)
    if args.experts == "grouped-torch":
        use_torch_grouped_mm()
    notes += fix_mcore_without_te()
    spec = layer_specs(config, args.attention)
    model = GPTModel(config=config, transformer_layer_spec=spec, max_sequence_length=seq_len, **gpt)
    return model, config, notes


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def pithtrain_params(cfg) -> int:
    """Parameter count of PithTrain's own model for the same config, built on the meta device."""
    from pithtrain.config import model_classes

    _, cls = model_classes(cfg.family)
    with torch.device("meta"):
        return count_params(cls(cfg.model))


def wrap_for_training(model, config, cfg, args):
    """Megatron's training wrappers: Float16Module (bf16 params), DDP with fp32 main-grad buffers, and the
    DistributedOptimizer (fp32 master weights), as Megatron-LM's setup_model_and_optimizer makes them (wrap_model of
    the launch entry), with Adam at a constant lr from the PithTrain config."""
    from megatron.core.optimizer import OptimizerConfig

    assert model.config is config
    o = cfg.optim
    opt_config = OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
                                 adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.grad_clip, bf16=True,
                                 params_dtype=torch.bfloat16, use_distributed_optimizer=True)
    return wrap_model(model, args.device, opt_config)


def train(model, optimizer, vocab: int, args, seq_len: int, log) -> list[dict]:
    """Megatron's train step (zero grad buffers, forward_backward_no_pipelining over one micro-batch, optimizer
    step: the launch entry's megatron_step), timed per step with a device synchronise on each side."""
    device, mb = args.device, args.micro_batch
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def batches():
        if args.data == "builtin":  # PithTrain's builtin corpus in its trainer's order (adapters/run_data.py)
            from adapters.run_data import builtin_batches

            for x, y in builtin_batches(seq_len, mb, 1, args.seed):
                yield x.to(device), y.to(device)
        while True:  # uniform random tokens; labels are the next token
            tokens = torch.randint(0, vocab, (mb, seq_len + 1), device=device, generator=gen)
            yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    data, records, total = batches(), [], args.warmup + args.steps
    for step in range(1, total + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss, grad_norm, ok = megatron_step(model, optimizer, None, [next(data)])
        torch.cuda.synchronize()
        dt = time.perf_counter() - start
        rec = {"step": step, "loss": loss, "grad_norm": grad_norm, "step_time_s": dt,
               "tokens_per_s": mb * seq_len / dt, "ok": bool(ok)}
        records.append(rec)
        log(f"step {step:3d}/{total}  loss {loss:.4f}  grad_norm {rec['grad_norm']:.3f}  "
            f"{dt * 1e3:8.1f} ms  {rec['tokens_per_s']:10,.0f} tok/s"
            + ("  (warmup)" if step <= args.warmup else ""))
    return records


def write_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--config", help="a PithTrain config to take the shape from instead of the --shape default")
    p.add_argument("--routing", choices=["balanced", "natural"], default="balanced")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, help="default: the config's train.seq_len (4096 for the small shapes)")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    p.add_argument("--recompute-modules", nargs="+", default=["core_attn"],
                   help="for --recompute selective (Megatron's default: core_attn)")
    p.add_argument("--experts", choices=["sequential", "grouped", "grouped-torch"], default="sequential",
                   help="sequential: SequentialMLP, the local spec's default; grouped: GroupedMLP with the grouped_gemm "
                        "package (if installed); grouped-torch: GroupedMLP on torch._grouped_mm")
    p.add_argument("--attention", choices=["local", "sdpa"], default="local",
                   help="local: Megatron's unfused DotProductAttention; sdpa: torch SDPA in the core-attention slot")
    p.add_argument("--steps", type=int, default=10, help="measured steps, after the warmup ones")
    p.add_argument("--warmup", type=int, default=5, help="steps first, left out of the averages (step 1 compiles)")
    p.add_argument("--lr", type=float, help="default: the config's optim.lr (3e-4)")
    p.add_argument("--seed", type=int, default=0, help="random-token seed, or the data order seed for --data builtin")
    p.add_argument("--data", choices=["random", "builtin"], default="random",
                   help="random: uniform token ids (throughput); builtin: PithTrain's builtin corpus in its trainer's "
                        "order (the standard run spec: losses compare with pithtrain.train's)")
    p.add_argument("--metrics", help="also write per-step metrics.jsonl here, in PithTrain's fields")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny-* PithTrain config of the shape (CPU checks)")
    p.add_argument("--dry-run", action="store_true", help="build the model on the CPU and compare parameter counts")
    p.add_argument("--out", help="result JSON (written atomically)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    warnings.filterwarnings("ignore", message="full scope is deprecated")  # 0.16.1's own default cuda_graph_scope
    if args.experts == "grouped":
        import importlib.util

        if importlib.util.find_spec("grouped_gemm") is None:
            sys.exit("--experts grouped needs the grouped_gemm package (see README.md); try --experts grouped-torch")
    log = lambda s: print(s, flush=True)
    cfg = load_shape(args.shape, args.tiny, args.config)
    seq_len = args.seq_len or cfg.train.seq_len
    args.lr = args.lr or cfg.optim.lr
    mode = CudaOnCpu() if args.device == "cpu" else contextlib.nullcontext()
    # The same allocator setting as the TorchTitan runner (its launcher's); set before CUDA starts.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.device == "cpu":
        patch_cuda_for_cpu()
    import megatron.core

    version = megatron.core.__version__
    with mode:
        init_world(args.device)
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        torch.manual_seed(args.seed)
        if args.device == "cuda":
            model_parallel_cuda_manual_seed(args.seed)
        with torch.device("meta") if args.dry_run else contextlib.nullcontext():
            model, config, notes = build_model(cfg, args, seq_len)
        if args.device == "cuda":
            notes.append(f"PYTORCH_CUDA_ALLOC_CONF={os.environ['PYTORCH_CUDA_ALLOC_CONF']}")
        if version != PINNED:
            notes.append(f"megatron-core {version} (the runner was written against {PINNED})")
        n_mcore, n_pith = count_params(model), pithtrain_params(cfg)
        log(f"megatron-core {version}: {backend_label(args)}")
        log(f"{args.shape}: megatron-core {n_mcore:,} parameters, PithTrain {n_pith:,} "
            f"({'equal' if n_mcore == n_pith else f'differ by {n_mcore - n_pith:+,}'})")
        result = {"framework": "megatron-core", "version": version, "backend": backend_label(args),
                  "torch": torch.__version__, "shape": args.shape, "routing": args.routing,
                  "micro_batch": args.micro_batch, "seq_len": seq_len, "recompute": args.recompute,
                  "steps": args.steps, "warmup": args.warmup, "params": n_mcore, "pithtrain_params": n_pith,
                  "command": " ".join([sys.executable, "-m", "adapters.megatron.throughput", *sys.argv[1:]]),
                  "notes": notes}
        if args.dry_run:
            if args.out:
                write_atomic(args.out, {**result, "dry_run": True})
            return 0 if n_mcore == n_pith else 1
        model, optimizer = wrap_for_training(model, config, cfg, args)
        if args.device == "cuda":
            log(f"params, grad buffers and master weights: {torch.cuda.memory_allocated() / 2**30:.1f} GiB "
                f"allocated of {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB (Adam moments "
                "come with the first step)")
        try:
            records = train(model, optimizer, cfg.model.vocab_size, args, seq_len, log)
        except torch.OutOfMemoryError:
            # No result file: the comparison driver records a failed run from the exit status and this line.
            log(f"out of memory: peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated. Megatron's own "
                "remedies: --recompute selective (core attention) or full; or --attention sdpa")
            return 3
    timed = records[args.warmup:]
    step_time = sum(r["step_time_s"] for r in timed) / len(timed)
    result.update(
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        tokens_per_s=args.micro_batch * seq_len / step_time, step_time_s=step_time,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0,
        loss_first=records[0]["loss"], loss_last=records[-1]["loss"],
        skipped_steps=sum(not r["ok"] for r in records), per_step=records, data=args.data)
    log(f"{result['tokens_per_s']:,.0f} tokens/s, {step_time * 1e3:.1f} ms/step over {len(timed)} steps, "
        f"peak {result['peak_mem_gib']:.1f} GiB, loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}")
    if args.out:
        write_atomic(args.out, result)
    if args.metrics:
        from adapters.run_data import write_metrics

        write_metrics(args.metrics, records)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
