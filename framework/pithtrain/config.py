"""Typed run configuration: TOML file + `--set key=value` overrides -> validated dataclasses.

Every mistake is reported as one line naming the key at fault (`ConfigError`); the command-line
entry points turn it into exit status 2. The model table is the model file's own config
dataclass, picked by `model.family` in `model_module` (an if-chain, so grep finds every model).
"""

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A bad configuration value; the message names the key (e.g. `optim.lr`)."""


@dataclass
class TrainConfig:
    run_dir: str = ""  # default: runs/<config file stem>
    steps: int = 100
    micro_batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 128
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if present, else cpu) | "cpu" | "cuda"
    dtype: str = "auto"  # "auto" (bf16 autocast on cuda, fp32 on cpu) | "bf16" | "fp32"
    activation_checkpointing: bool = False
    compile: str = "none"  # torch.compile: "none" | "regions" (attention, router, experts... each) | "layers"
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate held-out loss only at the end
    eval_batches: int = 8


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    schedule: str = "cosine"  # "cosine" | "wsd" (warmup-stable-decay) | "constant"
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables clipping (the norm is still logged)


@dataclass
class DataConfig:
    path: str = "builtin"  # a folder made by `python -m pithtrain.data tokenize`, or "builtin"


@dataclass
class CheckpointConfig:
    enabled: bool = True  # false: never save (benchmarks); resume still reads an existing checkpoint
    every: int = 0  # save every N steps (0: only at the end)
    keep: int = 2  # keep the newest N checkpoints
    weights_only: bool = False  # save model weights only (no AdamW state: a third of the size); for export,
    #   evaluation and init_from, not for resuming
    resume: bool = True  # resume from the newest complete checkpoint in run_dir
    init_from: str = ""  # weights to start from when not resuming (e.g. `pithtrain.convert import` output)


@dataclass
class ParallelConfig:
    """The `[parallel]` table: one device mesh (pp, dp_replicate, dp_shard) over torchrun's processes.

    Data parallelism is dp_replicate x dp_shard (HSDP when dp_replicate > 1, FSDP2 over dp_shard). Expert
    parallelism borrows ep ranks from dp_shard: those ranks read different tokens and hold different experts.
    """

    pp: int = 1  # pipeline stages (ranks); train.grad_accum is the number of pipeline micro-batches
    ep: int = 1  # expert-parallel ranks; must divide dp_shard and model.router.num_experts
    dp_replicate: int = 1  # HSDP replicas
    dp_shard: int = -1  # FSDP shards; -1: world size / (pp * dp_replicate)
    pp_schedule: str = "1f1b"  # "1f1b" | "dualpipev" (two stages per rank in a V)
    pp_overlap: bool = True  # dualpipev: overlap one micro-batch's expert all-to-all with another's compute


@dataclass
class Config:
    family: str
    model: typing.Any  # the model file's config dataclass
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    source: str = ""  # the file the config came from


FAMILIES = ("deepseek_v2", "qwen3_moe")


def model_module(family: str):
    """The model file for `model.family`."""
    if family == "deepseek_v2":
        from pithtrain.models import deepseek_v2

        return deepseek_v2
    if family == "qwen3_moe":
        from pithtrain.models import qwen3_moe

        return qwen3_moe
    raise ConfigError(f"model.family must be one of {', '.join(FAMILIES)}; got {family!r}")


def model_classes(family: str):
    """(config dataclass, model class) of `model.family`."""
    module = model_module(family)
    if family == "deepseek_v2":
        return module.DeepseekV2Config, module.DeepseekV2
    return module.Qwen3MoeConfig, module.Qwen3Moe


def _check_type(value, hint, key: str):
    """Return `value` converted to `hint` (int -> float allowed), or raise ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {type(value).__name__}")
        return from_dict(hint, value, key)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key} has the wrong type: {value!r} is not {hint}")
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{key} must be empty")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{key} must be {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def from_dict(cls, data: dict, prefix: str):
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key {prefix}.{key} (known: {', '.join(sorted(names))})")
    return cls(**{k: _check_type(v, hints[k], f"{prefix}.{k}") for k, v in data.items()})


