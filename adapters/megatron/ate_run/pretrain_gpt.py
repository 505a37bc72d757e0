"""Pretrain a GPT model with Megatron-Core on one GPU: the launch entry ATE-Bench adds to a Megatron-Core workspace.

The megatron-core wheel carries only `megatron/core`; Megatron-LM's `pretrain_gpt.py` and `megatron/training` are not
in it. This file is that launch entry, built from Megatron-Core's own parts only: parallel_state for a world of one,
GPTModel from the local (no Transformer Engine) layer spec with MoELayer, TopKRouter and the allgather dispatcher,
Float16Module + DistributedDataParallel (fp32 main grads), the DistributedOptimizer (bf16 params, fp32 master weights,
Adam, grad clipping), OptimizerParamScheduler, forward_backward_no_pipelining, and dist_checkpointing.

    python -m ate_run.pretrain_gpt --config ate_run/tiny.toml --train-iters 5 --out runs/smoke
    python -m ate_run.pretrain_gpt --config ate_run/small.toml --out runs/small --no-save-optim

Run folder (--out):
    config.json                     the resolved config (TOML tables, CLI overrides applied, plus "device")
    metrics.jsonl                   one line per optimizer step: step, loss, grad_norm, lr, tokens_per_s,
                                    step_time_s, peak_mem_gib
    checkpoints/iter_0000005/       Megatron dist_checkpointing ("model", and "optimizer" unless --no-save-optim),
                                    every --save-interval steps and after the last step; written as
                                    checkpoints/.tmp_iter_0000005 and renamed when complete
    checkpoints/latest_checkpointed_iteration.txt

Data: `ate_run.data` (PithTrain's built-in corpus as token files), imported when training starts.

Script API (each function below has its own docstring):
    load_config(path, overrides=None) -> dict
    build_model(cfg, device) -> GPTModel           (also: device_mode(device), model_config(cfg, device))
    wrap_for_training(model, cfg, device) -> (ddp_model, optimizer, scheduler)
    train_step(model, optimizer, scheduler, batches) -> (loss, grad_norm)
    save_checkpoint(model, optimizer, path, save_optim), load_checkpoint(model, path)
    main(argv=None) -> int

`main` calls `train_step` by its global name at each step, so a script can wrap it:

    import ate_run.pretrain_gpt as pg
    orig = pg.train_step
    pg.train_step = lambda *a: print("step") or orig(*a)
    pg.main(["--config", "ate_run/tiny.toml", "--out", "runs/x"])

Routing: `ROUTER_CLASS` (this module's attribute, imported on first use) is Megatron's
`megatron.core.transformer.moe.router.TopKRouter`. Its forward returns (probs [tokens, experts] float,
routing_map [tokens, experts] bool), tokens = seq x micro-batch; record it with a forward hook:

    for m in model.modules():
        if isinstance(m, pg.ROUTER_CLASS):
            m.register_forward_hook(lambda mod, inp, out: loads.append(out[1].sum(0)))
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import shutil
import socket
import sys
import time
import tomllib
import types
import typing
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

PINNED = "0.16.1"  # the megatron-core version this entry was written against


def __getattr__(name):
    if name == "ROUTER_CLASS":  # imported lazily, so that --help and config errors need no megatron import
        from megatron.core.transformer.moe.router import TopKRouter

        return TopKRouter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- config: TOML -> resolved dict ----


class ConfigError(ValueError):
    """Bad input; the message names the file or key. The CLI prints it as one line and exits 2."""


# [train]: Megatron-LM's argument names; None = required. Defaults are Megatron-LM's.
TRAIN_KEYS = {
    "micro_batch_size": None, "global_batch_size": 0, "seq_length": None, "train_iters": None, "seed": 1234,
    "lr": None, "min_lr": 0.0, "lr_warmup_iters": 0, "lr_decay_style": "linear", "weight_decay": 0.01,
    "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8, "clip_grad": 1.0,
}  # global_batch_size 0: the micro-batch size (no gradient accumulation)
CHECKPOINT_KEYS = {"save_interval": 0, "save_optim": True}
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
NONE_IF_ZERO = ("q_lora_rank",)  # TOML has no null: 0 stands for None (no query compression), as Megatron-LM's
#                                  --q-lora-rank default
TABLES = ("model", "gpt", "train", "checkpoint")


def _config_class(model: dict):
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    return MLATransformerConfig if model.get("multi_latent_attention") else TransformerConfig


def _gpt_keys() -> dict:
    from megatron.core.models.gpt import GPTModel

    skip = {"self", "config", "transformer_layer_spec", "mtp_block_spec", "pg_collection", "vp_stage"}
    return {k: p.annotation for k, p in inspect.signature(GPTModel.__init__).parameters.items() if k not in skip}


def _check_value(value, hint, key: str):
    """`value` (from TOML) against a type annotation; ConfigError naming `key` if it cannot be one."""
    origin, targs = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return value
    if origin is typing.Literal:
        if value not in targs:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, targs))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = [t for t in targs if t is not type(None)]
        for t in options:
            try:
                return _check_value(value, t, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key} has the wrong type: {value!r} is not {hint}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        item = targs[0] if targs else typing.Any
        return [_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{key} must be {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key} cannot be set from TOML (type {hint}); the launch entry sets it in code")


def _check_plain(value, default, key: str):
    """[train]/[checkpoint] values: the type of the default (int accepted for float)."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if default is None:  # required keys: numbers
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {type(value).__name__} {value!r}")
        return value
    if type(value) is not type(default):
        raise ConfigError(f"{key} must be {type(default).__name__}, got {type(value).__name__} {value!r}")
    return value


