"""Contract check of a model file: what train, convert, parallel and the MFU line expect of a model family.

    python skills/add-new-model/check.py --family qwen3_moe          # pithtrain/models/qwen3_moe.py
    python skills/add-new-model/check.py --file draft/my_moe.py --config configs/tiny-my-moe.toml  # a draft

Checks, in order (the first broken one ends the run, since later ones build on it): the module imports; a
config dataclass with validate() that names `model.<key>` in its errors; a model class with init_weights and
forward(input_ids, labels, return_logits) -> CausalLMOutput; flops_per_token and the four HF converters; the
family registered in config.py's if-chain (--family only); then on the tiny config: forward/backward with a
finite loss ~ ln(vocab) at init and a gradient in every parameter, flops_per_token(cfg, 0) == 6 x active
matmul parameters, the state dict and the config round-tripping through the HF layout, and, when transformers
knows the architecture, logits parity (the validate-correctness skill's hf_parity). Last line: PASS or FAIL.
"""

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import math
import os
import sys
import tomllib
from pathlib import Path

SKILLS = Path(__file__).resolve().parents[1]


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


class Broken(Exception):
    """A contract violation; the message says what and where."""


class Report(list):
    """Prints each passed check as it happens (a later crash still shows how far the file got)."""

    def append(self, line: str) -> None:
        print(f"ok   {line}", flush=True)
        super().append(line)


