"""TorchTitan 0.2.2 throughput runner for the PithTrain / TorchTitan / Megatron-Core comparison on one GPU.

It trains the model shape of a PithTrain config (framework/configs/small-*.toml) with TorchTitan's own Trainer:
the shape becomes a flavor of a TrainSpec registered here that reuses TorchTitan's Qwen3 or DeepSeek-V3 model,
its parallelize function (activation checkpointing, torch.compile), AdamW, LR schedule and loss. Only the data
is ours: uniform random token ids, the recipe every framework in the comparison uses, so neither a tokenizer nor
a dataset download is needed. Per-step numbers come from TorchTitan's MetricsProcessor (log_freq 1).

    python -m adapters.torchtitan.throughput --shape qwen3 --routing balanced --micro-batch 2 --ac none \
        --compile --steps 20 --warmup 5 --out result.json
    python -m adapters.torchtitan.throughput --shape deepseek --dry-run   # CPU: config + meta model only

Arguments it does not know are passed on to TorchTitan's ConfigManager (e.g. `--activation_checkpoint.
selective_ac_option 2`), after the ones it sets, so they win.
"""

import argparse
import copy
import dataclasses
import functools
import json
import os
import shlex
import shutil
import socket
import statistics
import sys
import tempfile
import tomllib
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SHAPES = {"qwen3": "small-qwen3-moe.toml", "deepseek": "small-deepseek-v2-lite.toml"}
BASE_SPEC = {"qwen3_moe": "qwen3", "deepseek_v2": "deepseek_v3"}  # PithTrain family -> TorchTitan model
FLAVOR = "bench"
# PithTrain's dataclass defaults for the keys its configs may leave out (pithtrain/models/*.py).
DEFAULTS = {
    "qwen3_moe": {"rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False,
                  "decoder_sparse_step": 1, "mlp_only_layers": []},
    "deepseek_v2": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling_type": "yarn", "rope_factor": 40.0,
                    "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                    "mscale": 0.707, "mscale_all_dim": 0.707, "tie_word_embeddings": False},
}
ROUTER_DEFAULTS = {"score_func": "softmax", "norm_topk_prob": True, "routed_scaling_factor": 1.0, "n_group": 1,
                   "topk_group": 1, "expert_bias": False, "bias_update_rate": 1e-3, "lb_loss_coef": 0.0,
                   "lb_loss_level": "micro_batch", "z_loss_coef": 0.0, "force_balanced": False}
IGNORED = {"family", "max_position_embeddings", "init_std"}  # no effect on what is computed, or noted below


def _hf_datasets_unused(*args, **kwargs):
    raise RuntimeError("this runner feeds random tokens; Hugging Face datasets are not installed here")


def stub_datasets_if_missing() -> str | None:
    """TorchTitan's model packages import its Hugging Face text loader (the only user of `datasets`), which this
    runner never calls. Where `datasets` is not installed, as on the GPU machine (it and its dill / multiprocess
    would have to be carried, with pins against the machine's pyarrow and huggingface_hub), an empty stand-in
    module lets that import succeed. Returns a note when it did."""
    try:
        import datasets

        if not getattr(datasets, "STAND_IN", False):
            return None
    except ImportError:
        stub, dist = types.ModuleType("datasets"), types.ModuleType("datasets.distributed")
        stub.Dataset, stub.load_dataset, stub.distributed, stub.STAND_IN = object, _hf_datasets_unused, dist, True
        dist.split_dataset_by_node = _hf_datasets_unused
        sys.modules.update({"datasets": stub, "datasets.distributed": dist})
    return ("`datasets` is not installed: a stand-in module satisfies the import in torchtitan.hf_datasets "
            "(unused: the data are random tokens)")


def load_pithtrain_config(shape: str, path: str | None) -> dict:
    return tomllib.loads(Path(path or REPO / "framework" / "configs" / SHAPES[shape]).read_text())