def _apply_overrides(raw: dict, overrides: dict) -> None:
    known = {"train": TRAIN_KEYS, "checkpoint": CHECKPOINT_KEYS}
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "device":
            raw["device"] = value
        elif key in TABLES and isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        elif "." in key:
            table, name = key.split(".", 1)
            if table not in TABLES:
                raise ConfigError(f"override {key}: unknown table [{table}] (known: {', '.join(TABLES)})")
            raw.setdefault(table, {})[name] = value
        else:
            tables = [t for t, keys in known.items() if key in keys]
            if not tables:
                raise ConfigError(f"override {key}: not a [train] or [checkpoint] key; write table.key")
            raw.setdefault(tables[0], {})[key] = value


def load_config(path, overrides: dict | None = None) -> dict:
    """Read a launch TOML and return the resolved config, as written to config.json: {"model": TransformerConfig
    keyword args, "gpt": GPTModel keyword args, "train": {...} with Megatron-LM defaults filled in,
    "checkpoint": {"save_interval", "save_optim"}, "device": "cuda" | "cpu"}.

    `overrides`: {"train.train_iters": 3} (table.key), {"train": {...}} (merged into a table), {"device": "cpu"},
    or a bare [train]/[checkpoint] key ({"train_iters": 3}); None values are skipped. Raises ConfigError naming the
    file or key for a missing file, invalid TOML, an unknown table or key, or a bad value; the [model] table is
    checked by building its TransformerConfig (which imports megatron.core)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    for key, value in raw.items():
        if key not in TABLES or not isinstance(value, dict):
            raise ConfigError(f"{path}: unknown table [{key}] (known: {', '.join(TABLES)})")
    _apply_overrides(raw, overrides or {})
    device = raw.pop("device", "cuda")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be cuda or cpu, got {device!r}")

    resolved = {}
    for table, keys in (("train", TRAIN_KEYS), ("checkpoint", CHECKPOINT_KEYS)):  # plain Python: checked first
        given = raw.get(table, {})
        for key in given:
            if key not in keys:
                raise ConfigError(f"unknown config key {table}.{key} (known: {', '.join(keys)})")
        values = {}
        for key, default in keys.items():
            if key not in given and default is None:
                raise ConfigError(f"{table}.{key} is required")
            values[key] = _check_plain(given[key], default, f"{table}.{key}") if key in given else default
        resolved[table] = values
    _validate(resolved)

    model = dict(raw.get("model", {}))
    if not model:
        raise ConfigError(f"{path}: the [model] table is missing")
    cls = _config_class(model)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in model.items():
        if key not in fields:
            raise ConfigError(f"unknown config key model.{key} (not a field of {cls.__name__})")
        model[key] = _check_value(value, fields[key].type, f"model.{key}")

    gpt, gpt_keys = dict(raw.get("gpt", {})), _gpt_keys()
    for key, value in gpt.items():
        if key not in gpt_keys:
            raise ConfigError(f"unknown config key gpt.{key} (GPTModel takes: {', '.join(sorted(gpt_keys))})")
        gpt[key] = _check_value(value, gpt_keys[key], f"gpt.{key}")
    if gpt.get("vocab_size", 0) < 1:
        raise ConfigError(f"gpt.vocab_size is required and must be >= 1, got {gpt.get('vocab_size')}")

    resolved = {"model": model, "gpt": gpt, **resolved, "device": device}
    try:  # the model table's own checks (TransformerConfig.__post_init__)
        model_config(resolved, "meta")
    except ConfigError:
        raise
    except Exception as e:  # any construction error is a bad [model] value
        raise ConfigError(f"[model] of {path}: {type(e).__name__}: {' '.join(str(e).split())}") from None
    return resolved


def _validate(cfg: dict) -> None:
    t, c = cfg["train"], cfg["checkpoint"]
    if not t["global_batch_size"]:
        t["global_batch_size"] = t["micro_batch_size"]
    for key in ("micro_batch_size", "global_batch_size", "seq_length", "train_iters"):
        if not isinstance(t[key], int) or t[key] < 1:
            raise ConfigError(f"train.{key} must be an integer >= 1, got {t[key]!r}")
    if t["global_batch_size"] % t["micro_batch_size"]:
        raise ConfigError(f"train.global_batch_size={t['global_batch_size']} must be a multiple of "
                          f"train.micro_batch_size={t['micro_batch_size']} (one GPU: the rest is grad accumulation)")
    if not t["lr"] > 0:
        raise ConfigError(f"train.lr must be > 0, got {t['lr']}")
    if not 0 <= t["min_lr"] <= t["lr"]:
        raise ConfigError(f"train.min_lr must be in [0, lr={t['lr']}], got {t['min_lr']}")
    if not isinstance(t["lr_warmup_iters"], int) or t["lr_warmup_iters"] < 0:
        raise ConfigError(f"train.lr_warmup_iters must be an integer >= 0, got {t['lr_warmup_iters']!r}")
    if t["lr_decay_style"] not in LR_DECAY_STYLES:
        raise ConfigError(f"train.lr_decay_style must be one of {', '.join(LR_DECAY_STYLES)}, "
                          f"got {t['lr_decay_style']!r}")
    for key in ("weight_decay", "clip_grad"):
        if t[key] < 0:
            raise ConfigError(f"train.{key} must be >= 0, got {t[key]}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= t[key] < 1:
            raise ConfigError(f"train.{key} must be in [0, 1), got {t[key]}")
    if not t["adam_eps"] > 0:
        raise ConfigError(f"train.adam_eps must be > 0, got {t['adam_eps']}")
    if c["save_interval"] < 0:
        raise ConfigError(f"checkpoint.save_interval must be >= 0, got {c['save_interval']}")


def model_config(cfg: dict, device: str):
    """TransformerConfig (MLATransformerConfig when model.multi_latent_attention) from the [model] table plus what
    the launch entry sets in code: SwiGLU's silu, bf16 params, local attention, the fusions that need neither
    Transformer Engine nor Apex on and the others off, and CPU initialisation for device cpu ("meta": no init).
    A [model] key overrides these code defaults where TOML can express it."""
    from megatron.core.transformer.enums import AttnBackend

    kw = dict(
        activation_func=F.silu, bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
        attention_backend=AttnBackend.local,
        # Megatron's torch.compile'd (jit_fuser) SwiGLU and bias-dropout-add need neither Apex nor TE.
        bias_activation_fusion=True, bias_dropout_fusion=True,
        # These need Apex, TE or Megatron-LM's compiled kernels, none of which the wheel ships.
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, moe_permute_fusion=False, moe_router_fusion=False,
        use_cpu_initialization=device != "cuda", perform_initialization=device != "meta",
    )
    model = {k: (None if k in NONE_IF_ZERO and v == 0 else v) for k, v in cfg["model"].items()}
    kw.update(model)
    return _config_class(model)(**kw)


# ---- layer spec: Megatron's local spec, with the core-attention and expert choices made explicit ----


def attention_classes():
    """Core-attention modules for the local spec's core_attention slot."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.module import MegatronModule

    class LocalAttention(DotProductAttention):
        """Megatron's unfused DotProductAttention. MLA passes k_channels/v_channels, which 0.16.1's local class does
        not accept (get_gpt_layer_local_spec(multi_latent_attention=True) fails to build), so they are taken here;
        the unfused kernels already handle q/k width 192 against v width 128 with kv_channels = v_head_dim."""

        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)

    class SDPAttention(MegatronModule):
        """torch scaled_dot_product_attention (flash / cuDNN / memory-efficient kernels) in the same slot: the
        fused attention the TE path would get, which Megatron-Core 0.16 has no non-TE module for."""

        def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                     softmax_scale=None, k_channels=None, v_channels=None, cp_comm_type=None, pg_collection=None):
            super().__init__(config=config)
            self.scale = softmax_scale
            self.gqa = (config.num_query_groups or config.num_attention_heads) != config.num_attention_heads

        def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None, **kwargs):
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, heads, d] -> [b, heads, s, d]
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=self.gqa)
            return out.permute(2, 0, 1, 3).flatten(2)  # [s, b, heads * d_v]

    return {"local": LocalAttention, "sdpa": SDPAttention}