def load_sibling(skill: str):
    """Another skill's check.py as a module (skill folders have dashes, so no plain import)."""
    path = SKILLS / skill / "check.py"
    spec = importlib.util.spec_from_file_location(f"skill_{skill.replace('-', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_model_file(family: str | None, file: Path | None):
    if file is not None:
        spec = importlib.util.spec_from_file_location(f"draft_{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(f"pithtrain.models.{family}")


def own(module, pred) -> list:
    return [obj for _, obj in inspect.getmembers(module, pred)
            if getattr(obj, "__module__", None) == module.__name__]


def find_config_class(module):
    needed = {"vocab_size", "hidden_size", "num_hidden_layers", "router"}
    found = [c for c in own(module, inspect.isclass) if dataclasses.is_dataclass(c) and hasattr(c, "validate")
             and needed <= {f.name for f in dataclasses.fields(c)}]
    if len(found) != 1:
        raise Broken(f"want one config dataclass with validate() and fields {', '.join(sorted(needed))}; "
                     f"found {[c.__name__ for c in found]}")
    return found[0]


def find_model_class(module):
    import torch

    found = []
    for c in own(module, inspect.isclass):
        if issubclass(c, torch.nn.Module) and hasattr(c, "init_weights"):
            params = list(inspect.signature(c.forward).parameters)
            if params[1:4] == ["input_ids", "labels", "return_logits"]:
                found.append(c)
    if len(found) != 1:
        raise Broken("want one nn.Module with init_weights() and forward(self, input_ids, labels, "
                     f"return_logits); found {[c.__name__ for c in found]}")
    return found[0]


def tiny_config_for(family: str) -> Path | None:
    for path in sorted(Path("configs").glob("tiny-*.toml")):
        if tomllib.loads(path.read_text()).get("model", {}).get("family") == family:
            return path
    return None


def model_config(config_cls, path: Path):
    """The [model] table of a run config as the model file's config dataclass (as build_config does)."""
    from pithtrain.config import ConfigError, from_dict

    table = dict(tomllib.loads(path.read_text()).get("model", {}))
    table.pop("family", None)
    try:
        return from_dict(config_cls, table, "model")
    except ConfigError as e:
        raise Broken(f"{path} [model] does not fit {config_cls.__name__}: {e}") from None


def active_matmul_params(model, cfg) -> float:
    """Matrices a token passes through (embedding excluded, routed experts at top_k / num_experts)."""
    share = cfg.router.top_k / cfg.router.num_experts
    total = 0.0
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.dim() >= 2 and name != "embed_tokens.weight":
            total += p.numel() * (share if ".mlp.experts." in name else 1.0)
    return total


def check(args, done) -> None:
    """Run the contract checks, reporting each passed one by done.append; Broken at the first violation."""
    import torch

    from pithtrain.models.blocks import CausalLMOutput

    try:
        module = import_model_file(args.family, args.file)
    except Exception as e:
        raise Broken(f"importing the model file failed: {type(e).__name__}: {e}") from None
    done.append(f"imports {module.__name__}")
    config_cls, model_cls = find_config_class(module), find_model_class(module)
    done.append(f"config {config_cls.__name__}, model {model_cls.__name__}")
    missing = [f for f in ("flops_per_token", "config_from_hf", "config_to_hf", "state_dict_from_hf",
                           "state_dict_to_hf") if not callable(getattr(module, f, None))]
    if missing:
        raise Broken(f"{module.__name__} lacks module-level function(s) {', '.join(missing)}")
    done.append("flops_per_token and the four HF converters exist")
    if args.family:
        from pithtrain.config import ConfigError, model_classes, model_module

        try:
            registered = model_module(args.family), model_classes(args.family)
        except ConfigError as e:
            raise Broken(f"not registered in pithtrain/config.py: {e}") from None
        if registered != (module, (config_cls, model_cls)):
            raise Broken(f"config.py's model_module/model_classes({args.family!r}) return {registered}, "
                         "not this file's module and classes")
        done.append("registered in config.py (model_module, model_classes)")
    path = args.config or tiny_config_for(args.family or "")
    if path is None or not Path(path).is_file():
        raise Broken(f"no tiny config: add configs/tiny-<name>.toml with family = {args.family!r} "
                     "or pass --config")
    cfg = model_config(config_cls, Path(path))
    try:
        cfg.validate()
    except ValueError as e:
        raise Broken(f"validate() rejects the tiny config {path}: {e}") from None
    try:
        dataclasses.replace(cfg, vocab_size=0).validate()
        raise Broken("validate() accepts vocab_size=0")
    except ValueError as e:
        if "model.vocab_size" not in str(e):
            raise Broken(f"validate()'s error should name the key `model.vocab_size`: {e}") from None
    done.append(f"validate() passes {path} and names the key of a bad value")

    torch.manual_seed(0)
    model = model_cls(cfg)
    model.init_weights()
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    out = model(ids, labels=labels, return_logits=True)
    if not isinstance(out, CausalLMOutput):
        raise Broken(f"forward returned {type(out).__name__}, not blocks.CausalLMOutput")
    if out.logits is None or tuple(out.logits.shape) != (2, 32, cfg.vocab_size):
        shape = None if out.logits is None else tuple(out.logits.shape)
        raise Broken(f"logits shape {shape} != (2, 32, vocab)")
    loss, ln_v = out.loss.item(), math.log(cfg.vocab_size)
    if not math.isfinite(loss) or abs(loss - ln_v) > 0.5:
        raise Broken(f"loss at init {loss:.4f} should be finite and ~ ln(vocab) = {ln_v:.4f} "
                     "(init_std too large?)")
    (out.loss + out.aux_loss).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    if no_grad:
        raise Broken(f"no gradient reaches {no_grad[:4]} ({len(no_grad)} parameters)")
    if model(ids, labels=labels, return_logits=False).logits is not None:
        raise Broken("forward(..., return_logits=False) should return logits=None")
    done.append(f"forward/backward: loss {loss:.4f} ~ ln {cfg.vocab_size} = {ln_v:.4f}, "
                "every parameter has a gradient")

    want, got = 6 * active_matmul_params(model, cfg), module.flops_per_token(cfg, 0)
    if not math.isclose(got, want, rel_tol=1e-6):
        raise Broken(f"flops_per_token(cfg, 0) = {got:.6g}, but 6 x active matmul parameters = {want:.6g}")
    if not module.flops_per_token(cfg, 128) > got:
        raise Broken("flops_per_token(cfg, 128) should add the attention-score term to that of seq_len 0")
    done.append("flops_per_token(cfg, 0) == 6 x active matmul parameters, plus attention with seq_len")

    sd = model.state_dict()
    try:
        hf_config = module.config_to_hf(cfg)
    except ValueError as e:
        raise Broken(f"config_to_hf refused the tiny config ({e}); use one HF can express") from None
    back = module.state_dict_from_hf(module.state_dict_to_hf(sd, cfg), cfg)
    if back.keys() != sd.keys() or not all(torch.equal(back[k], sd[k]) for k in sd):
        diff = sorted(set(sd) ^ set(back)) or [k for k in sd if not torch.equal(back[k], sd[k])]
        raise Broken(f"state_dict_to_hf -> state_dict_from_hf does not give the state dict back: {diff[:4]}")
    with torch.device("meta"):
        again = model_cls(module.config_from_hf(hf_config)).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    if {k: tuple(v.shape) for k, v in again.items()} != shapes:
        raise Broken("config_from_hf(config_to_hf(cfg)) builds a model with other parameters or shapes")
    done.append("state dict and config round-trip through the Hugging Face layout")

    parity = load_sibling("validate-correctness")
    try:
        import transformers  # noqa: F401
    except ImportError:
        return done.append("parity skipped: transformers is not installed")
    if not parity.hf_model_type_known(hf_config.get("model_type", "")):
        return done.append(f"parity skipped: transformers has no model_type {hf_config.get('model_type')!r}")
    transformers.utils.logging.disable_progress_bar()
    ok, detail = parity.hf_parity(module, model_cls, cfg, args.tol)
    if not ok:
        raise Broken(f"logits parity with transformers: {detail}")
    done.append(f"parity: {detail}")


def main(argv=None) -> int:
    p = Parser(prog="python skills/add-new-model/check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", help="a module in pithtrain/models (a config's model.family), e.g. qwen3_moe")
    p.add_argument("--file", type=Path, help="a model file outside the package (a draft; not registered yet)")
    p.add_argument("--config", type=Path, help="run config whose [model] table is the tiny model (default: "
                   "the configs/tiny-*.toml of the family)")
    p.add_argument("--tol", type=float, default=1e-5, help="parity tolerance (see validate-correctness)")
    args = p.parse_args(argv)
    if (args.family is None) == (args.file is None):
        p.error("give exactly one of --family NAME and --file PATH")
    if args.file is not None and (not args.file.is_file() or args.config is None):
        p.error("--file needs an existing .py file and --config with its tiny [model] table")
    if args.config is not None and not args.config.is_file():
        p.error(f"config file not found: {args.config}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    done = Report()
    try:
        check(args, done)
    except Broken as e:
        print(f"FAIL: {e}")
        return 1
    except Exception as e:  # the model file crashed: show where, then the verdict
        import traceback

        traceback.print_exc()
        print(f"FAIL: the model file raised {type(e).__name__}: {e} (traceback on stderr; {len(done)} checks "
              "passed before)")
        return 1
    print(f"PASS: {args.family or args.file} meets the model-file contract ({len(done)} checks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