def parse_override(text: str) -> tuple[list[str], typing.Any]:
    """`a.b.c=value` -> (["a","b","c"], value); the value is read as TOML, else taken as a string."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {k} is not a table")
        node[keys[-1]] = value
    return build_config(raw, source=str(path))


def build_config(raw: dict, source: str = "") -> Config:
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    known = {"model", "train", "optim", "data", "checkpoint", "parallel"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown config table [{key}] (known: {', '.join(sorted(known))})")
    model_raw = raw.get("model", {})
    family = model_raw.pop("family", None)
    if family is None:
        raise ConfigError("model.family is required (one of " + ", ".join(FAMILIES) + ")")
    model_cls, _ = model_classes(family)
    cfg = Config(
        family=family,
        model=from_dict(model_cls, model_raw, "model"),
        train=from_dict(TrainConfig, raw.get("train", {}), "train"),
        optim=from_dict(OptimConfig, raw.get("optim", {}), "optim"),
        data=from_dict(DataConfig, raw.get("data", {}), "data"),
        checkpoint=from_dict(CheckpointConfig, raw.get("checkpoint", {}), "checkpoint"),
        parallel=from_dict(ParallelConfig, raw.get("parallel", {}), "parallel"),
        source=source,
    )
    if not cfg.train.run_dir:
        cfg.train.run_dir = str(Path("runs") / (Path(source).stem if source else "default"))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    try:
        cfg.model.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t, o = cfg.train, cfg.optim
    for key, value in [("train.steps", t.steps), ("train.micro_batch_size", t.micro_batch_size),
                       ("train.grad_accum", t.grad_accum), ("train.seq_len", t.seq_len),
                       ("train.log_every", t.log_every), ("train.eval_batches", t.eval_batches)]:
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {t.device!r}")
    if t.dtype not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.dtype must be auto, bf16 or fp32, got {t.dtype!r}")
    if t.compile not in ("none", "regions", "layers"):
        raise ConfigError(f"train.compile must be none, regions or layers, got {t.compile!r}")
    if o.schedule not in ("cosine", "wsd", "constant"):
        raise ConfigError(f"optim.schedule must be cosine, wsd or constant, got {o.schedule!r}")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if not 0 < o.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction must be in (0, 1], got {o.decay_fraction}")
    if o.warmup_steps < 0 or o.grad_clip < 0 or o.weight_decay < 0:
        raise ConfigError("optim.warmup_steps, optim.grad_clip and optim.weight_decay must be >= 0")
    if cfg.checkpoint.keep < 1 or cfg.checkpoint.every < 0:
        raise ConfigError("checkpoint.keep must be >= 1 and checkpoint.every >= 0")
    validate_parallel(cfg)
    max_pos = getattr(cfg.model, "max_position_embeddings", None)
    if max_pos is not None and t.seq_len > max_pos:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings={max_pos}")


def validate_parallel(cfg: Config, world_size: int | None = None) -> None:
    """Layout checks; with `world_size` (at launch) also that the mesh fills exactly the processes started."""
    p, t = cfg.parallel, cfg.train
    for key in ("pp", "ep", "dp_replicate"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key} must be >= 1, got {getattr(p, key)}")
    if p.dp_shard < 1 and p.dp_shard != -1:
        raise ConfigError(f"parallel.dp_shard must be >= 1 or -1 (the rest of the world), got {p.dp_shard}")
    if p.pp_schedule not in ("1f1b", "dualpipev"):
        raise ConfigError(f"parallel.pp_schedule must be 1f1b or dualpipev, got {p.pp_schedule!r}")
    experts = cfg.model.router.num_experts
    if experts % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} must divide model.router.num_experts={experts}")
    if p.dp_shard != -1 and p.dp_shard % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} must divide parallel.dp_shard={p.dp_shard} (ep ranks are dp_shard ranks)")
    stages = p.pp * (2 if p.pp_schedule == "dualpipev" and p.pp > 1 else 1)
    if stages > cfg.model.num_hidden_layers:
        raise ConfigError(f"parallel.pp={p.pp} ({p.pp_schedule}) needs {stages} stages but the model has "
                          f"model.num_hidden_layers={cfg.model.num_hidden_layers}")
    if p.pp > 1 and cfg.model.tie_word_embeddings:
        raise ConfigError("model.tie_word_embeddings is not supported with parallel.pp > 1")
    if p.pp > 1 and p.pp_schedule == "dualpipev" and t.grad_accum < 2 * p.pp:
        raise ConfigError(f"train.grad_accum={t.grad_accum} must be >= 2 * parallel.pp = {2 * p.pp} for dualpipev "
                          "(grad_accum is the number of pipeline micro-batches)")
    if p.pp > 1 and p.pp_schedule == "dualpipev" and p.pp_overlap and p.ep > 1 and t.activation_checkpointing:
        raise ConfigError("parallel.pp_overlap does not support train.activation_checkpointing (recomputation would "
                          "run expert all-to-alls out of turn); set one of them false")
    if world_size is None:
        return
    shard = p.dp_shard if p.dp_shard != -1 else world_size // (p.pp * p.dp_replicate)
    if p.pp * p.dp_replicate * shard != world_size:
        raise ConfigError(f"parallel.pp={p.pp} x dp_replicate={p.dp_replicate} x dp_shard={p.dp_shard} does not "
                          f"match the world size {world_size} (processes started by torchrun)")
    if shard % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} must divide parallel.dp_shard={shard} (ep ranks are dp_shard ranks)")
    p.dp_shard = shard


def to_dict(cfg: Config) -> dict:
    """Plain dict of the resolved config (written to run_dir/config.json)."""
    names = ("model", "train", "optim", "data", "checkpoint", "parallel")
    out = {name: dataclasses.asdict(getattr(cfg, name)) for name in names}
    out["model"] = {"family": cfg.family, **out["model"]}
    return out