def layer_specs(config, attention: str) -> list:
    """Megatron's own block spec (get_gpt_decoder_block_spec with use_transformer_engine=False, i.e. the local spec
    per layer, MoE or dense by moe_layer_freq) with the chosen core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    cls = attention_classes()[attention]
    for spec in block.layer_specs:
        spec.submodules.self_attention.submodules.core_attention = cls
    return block


def use_torch_grouped_mm() -> None:
    """Serve Megatron's GroupedMLP (the legacy grouped-GEMM experts of the local spec) with torch._grouped_mm in
    place of the `grouped_gemm` package it imports (CUTLASS, built from source: not on the device)."""
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    def gmm(a, b, batch_sizes, trans_b=False):
        offsets = torch.cumsum(batch_sizes.to(a.device), 0).to(torch.int32)
        return torch._grouped_mm(a, b.transpose(-2, -1) if trans_b else b, offs=offsets)

    gg.grouped_gemm = gg.ops = type("TorchGroupedGemm", (), {"gmm": staticmethod(gmm)})


def fix_mcore_without_te() -> list[str]:
    """Two megatron-core 0.16.1 bugs that only show without Transformer Engine, each fixed by setting the module
    flag the code meant to set. -> notes naming what was fixed."""
    import importlib.util

    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    if importlib.util.find_spec("transformer_engine") is not None:
        return []
    fixed = []
    # moe_utils defines te_general_gemm only when TE imports, yet the router's gating GEMM tests it unguarded:
    # every MoE forward raises NameError. None selects the torch.mm path that is written for this case.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
        fixed.append("moe_utils.te_general_gemm = None (router GEMM raised NameError without TE)")
    # multi_latent_attention sets HAVE_TE from importing Megatron's TE wrappers, which import without TE (a MagicMock
    # stands in), then calls isinstance() with the mock class as the type: MLA fails to build.
    if multi_latent_attention.HAVE_TE:
        multi_latent_attention.HAVE_TE = False
        fixed.append("multi_latent_attention.HAVE_TE = False (MLA failed to build without TE)")
    return [f"megatron-core {PINNED} without TE, flag fixes: " + "; ".join(fixed)] if fixed else []


# ---- runtime: a world of one; CPU emulation for tests ----


class CudaOnCpu(torch.overrides.TorchFunctionMode):
    """--device cpu only: Megatron-Core writes device="cuda" in many places (causal mask, optimizer flags, grad
    buffers); this sends those tensors to the CPU so that a tiny model can be trained here to shake out bugs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:  # the optimizer checks "torch.cuda.*Tensor"
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func is torch.device and args and is_cuda(args[0]):
            return torch.device("cpu")
        if is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def is_cuda(device) -> bool:
    """Whether a device argument names a CUDA device (an int is an accelerator index)."""
    if isinstance(device, bool) or device is None:
        return False
    if isinstance(device, int):
        return True
    return (isinstance(device, str) and device.startswith("cuda")) or (
        isinstance(device, torch.device) and device.type == "cuda")


