"""Hugging Face interoperability: `python -m pithtrain.convert {export,import} ...`.

export: a PithTrain run (its config.json and a DCP checkpoint) -> a folder transformers loads
        (config.json, model*.safetensors in the released per-expert layout, tokenizer files).
import: a Hugging Face folder (DeepSeek-V2 or Qwen3-MoE naming; per-expert or fused experts) ->
        a PithTrain weights checkpoint plus the matching `[model]` TOML table; start a run from it
        with `--set checkpoint.init_from=<out>/weights`.
Outputs are written atomically: a failed conversion leaves nothing behind.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pithtrain import checkpoint as ckpt
from pithtrain.config import ConfigError, build_config, model_classes, model_module
from pithtrain.fileio import atomic_dir

HF_MODEL_TYPES = {"deepseek_v2": "deepseek_v2", "qwen3_moe": "qwen3_moe"}  # HF model_type -> family
SHARD_BYTES = 5 * 2**30
ASSETS = Path(__file__).parent / "assets"


def read_hf_folder(folder: Path) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(family, config.json, every *.safetensors tensor) of a Hugging Face model folder."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"no config.json in {folder}")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors files in {folder}")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_path}: invalid JSON: {e}") from None
    family = HF_MODEL_TYPES.get(hf_config.get("model_type", ""))
    if family is None:
        raise ConfigError(
            f"{config_path}: model_type {hf_config.get('model_type')!r} is not one of {', '.join(HF_MODEL_TYPES)}"
        )
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ConfigError(f"{f}: not a readable safetensors file ({e})") from None
    return family, hf_config, tensors


def write_safetensors(state: dict[str, torch.Tensor], out: Path) -> None:
    """One model.safetensors, or shards of at most SHARD_BYTES with the standard index file."""
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t.contiguous(), size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    if step is None:
        found = ckpt.latest_checkpoint(run_dir)
        if found is None:
            raise ConfigError(f"no complete checkpoint under {ckpt.checkpoint_dir(run_dir)}")
        return found
    path = ckpt.checkpoint_dir(run_dir) / f"{ckpt.STEP_PREFIX}{step:08d}"
    if not (path / ".metadata").exists():
        raise ConfigError(f"--step {step}: no complete checkpoint at {path}")
    return path


def tokenizer_folder(data_path: str) -> Path | None:
    """Where the run's tokenizer files live: the shipped ones for builtin data, else the dataset folder."""
    folder = ASSETS if data_path == "builtin" else Path(data_path)
    return folder if (folder / "tokenizer.json").is_file() else None


def special_token_ids(tok: Path) -> dict:
    """bos/eos/pad ids of a tokenizer folder, for config.json (generation stops on eos)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tok / "tokenizer.json"))
    names = json.loads((tok / "tokenizer_config.json").read_text()) if (tok / "tokenizer_config.json").is_file() else {}
    ids = {}
    for kind in ("bos", "eos", "pad"):
        token = names.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and tokenizer.token_to_id(token) is not None:
            ids[f"{kind}_token_id"] = tokenizer.token_to_id(token)
    return ids


def export(run_dir: Path, out: Path, step: int | None = None, dtype: str = "float32") -> Path:
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} has no config.json: is it a PithTrain run folder?")
    cfg = build_config(json.loads(config_path.read_text()), source=str(config_path))
    module = model_module(cfg.family)
    _, model_cls = model_classes(cfg.family)
    hf_config = module.config_to_hf(cfg.model)  # raises for options Hugging Face cannot express
    path = find_checkpoint(run_dir, step)
    model = model_cls(cfg.model)
    ckpt.load_model_weights(path, model)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    hf_state = {k: v.to(torch_dtype) for k, v in module.state_dict_to_hf(model.state_dict(), cfg.model).items()}
    hf_config["torch_dtype"] = dtype
    tok = tokenizer_folder(cfg.data.path)
    if tok is not None:
        hf_config.update(special_token_ids(tok))
    with atomic_dir(out, overwrite=True) as tmp:
        write_safetensors(hf_state, tmp)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if tok is not None and (tok / name).is_file():
                shutil.copy(tok / name, tmp / name)
    print(f"exported {path} -> {out} ({len(hf_state)} tensors, {cfg.family})")
    return out


def import_hf(hf_dir: Path, out: Path) -> Path:
    from torch.distributed.checkpoint import save as dcp_save

    family, hf_config, tensors = read_hf_folder(hf_dir)
    module = model_module(family)
    _, model_cls = model_classes(family)
    model_cfg = module.config_from_hf(hf_config)
    state = module.state_dict_from_hf(tensors, model_cfg)
    model = model_cls(model_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("expert_bias")]
    if missing or unexpected:
        raise ConfigError(f"{hf_dir}: weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with atomic_dir(out, overwrite=True) as tmp:
        dcp_save({"model": model.state_dict()}, checkpoint_id=tmp / "weights")
        (tmp / "model.toml").write_text(model_table_toml(family, model_cfg))
    print(f"imported {hf_dir} -> {out}/weights ({family}); model table in {out}/model.toml")
    return out


def model_table_toml(family: str, model_cfg) -> str:
    """The `[model]` / `[model.router]` TOML tables for a model config dataclass."""
    import dataclasses

    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    flat = dataclasses.asdict(model_cfg)
    router = flat.pop("router")
    lines = ["[model]", f'family = "{family}"'] + [f"{k} = {value(v)}" for k, v in flat.items()]
    lines += ["", "[model.router]"] + [f"{k} = {value(v)}" for k, v in router.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pithtrain.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="PithTrain run -> Hugging Face folder")
    ex.add_argument("--run-dir", required=True, type=Path, help="the run folder (holds config.json, checkpoints/)")
    ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    ex.add_argument("--out", required=True, type=Path, help="output folder (replaced if present)")
    ex.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    im = sub.add_parser("import", help="Hugging Face folder -> PithTrain weights + [model] table")
    im.add_argument("--hf", required=True, type=Path, help="folder with config.json and *.safetensors")
    im.add_argument("--out", required=True, type=Path, help="output folder (replaced if present)")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            export(args.run_dir, args.out, args.step, args.dtype)
        else:
            import_hf(args.hf, args.out)
    except (ConfigError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