def build_model_args(model: dict, seq_len: int) -> tuple[object, list[str]]:
    """PithTrain `[model]` table -> TorchTitan model args and notes on what could not be matched. Raises
    ValueError for a key it does not map, so a new config field cannot be silently dropped."""
    from torchtitan.models.moe import MoEArgs

    family = model["family"]
    m = {**DEFAULTS[family], **model}
    r = {**ROUTER_DEFAULTS, **m.pop("router")}
    notes = [
        "init: TorchTitan's own weight init (depth-scaled truncated normal, N(0,1) embeddings) instead of "
        "PithTrain's N(0, init_std); losses differ, shapes and FLOPs do not",
    ]
    if r.pop("n_group") != 1 or r.pop("topk_group") != 1:
        raise ValueError("group-limited routing (router.n_group > 1) is not mapped")
    if r.pop("expert_bias"):
        raise ValueError("router.expert_bias is not mapped (TorchTitan's bias is driven by load_balance_coeff)")
    if r.pop("z_loss_coef"):
        notes.append("router z-loss: TorchTitan 0.2.2 has none; PithTrain's z_loss_coef is dropped")
    notes.append(
        f"load balance: none. TorchTitan 0.2.2 has no auxiliary balance loss, and its aux-loss-free expert bias "
        f"changes which experts a token selects, which DeepSeek-V2 (and its Hugging Face model) does not; "
        f"PithTrain's lb_loss_coef ({r.pop('lb_loss_coef')}) * Switch loss ({r['lb_loss_level']}) is dropped"
    )
    r.pop("lb_loss_level"), r.pop("bias_update_rate"), r.pop("force_balanced")
    moe = MoEArgs(
        num_experts=r.pop("num_experts"), num_shared_experts=m.pop("n_shared_experts", 0), top_k=r.pop("top_k"),
        score_func=r.pop("score_func"), route_norm=r.pop("norm_topk_prob"),
        route_scale=r.pop("routed_scaling_factor"), score_before_experts=False, load_balance_coeff=None,
    )
    if r:
        raise ValueError(f"model.router keys not mapped to TorchTitan: {sorted(r)}")
    common = {"vocab_size": m.pop("vocab_size"), "dim": m.pop("hidden_size"), "n_layers": m.pop("num_hidden_layers"),
              "n_heads": m.pop("num_attention_heads"), "norm_eps": m.pop("rms_norm_eps"),
              "rope_theta": m.pop("rope_theta"), "moe_inter_dim": m.pop("moe_intermediate_size"),
              "max_seq_len": seq_len, "attn_type": "sdpa", "attn_mask_type": "causal", "moe_args": moe}
    if family == "qwen3_moe":
        from torchtitan.models.qwen3 import Qwen3ModelArgs

        if m.pop("decoder_sparse_step") != 1 or m.pop("mlp_only_layers"):
            raise ValueError("Qwen3 dense layers (decoder_sparse_step, mlp_only_layers) are not mapped")
        args = Qwen3ModelArgs(
            **common, head_dim=m.pop("head_dim"), n_kv_heads=m.pop("num_key_value_heads"), qk_norm=True,
            hidden_dim=m.pop("intermediate_size"), enable_weight_tying=m.pop("tie_word_embeddings"),
            moe_enabled=True,
        )
    else:
        from torchtitan.models.deepseek_v3 import DeepSeekV3ModelArgs

        if m.pop("tie_word_embeddings"):
            raise ValueError("tied embeddings are not available in TorchTitan's DeepSeek-V3")
        yarn = m.pop("rope_scaling_type") == "yarn"
        orig, mscale, mscale_all = (m.pop(k) for k in ("original_max_position_embeddings", "mscale", "mscale_all_dim"))
        beta_fast, beta_slow = m.pop("beta_fast"), m.pop("beta_slow")
        if yarn and seq_len <= orig:
            # TorchTitan stretches RoPE only when seq_len > original_seq_len; PithTrain always does under YaRN.
            notes.append(
                f"rope: YaRN forced on by original_seq_len={seq_len - 1} (PithTrain: {orig}); TorchTitan applies "
                f"YaRN only when seq_len > original_seq_len. The ramp edges are floor/ceil'd so the frequencies and "
                f"the softmax scale stay PithTrain's (checked by --dry-run when pithtrain imports)"
            )
            orig = seq_len - 1
        if yarn and mscale != mscale_all:
            notes.append(f"rope: PithTrain scales cos/sin by yarn({mscale})/yarn({mscale_all}); TorchTitan does not")
        if beta_fast != int(beta_fast) or beta_slow != int(beta_slow):
            raise ValueError("TorchTitan takes integer YaRN beta_fast / beta_slow")
        notes.append("norm eps: TorchTitan's DeepSeek-V3 final RMSNorm uses torch's default eps "
                     f"(dtype epsilon), PithTrain {common['norm_eps']}; the other norms match")
        args = DeepSeekV3ModelArgs(
            **common, inter_dim=m.pop("intermediate_size"), n_dense_layers=m.pop("first_k_dense_replace"),
            q_lora_rank=m.pop("q_lora_rank"), kv_lora_rank=m.pop("kv_lora_rank"),
            qk_nope_head_dim=m.pop("qk_nope_head_dim"), qk_rope_head_dim=m.pop("qk_rope_head_dim"),
            v_head_dim=m.pop("v_head_dim"), rope_factor=m.pop("rope_factor") if yarn else 1.0,
            original_seq_len=orig if yarn else seq_len, beta_fast=int(beta_fast), beta_slow=int(beta_slow),
            mscale=mscale_all,
        )
    left = set(m) - IGNORED
    if left:
        raise ValueError(f"model keys not mapped to TorchTitan: {sorted(left)}")
    return args, notes