def patch_cuda_for_cpu() -> None:
    """Process-wide stubs of the torch.cuda calls and the CUDA RNG tracker Megatron makes (CPU emulation)."""
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.tensor_parallel import random as tp_random

    # No dropout and one process: the model-parallel RNG fork is a no-op, and recomputation saves the CPU RNG.
    get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # Recomputation runs in autograd's thread, outside CudaOnCpu (modes are per thread): its one "cuda" tensor.
    from megatron.core.fusions import fused_softmax

    fused_softmax.get_default_causal_mask = lambda sq: torch.ones(sq, sq, dtype=torch.bool).triu(1)


def cpu_emulation_active() -> bool:
    """Whether a CudaOnCpu mode is in force in this thread."""
    return any(isinstance(m, CudaOnCpu) for m in torch.overrides._get_current_function_mode_stack())


@contextlib.contextmanager
def device_mode(device: str):
    """Context for everything done with a model on `device`: for "cpu" (and "meta") the CPU emulation (CudaOnCpu
    plus patch_cuda_for_cpu) Megatron-Core needs off CUDA; for "cuda" nothing. main() enters it itself; a script
    on the CPU should wrap build_model, wrap_for_training, train_step and the checkpoint calls in it:

        with pg.device_mode("cpu"):
            model = pg.build_model(cfg, "cpu"); ...

    (build_model on "cpu" outside it turns the emulation on for the rest of the thread.) Modes are per thread."""
    if device == "cuda" or cpu_emulation_active():
        yield
        return
    patch_cuda_for_cpu()
    with CudaOnCpu():
        yield