class RandomTokens:
    """Uniform random token ids in [0, vocab): each batch is [B, S+1], split into inputs and next-token labels.
    Same generator, seed and draws as pithtrain.benchmark, so both see the same token stream. A plain stateful
    iterable is all TorchTitan's Trainer needs."""

    def __init__(self, vocab_size: int, batch: int, seq_len: int, seed: int = 0):
        self.vocab_size, self.batch, self.seq_len, self.seed, self.batches = vocab_size, batch, seq_len, seed, 0

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            ids = torch.randint(0, self.vocab_size, (self.batch, self.seq_len + 1), generator=gen)
            self.batches += 1
            yield {"input": ids[:, :-1].contiguous()}, ids[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = state.get("batches", 0)


def build_random_dataloader(dp_world_size, dp_rank, tokenizer, job_config, *, vocab_size: int) -> RandomTokens:
    return RandomTokens(vocab_size, job_config.training.local_batch_size, job_config.training.seq_len, seed=dp_rank)


class BuiltinTokens(RandomTokens):
    """`--data builtin`: PithTrain's builtin corpus in its trainer's order (adapters/run_data.py)."""

    def __init__(self, batch: int, seq_len: int, grad_accum: int, seed: int):
        self.batch, self.seq_len, self.grad_accum, self.seed, self.batches = batch, seq_len, grad_accum, seed, 0

    def __iter__(self):
        from adapters.run_data import builtin_batches

        for x, y in builtin_batches(self.seq_len, self.batch, self.grad_accum, self.seed):
            self.batches += 1
            yield {"input": x}, y


def build_builtin_dataloader(dp_world_size, dp_rank, tokenizer, job_config, *, seed: int) -> BuiltinTokens:
    t = job_config.training
    return BuiltinTokens(t.local_batch_size, t.seq_len, t.global_batch_size // t.local_batch_size, seed)


def register_spec(family: str, args, data: str = "random", seed: int = 0) -> str:
    """Register TorchTitan's own TrainSpec for the family with our flavor, data source and MoE-balancing optimizer
    builder; tokenizer, validator, pipelining and HF state-dict adapter are dropped (unused on one GPU)."""
    from torchtitan.components.optimizer import build_optimizers_with_moe_load_balancing
    from torchtitan.protocols import train_spec as ts

    name = f"ate_{BASE_SPEC[family]}"
    spec = dataclasses.replace(
        ts.get_train_spec(BASE_SPEC[family]), model_args={FLAVOR: args}, pipelining_fn=None,
        build_optimizers_fn=build_optimizers_with_moe_load_balancing, build_tokenizer_fn=None,
        build_dataloader_fn=(functools.partial(build_random_dataloader, vocab_size=args.vocab_size) if data == "random"
                             else functools.partial(build_builtin_dataloader, seed=seed)),
        build_validator_fn=None, state_dict_adapter=None,
    )
    ts._extra_train_specs.pop(name, None)  # one process may build several shapes (tests)
    ts.register_train_spec(name, spec)
    return name


def titan_args(a, spec_name: str, cfg: dict, dump: str, extra: list[str]) -> list[str]:
    """The TorchTitan command line (ConfigManager syntax) for this run; `extra` goes last, so it wins."""
    optim = cfg.get("optim", {})
    args = [
        "--model.name", spec_name, "--model.flavor", FLAVOR, "--model.hf_assets_path", dump,
        "--job.dump_folder", dump, "--metrics.log_freq", "1", "--metrics.disable_color_printing",
        "--training.local_batch_size", str(a.micro_batch), "--training.seq_len", str(a.seq_len),
        "--training.global_batch_size", str(a.micro_batch * a.grad_accum),  # > local: gradient accumulation
        "--training.steps", str(a.warmup + a.steps), "--training.max_norm", str(optim.get("grad_clip", 1.0)),
        "--training.dtype", "float32", "--training.mixed_precision_param", "bfloat16",
        "--parallelism.data_parallel_shard_degree", "1",
        "--optimizer.name", "AdamW", "--optimizer.implementation", "fused",
        "--optimizer.lr", str(optim.get("lr", 3e-4)), "--optimizer.weight_decay", str(optim.get("weight_decay", 0.1)),
        "--optimizer.beta1", str(optim.get("beta1", 0.9)), "--optimizer.beta2", str(optim.get("beta2", 0.95)),
        "--optimizer.eps", str(optim.get("eps", 1e-8)),
        "--lr_scheduler.warmup_steps", str(min(optim.get("warmup_steps", 10), a.warmup + a.steps)),
        "--lr_scheduler.decay_type", "cosine", "--lr_scheduler.min_lr_factor", str(optim.get("min_lr_ratio", 0.1)),
        "--activation_checkpoint.mode", a.ac, "--debug.seed", "0",
    ]
    if a.ac == "selective":
        args += ["--activation_checkpoint.selective_ac_option", a.sac_option]
    if a.compile:
        args += ["--compile.enable", "--compile.components", "model,loss"]
    if a.routing == "balanced":
        args += ["--debug.moe_force_load_balance"]
    return args + extra


class StepRecorder:
    """Stands in for the MetricsProcessor's logger: keeps each step's metrics dict (TorchTitan computes tps, TFLOPS,
    MFU and memory before calling it, and resets the peak memory stats right after) and forwards it."""

    def __init__(self, inner):
        self.inner, self.rows = inner, []

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if torch.cuda.is_available():
            row["max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.rows.append(row)
        self.inner.log(metrics, step)

    def close(self) -> None:
        self.inner.close()


def summarize(a, rows: list[dict], tokens_per_step: int) -> dict:
    """Steady state = the steps after the first `warmup` (step 1 also holds TorchTitan's set-up and compilation)."""
    steady = [r for r in rows if r["step"] > a.warmup]
    if not steady:
        raise RuntimeError(f"no steps after warmup={a.warmup} were logged (logged: {[r['step'] for r in rows]})")
    times = [r["time_metrics/end_to_end(s)"] for r in steady]
    mean = lambda key: sum(r[key] for r in steady) / len(steady)
    out = {
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step * len(times) / sum(times),
        "step_time_s": sum(times) / len(times),
        "step_time_median_s": statistics.median(times),
        "peak_mem_gib": max((r["max_allocated_gib"] for r in rows if "max_allocated_gib" in r), default=None),
        "peak_mem_active_gib": max(r["memory/max_active(GiB)"] for r in rows),
        "peak_mem_reserved_gib": max(r["memory/max_reserved(GiB)"] for r in rows),
        "loss_first": rows[0]["loss_metrics/global_avg_loss"],
        "loss_last": rows[-1]["loss_metrics/global_avg_loss"],
        "framework_tflops": mean("tflops"),
        "framework_mfu": mean("mfu(%)"),
        "framework_tps_mean": mean("throughput(tps)"),
    }
    keep = {"loss_metrics/global_avg_loss": "loss", "grad_norm": "grad_norm", "throughput(tps)": "tps",
            "time_metrics/end_to_end(s)": "step_time_s", "tflops": "tflops", "mfu(%)": "mfu",
            "memory/max_reserved(GiB)": "max_reserved_gib", "max_allocated_gib": "max_allocated_gib"}
    out["per_step"] = [{"step": r["step"], **{v: r[k] for k, v in keep.items() if k in r}} for r in rows]
    return out


def write_json(path: str, data: dict) -> None:
    """Atomic: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def count_pithtrain(cfg: dict) -> tuple[int | None, object, str]:
    """(parameter count of PithTrain's own model on the meta device, (model module, model config), error text)."""
    try:
        try:
            import pithtrain  # noqa: F401
        except ImportError:
            sys.path.append(str(REPO / "framework"))
        from pithtrain.config import build_config, model_classes, model_module

        pcfg = build_config(copy.deepcopy(cfg))
        model_cls = model_classes(pcfg.family)[1]
        with torch.device("meta"):
            net = model_cls(pcfg.model)
        return sum(p.numel() for p in net.parameters()), (model_module(pcfg.family), pcfg.model), ""
    except Exception as e:  # a checkout in the middle of an edit: report it, do not fail the dry run
        return None, None, f"{type(e).__name__}: {e}"


def dry_run(a, spec_name: str, args, config, cfg: dict) -> dict:
    """Build TorchTitan's config and model on the meta device (no GPU, no process group); compare parameter
    counts, and for DeepSeek the YaRN frequencies and softmax scale, with PithTrain's."""
    from torchtitan.protocols import train_spec as ts
    from torchtitan.tools import utils

    spec = ts.get_train_spec(spec_name)
    margs = spec.model_args[config.model.flavor]
    margs.update_from_config(config)
    with torch.device("meta"), utils.set_default_dtype(torch.float32):
        net = spec.model_cls(margs)
    params, flops = margs.get_nparams_and_flops(net, config.training.seq_len)
    ref, pt, err = count_pithtrain(cfg)
    out = {"params_torchtitan": params, "params_pithtrain": ref, "params_match": ref == params if ref else None,
           "torchtitan_flops_per_token": flops, "model_args": dataclasses.asdict(margs)}
    if err:
        out["pithtrain_error"] = err
    if pt and cfg["model"]["family"] == "deepseek_v2":
        from torchtitan.models.deepseek_v3.model.model import precompute_freqs_cis

        module, pcfg = pt
        inv_freq, attention_factor = module.rope_inv_freq(pcfg)
        titan = precompute_freqs_cis(margs)[1].angle()  # position 1: the angle is the frequency itself
        attn = net.layers["1"].attention
        out["rope_max_abs_diff"] = float((titan - inv_freq).abs().max())
        out["softmax_scale"] = {"torchtitan": attn.softmax_scale, "pithtrain": module.softmax_scale(pcfg),
                                "pithtrain_cos_sin_factor": attention_factor}
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--config", help="another PithTrain TOML for the shape (default: framework/configs/small-*.toml)")
    p.add_argument("--routing", choices=["balanced", "natural"], default="balanced")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--ac", choices=["none", "selective", "full"], default="none")
    p.add_argument("--sac-option", default="op", help="TorchTitan selective_ac_option: 'op' (per-op) or layer freq N")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--steps", type=int, default=10, help="measured steps, after the warmup ones (default 10)")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured steps first, >= 1: step 1 holds set-up and "
                   "compilation (default 5)")
    p.add_argument("--data", choices=["random", "builtin"], default="random",
                   help="random: uniform token ids (throughput); builtin: PithTrain's builtin corpus in its trainer's "
                        "order (the standard run spec: losses compare with pithtrain.train's)")
    p.add_argument("--seed", type=int, default=0, help="data order seed for --data builtin (PithTrain's train.seed)")
    p.add_argument("--metrics", help="also write per-step metrics.jsonl here, in PithTrain's fields")
    p.add_argument("--out", help="result JSON (default result.json; with --dry-run: only printed unless given)")
    p.add_argument("--dry-run", action="store_true", help="CPU only: build config and meta model, print counts")
    a, extra = p.parse_known_args(argv)
    if not a.dry_run and (a.warmup < 1 or a.steps < 1):
        p.error("need --warmup >= 1 (TorchTitan's step 1 includes set-up and compilation) and --steps >= 1")
    return a, extra


def main(argv: list[str] | None = None) -> int:
    a, extra = parse(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join([sys.executable, "-m", "adapters.torchtitan.throughput", *argv])
    cfg = load_pithtrain_config(a.shape, a.config)
    stub_note = stub_datasets_if_missing()
    args, notes = build_model_args(cfg["model"], a.seq_len)
    notes += [stub_note] if stub_note else []
    spec_name = register_spec(cfg["model"]["family"], args, a.data, a.seed)
    dump = tempfile.mkdtemp(prefix="torchtitan-bench-")
    targs = titan_args(a, spec_name, cfg, dump, extra)

    import torchtitan
    from torchtitan.config import ConfigManager
    from torchtitan.tools.logging import init_logger

    init_logger()
    config = ConfigManager().parse_args(targs)
    if a.dry_run:
        out = {"shape": a.shape, **dry_run(a, spec_name, args, config, cfg), "torchtitan_args": targs, "notes": notes}
        shutil.rmtree(dump, ignore_errors=True)
        print(json.dumps(out, indent=2, default=str))
        if a.out:
            write_json(a.out, out)
        return 0 if out["params_match"] is not False else 1

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        os.environ.setdefault(key, value)  # one process, no torchrun needed (a torchrun launch wins)
    if "PYTORCH_ALLOC_CONF" not in os.environ:  # as TorchTitan's run_train.sh launches; the caller's setting wins
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    alloc_conf = os.environ.get("PYTORCH_ALLOC_CONF", os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    from torchtitan.train import Trainer

    trainer = Trainer(config)
    recorder = trainer.metrics_processor.logger = StepRecorder(trainer.metrics_processor.logger)
    try:
        trainer.train()
    finally:
        trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        shutil.rmtree(dump, ignore_errors=True)  # only TorchTitan's empty trace folder: nothing is saved
    notes += [
        "tokens_per_s = micro_batch * grad_accum * seq_len * measured steps / sum of their times (the `steps` "
        "after `warmup`); each step time is TorchTitan's own (perf_counter between consecutive metric logs, log_freq 1, which syncs on loss.item())",
        "peak_mem_gib = max over steps of torch.cuda.max_memory_allocated() (TorchTitan resets the peak each step); "
        "TorchTitan itself prints max reserved (peak_mem_reserved_gib) and logs max active (peak_mem_active_gib)",
        "framework_tflops / framework_mfu (percent): TorchTitan's, from its flops-per-token "
        f"({trainer.metrics_processor.num_flops_per_token:.4g}) and its peak-FLOPS table",
        "LR: TorchTitan's linear warmup (optim.warmup_steps of the TOML) then cosine to min_lr_ratio * lr over "
        "warmup + steps; it does not change the work per step",
        "mixed precision: fp32 params and AdamW state, bf16 autocast for the forward (TorchTitan's single-device AMP)",
        f"routing={a.routing}: " + ("TorchTitan's debug.moe_force_load_balance (round-robin: token t's k slots go to "
                                    "experts t*k..t*k+k-1 mod E, as PithTrain's force_balanced; the router still "
                                    "scores and its gate still trains)"
                                    if a.routing == "balanced" else "learned router from initialisation"),
        "AdamW: TorchTitan's weight decay covers every parameter; PithTrain exempts norms and other vectors",
        f"CUDA allocator: {alloc_conf!r} (TorchTitan's run_train.sh sets expandable_segments:True)",
        "attention: TorchTitan's SDPA wrapper restricts backends to cuDNN, Flash and math (PithTrain: SDPA default)",
    ]
    if a.ac == "selective":
        notes.append(f"selective AC: TorchTitan selective_ac_option={a.sac_option!r}")
    if a.compile:
        notes.append("compile: TorchTitan's (fullgraph per dense block; in MoE blocks attention, norms, router, "
                     "reorderer, shared experts and the grouped-mm expert function each, MoE dispatch/combine eager) "
                     "plus the compiled loss")
    result = {
        "framework": "torchtitan", "version": torchtitan.__version__, "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "shape": a.shape, "routing": a.routing, "micro_batch": a.micro_batch, "grad_accum": a.grad_accum,
        "seq_len": a.seq_len, "ac": a.ac, "compile": a.compile, "steps": a.steps, "warmup": a.warmup, "total_steps": a.warmup + a.steps,
        **summarize(a, recorder.rows, a.micro_batch * a.grad_accum * a.seq_len),
        "params": sum(p.numel() for m in trainer.model_parts for p in m.parameters()),
        "framework_flops_per_token": trainer.metrics_processor.num_flops_per_token,
        "command": command, "torchtitan_args": targs, "notes": notes,
    }
    result["data"] = a.data
    a.out = a.out or "result.json"
    write_json(a.out, result)
    if a.metrics:
        from adapters.run_data import write_metrics

        write_metrics(a.metrics, [{**r, "tokens_per_s": r.get("tps"), "peak_mem_gib": r.get("max_allocated_gib")}
                                  for r in result["per_step"]])
    print(f"[torchtitan-bench] {a.shape} {a.routing} mb={a.micro_batch}x{a.grad_accum} ac={a.ac} compile={a.compile}: "
          f"{result['tokens_per_s']:,.0f} tokens/s, {result['step_time_s']:.3f} s/step, "
          f"peak {result['peak_mem_gib']} GiB allocated -> {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