_OWN_PORT = False  # whether init_world chose MASTER_PORT (then a re-init after teardown_world picks a fresh one)


def init_world(device: str) -> None:
    """torch.distributed and Megatron's parallel state for a world of one process (NCCL on cuda, gloo otherwise).
    Does nothing where they are already initialised."""
    global _OWN_PORT
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ or _OWN_PORT:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
            _OWN_PORT = True
        if device == "cuda":
            torch.cuda.set_device(0)
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    # Gloo side groups serve Megatron-LM's multi-rank checkpoint gathers only; a world of one needs none.
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(create_gloo_process_groups=False)


def teardown_world() -> None:
    """Undo init_world (Megatron's parallel state, then the process group)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- model, optimizer, step ----


def build_model(cfg: dict, device: str):
    """The bare GPTModel of a resolved config (load_config): Megatron's local layer spec (no Transformer Engine) with
    Megatron's unfused DotProductAttention and SequentialMLP experts (GroupedMLP on torch._grouped_mm when
    model.moe_grouped_gemm is set and the grouped_gemm package is missing). Initialises the world first
    (init_world) and seeds the init from train.seed: torch.manual_seed, and model_parallel_cuda_manual_seed on
    cuda. device: "cuda"; "cpu" (needs the CPU emulation: see device_mode; turned on for the rest of the thread if
    not active); "meta" (shapes only, no init: parameter counting; emulation only while building)."""
    from megatron.core.models.gpt import GPTModel

    if device == "cpu" and not cpu_emulation_active():
        patch_cuda_for_cpu()
        CudaOnCpu().__enter__()  # left on for the thread: the model cannot run without it
    scope = device_mode("cpu") if device == "meta" else contextlib.nullcontext()
    with scope, torch.device("meta") if device == "meta" else contextlib.nullcontext():
        init_world("cuda" if device == "cuda" else "cpu")
        seed = cfg["train"]["seed"]
        torch.manual_seed(seed)
        if device == "cuda":
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(seed)
        config = model_config(cfg, device)
        if config.moe_grouped_gemm:
            import importlib.util

            if importlib.util.find_spec("grouped_gemm") is None:
                use_torch_grouped_mm()
        fix_mcore_without_te()
        gpt = {"max_sequence_length": cfg["train"]["seq_length"], **cfg["gpt"]}
        return GPTModel(config=config, transformer_layer_spec=layer_specs(config, "local"), **gpt)


def wrap_model(model, device: str, optimizer_config):
    """Megatron's training wrappers around a bare model: Float16Module (bf16 params), DistributedDataParallel with
    fp32 main-grad buffers, and get_megatron_optimizer's DistributedOptimizer (fp32 master weights), as
    Megatron-LM's setup_model_and_optimizer makes them. -> (ddp_model, optimizer)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    config = model.config
    model = model.to(device)
    model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=True)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    optimizer = get_megatron_optimizer(optimizer_config, [model], use_gloo_process_groups=False)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return model, optimizer


def wrap_for_training(model, cfg: dict, device: str):
    """-> (ddp_model, optimizer, scheduler) for a bare model from build_model: wrap_model with Adam (torch AdamW,
    Megatron's fallback without Apex/TE; decoupled weight decay, not on biases and norms) from [train], and
    Megatron's own OptimizerParamScheduler: linear warmup from 0 over lr_warmup_iters, then lr_decay_style to
    min_lr at train_iters, counted in iterations. As in Megatron-LM, the scheduler is stepped after each optimizer
    step, so step 1 runs at lr 0 when lr_warmup_iters > 0 and step k at lr * (k - 1) / lr_warmup_iters. A run no
    longer than the warmup (a smoke run: --train-iters 5) decays over lr_warmup_iters + 1 iterations, which it never
    reaches (Megatron's scheduler requires warmup < decay iterations)."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg["train"]
    opt_config = OptimizerConfig(optimizer="adam", lr=t["lr"], min_lr=t["min_lr"], weight_decay=t["weight_decay"],
                                 adam_beta1=t["adam_beta1"], adam_beta2=t["adam_beta2"], adam_eps=t["adam_eps"],
                                 clip_grad=t["clip_grad"], bf16=True, params_dtype=torch.bfloat16,
                                 use_distributed_optimizer=True)
    ddp_model, optimizer = wrap_model(model, device, opt_config)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t["lr"], min_lr=t["min_lr"], lr_warmup_steps=t["lr_warmup_iters"],
        lr_decay_steps=max(t["train_iters"], t["lr_warmup_iters"] + 1), lr_decay_style=t["lr_decay_style"],
        start_wd=t["weight_decay"], end_wd=t["weight_decay"], wd_incr_steps=t["train_iters"],
        wd_incr_style="constant")
    return ddp_model, optimizer, scheduler


def megatron_step(model, optimizer, scheduler, batches: list) -> tuple[float, float, bool]:
    """train_step, also returning whether the optimizer applied the update (False: skipped, e.g. inf grads)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(model.parameters()).device
    micro_batch, seq_len = batches[0][0].shape

    def forward_step(data_iterator, model):
        tokens, labels = (t.to(device, non_blocking=True) for t in next(data_iterator))
        position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        per_token = model(tokens, position_ids, None, labels=labels)  # [b, s] fp32 cross entropy

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"lm loss": loss.detach()}

        return per_token, loss_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model], num_microbatches=len(batches),
        seq_length=seq_len, micro_batch_size=micro_batch, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    if scheduler is not None:
        scheduler.step(increment=1)
    loss = sum(float(x["lm loss"]) for x in losses) / len(losses)
    return loss, float(grad_norm if grad_norm is not None else float("nan")), bool(ok)


def train_step(model, optimizer, scheduler, batches: list) -> tuple[float, float]:
    """One optimizer step of a wrapped model (wrap_for_training) over the step's micro-batches, `batches` =
    [(input_ids [B, S], labels [B, S]) int64, ...] on any device: zero the grad buffers,
    forward_backward_no_pipelining (via get_forward_backward_func) with num_microbatches = len(batches) (gradients of
    the mean loss over them, plus the MoE aux loss Megatron attaches), the optimizer step (clipping), then
    scheduler.step(1) (None: no scheduler). -> (mean cross-entropy loss over the micro-batches, grad norm before
    clipping)."""
    loss, grad_norm, _ = megatron_step(model, optimizer, scheduler, batches)
    return loss, grad_norm


# ---- checkpoints ----


def unwrap(model):
    """The GPTModel inside DistributedDataParallel and Float16Module (checkpoint keys are the bare model's, as
    Megatron-LM's unwrap_model makes them)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(model, DistributedDataParallel | Float16Module):
        model = model.module
    return model


def save_checkpoint(model, optimizer, path, save_optim: bool = True) -> None:
    """Save with megatron.core.dist_checkpointing (torch_dist format) into folder `path`: {"model":
    unwrap(model).sharded_state_dict()} plus {"optimizer": optimizer.sharded_state_dict(...)} (the
    DistributedOptimizer's fp32 master weights and Adam moments) when save_optim (`optimizer` may be None without).
    Written as .tmp_<name> beside `path`, renamed when complete; an existing `path` is replaced."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not filesystem_async.HAVE_PSUTIL:
        # The torch_dist writer's (forked) workers log their memory through psutil, an optional import of
        # megatron-core: without it each raises and the save never completes. The number is only logged.
        filesystem_async._process_memory = lambda: 0
    if filesystem_async._results_queue is None:
        # The writer's results queue lives in a manager process Megatron starts with "spawn", which re-imports the
        # caller's __main__: an unguarded script would run again there. A forked manager serves the same queue
        # (the writer's workers are forked processes already).
        import multiprocessing

        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()
    path = Path(path)
    tmp = path.with_name(f".tmp_{path.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {"model": unwrap(model).sharded_state_dict()}
    if save_optim and optimizer is not None:
        # dp_reshardable: Megatron-LM's default format for the DistributedOptimizer (0.16.1's own default,
        # fully_sharded_model_space, is rejected by its dist_checkpointing: "flattened_range is not supported").
        state["optimizer"] = optimizer.sharded_state_dict(
            state, metadata={"distrib_optim_sharding_type": "dp_reshardable"})
    dist_checkpointing.save(state, str(tmp))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def load_checkpoint(model, path) -> None:
    """Load the model weights of a save_checkpoint folder (with or without optimizer state) into `model`: a bare
    GPTModel from build_model or the wrapped model. Needs the world of build_model (and device_mode on the CPU)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path}: not a dist_checkpointing folder (no metadata.json)")
    model = unwrap(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch DCP's own deprecations, inside Megatron's loader
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(state["model"])


# ---- command line ----


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def parse_args(argv=None):
    p = _Parser(prog="python -m ate_run.pretrain_gpt", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="launch TOML: ate_run/tiny.toml or ate_run/small.toml")
    p.add_argument("--train-iters", type=int, help="optimizer steps (default: the config's train.train_iters)")
    p.add_argument("--out", required=True, help="run folder: config.json, metrics.jsonl, checkpoints/")
    p.add_argument("--save-interval", type=int,
                   help="also save a checkpoint every K steps (0 or absent: only after the last step)")
    p.add_argument("--no-save-optim", action="store_true", help="checkpoints without the optimizer state")
    p.add_argument("--seed", type=int, help="init and data-order seed (default: the config's train.seed)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (default: one GPU); cpu: an emulation of Megatron's CUDA-only paths, for tests only")
    return p.parse_args(argv)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def open_data(cfg: dict):
    """ate_run.data's batches for the run, after checking the data fit the config."""
    try:
        from ate_run import data
    except ImportError as e:
        raise ConfigError(f"cannot import ate_run.data ({e}): run from the workspace root with PYTHONPATH set "
                          "to it") from None
    t = cfg["train"]
    vocab = data.info()["vocab_size"]
    if vocab > cfg["gpt"]["vocab_size"]:
        raise ConfigError(f"gpt.vocab_size={cfg['gpt']['vocab_size']} is smaller than the data's {vocab} tokens")
    accum = t["global_batch_size"] // t["micro_batch_size"]
    n = data.num_samples(t["seq_length"])
    if n < t["global_batch_size"]:
        raise ConfigError(f"train.seq_length={t['seq_length']}: the data have {n} samples, fewer than one step's "
                          f"global_batch_size={t['global_batch_size']}")
    return data.batches(t["seq_length"], t["micro_batch_size"], accum, t["seed"])


def main(argv=None) -> int:
    """The command line (module docstring). -> exit status: 0 done, 1 a non-finite loss stopped the run, 2 bad
    input (one line on stderr naming the file or key; nothing written), 3 out of GPU memory."""
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    warnings.filterwarnings("ignore", message="full scope is deprecated")  # 0.16.1's own default cuda_graph_scope
    warnings.filterwarnings("ignore", message=".*torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor)")
    try:
        args = parse_args(argv)
        cfg = load_config(args.config, {"train.train_iters": args.train_iters, "train.seed": args.seed,
                                        "checkpoint.save_interval": args.save_interval,
                                        "checkpoint.save_optim": False if args.no_save_optim else None,
                                        "device": args.device})
        if cfg["device"] == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: torch sees no CUDA device (--device cpu is an emulation for tests)")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: exists and is not a folder")
        if (out / "metrics.jsonl").exists() or (out / "checkpoints").exists():
            raise ConfigError(f"--out {out}: already holds a run (metrics.jsonl or checkpoints/); "
                              "choose a new folder")
        data = open_data(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts
    log = lambda s: print(s, flush=True)
    t, device = cfg["train"], cfg["device"]
    iters, save_interval = t["train_iters"], cfg["checkpoint"]["save_interval"]
    tokens_per_step = t["global_batch_size"] * t["seq_length"]
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "config.json", json.dumps(cfg, indent=1) + "\n")
    ckpt_dir = out / "checkpoints"
    own_world = not torch.distributed.is_initialized()
    import megatron.core

    with device_mode(device):
        try:
            model = build_model(cfg, device)
            n_params = sum(p.numel() for p in model.parameters())
            log(f"megatron-core {megatron.core.__version__} on {device}: {n_params:,} parameters, "
                f"{t['global_batch_size']} x {t['seq_length']} tokens per step, {iters} steps -> {out}")
            model, optimizer, scheduler = wrap_for_training(model, cfg, device)
            with open(out / "metrics.jsonl", "a") as metrics:
                for step in range(1, iters + 1):
                    batches = [next(data) for _ in range(t["global_batch_size"] // t["micro_batch_size"])]
                    lr = optimizer.param_groups[0]["lr"]
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    loss, grad_norm = train_step(model, optimizer, scheduler, batches)
                    torch.cuda.synchronize()
                    dt = time.perf_counter() - start
                    rec = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                           "tokens_per_s": tokens_per_step / dt, "step_time_s": dt,
                           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0}
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    log(f"step {step:4d}/{iters} | loss {loss:.4f} | grad norm {grad_norm:.3f} | lr {lr:.2e} | "
                        f"{dt * 1e3:8.1f} ms | {rec['tokens_per_s']:10,.0f} tok/s")
                    if not math.isfinite(loss):
                        log(f"error: loss is {loss} at step {step}; stopping")
                        return 1
                    if step == iters or (save_interval and step % save_interval == 0):
                        path = ckpt_dir / f"iter_{step:07d}"
                        save_checkpoint(model, optimizer, path, cfg["checkpoint"]["save_optim"])
                        _write_atomic(ckpt_dir / "latest_checkpointed_iteration.txt", f"{step}\n")
                        log(f"saved checkpoint {path}")
        except torch.OutOfMemoryError:
            log(f"out of memory: peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated")
            return 3
        finally:
            if own_world:
                teardown_world()
    return 0


if __name__ == "__main__":
    sys.exit(main())
