"""Correctness checks: PithTrain logits against `transformers`, and one run's losses against another's.

    python skills/validate-correctness/check.py                          # both tiny configs vs HF
    python skills/validate-correctness/check.py --config configs/tiny-qwen3-moe.toml --set train.seq_len=64
    python skills/validate-correctness/check.py --reference-run runs/a --candidate-run runs/b

The last stdout line is `PASS: ...` (exit 0) or `FAIL: ...` (exit 1); bad arguments exit 2 with one line.
`hf_parity` and `compare_runs` are imported by the add-new-model skill.
"""

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_CONFIGS = ("configs/tiny-qwen3-moe.toml", "configs/tiny-deepseek-v2-lite.toml")


class BadArgs(Exception):
    """Exit 2: the user asked for something impossible (the message is the one-line error)."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def randomize(model, seed: int) -> None:
    """Weights that make parity mean something: O(1) logits, norms away from 1 (a swapped norm shows), and
    router scores far apart (implementations rounding differently must still pick the same experts)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1:
                p.copy_(1 + 0.25 * noise)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * noise)
            else:
                fan_in = p.shape[-2] if ".experts.w_" in name else p.shape[-1]  # grouped [E, in, out]
                p.copy_(noise / math.sqrt(fan_in))


def hf_model_type_known(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def hf_parity(module, model_cls, model_cfg, tol: float = 1e-5, seed: int = 0, perturb: float = 0.0,
              batch: int = 2, seq: int = 16) -> tuple[bool, str]:
    """Export a randomised PithTrain model with the model file's config_to_hf / state_dict_to_hf, load the
    folder with transformers (as `pithtrain.convert export` output is loaded), compare logits on random
    tokens:
    max |diff| <= tol * max(1, max |logit|), since fp32 rounding grows with the logits.
    `perturb` adds to one PithTrain weight after export: a self-check that the comparison has teeth."""
    import torch
    from transformers import AutoModelForCausalLM

    from pithtrain.convert import write_safetensors

    try:
        hf_config = module.config_to_hf(model_cfg)
    except ValueError as e:
        return False, f"config_to_hf refused the config ({e}); parity needs a config transformers can express"
    if not hf_model_type_known(hf_config.get("model_type", "")):
        version = __import__("transformers").__version__
        return False, f"transformers {version} has no model_type {hf_config['model_type']!r}"
    torch.manual_seed(seed)
    ours = model_cls(model_cfg)
    ours.init_weights()
    randomize(ours, seed)
    ours.eval()
    with tempfile.TemporaryDirectory() as tmp:
        write_safetensors(module.state_dict_to_hf(ours.state_dict(), model_cfg), Path(tmp))
        (Path(tmp) / "config.json").write_text(json.dumps(hf_config))
        hf, info = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager",
                                                        output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        return False, "transformers did not load the export cleanly: " + "; ".join(
            f"{k} {sorted(map(str, v))[:3]}" for k, v in bad.items())
    if perturb:
        with torch.no_grad():
            next(p for n, p in ours.named_parameters() if "layers.0." in n and p.dim() == 2).add_(perturb)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, model_cfg.vocab_size, (batch, seq), generator=gen)
    with torch.no_grad():
        expected, got = hf.eval()(ids).logits.float(), ours(ids).logits.float()
    diff = (expected - got).abs()
    worst = diff.max().item()
    scale = expected.abs().max().item()
    where = tuple(int(i) for i in divmod(int(diff.amax(-1).argmax()), seq))  # (row, position)
    limit = tol * max(1.0, scale)
    detail = (f"{type(hf).__name__}: max |logit diff| {worst:.2e} (limit {limit:.1e}), "
              f"max |logit| {scale:.2f}, worst at (batch, pos) {where}")
    if not math.isfinite(worst) or worst > limit:
        return False, detail
    if scale < 0.5:
        return False, detail + ": logits too small for the comparison to mean anything"
    return True, detail


def read_metrics(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise BadArgs(f"no metrics.jsonl in {run_dir} (is it a PithTrain run folder?)")
    rows = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise BadArgs(f"{path}:{n} is not JSON") from None
            rows[row["step"]] = row
    return rows


def compare_runs(reference: Path, candidate: Path, keys: list[str], rtol: float, atol: float,
                 steps: int | None = None) -> tuple[bool, str]:
    """Step-by-step comparison of metrics.jsonl values; the first step past tolerance is the finding."""
    ref, cand = read_metrics(reference), read_metrics(candidate)
    wanted = sorted(ref)[:steps] if steps else sorted(ref)
    if not wanted:
        return False, f"{reference} has no steps"
    missing = [s for s in wanted if s not in cand]
    if missing:
        return False, f"candidate lacks steps {missing[:5]} that the reference has ({len(missing)} in all)"
    print(f"{'step':>6} " + " ".join(f"{k + ' ref':>14} {k + ' cand':>14} {'rel diff':>9}" for k in keys))
    worst, first_bad = 0.0, None
    for s in wanted:
        cells = []
        for k in keys:
            a, b = ref[s].get(k), cand[s].get(k)
            if a is None or b is None:
                return False, f"step {s}: key {k!r} missing in {'reference' if a is None else 'candidate'}"
            rel = abs(a - b) / max(abs(a), 1e-12)
            ok = math.isfinite(b) and abs(a - b) <= atol + rtol * abs(a)
            worst = max(worst, rel)
            if not ok and first_bad is None:
                first_bad = (s, k, a, b, rel)
            cells.append(f"{a:>14.7g} {b:>14.7g} {rel:>9.1e}{'' if ok else ' <-'}")
        print(f"{s:>6} " + " ".join(cells))
    if first_bad:
        s, k, a, b, rel = first_bad
        return False, f"runs diverge at step {s}: {k} {a:.7g} vs {b:.7g} (rel diff {rel:.1e} > {rtol:.0e})"
    return True, f"{len(wanted)} steps of {', '.join(keys)} agree (max rel diff {worst:.1e}, rtol {rtol:.0e})"


def main(argv=None) -> int:
    p = Parser(prog="python skills/validate-correctness/check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append",
                   help=f"config(s) for the HF parity check (default: {', '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every --config (repeatable)")
    p.add_argument("--tol", type=float, default=1e-5,
                   help="parity limit: max |logit diff| <= tol * max(1, max |logit|) (default 1e-5, fp32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perturb", type=float, default=0.0,
                   help="self-check: add this to one PithTrain weight after export; parity must then FAIL")
    p.add_argument("--reference-run", type=Path, help="run folder whose metrics.jsonl is the reference")
    p.add_argument("--candidate-run", type=Path, help="run folder to compare against --reference-run")
    p.add_argument("--keys", default="loss", help="metrics to compare, comma-separated (default: loss)")
    p.add_argument("--rtol", type=float, default=1e-5,
                   help="relative tolerance per step (default 1e-5: CPU fp32 runs repeat; try 2e-2 for bf16)")
    p.add_argument("--run-atol", type=float, default=0.0, help="absolute tolerance per step (default 0)")
    p.add_argument("--steps", type=int, help="compare only the first N reference steps")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if (args.reference_run is None) != (args.candidate_run is None):
        p.error("--reference-run and --candidate-run go together")
    results = []

    def report(name, ok, detail):
        results.append((name, ok, detail))
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)

    try:
        if args.reference_run is not None:
            print(f"== runs: {args.reference_run} (reference) vs {args.candidate_run} (candidate)")
            report("runs", *compare_runs(args.reference_run, args.candidate_run,
                                         [k.strip() for k in args.keys.split(",") if k.strip()],
                                         args.rtol, args.run_atol, args.steps))
        if args.reference_run is None or args.config:
            parity_of_configs(args.config or list(DEFAULT_CONFIGS), args, report)
    except BadArgs as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = [(name, detail) for name, ok, detail in results if not ok]
    if bad:
        more = f" (and {len(bad) - 1} more of {len(results)} checks)" if len(bad) > 1 else ""
        print(f"FAIL: {bad[0][0]}: {bad[0][1]}{more}")
        return 1
    print(f"PASS: {len(results)} checks ({', '.join(name for name, _, _ in results)})")
    return 0


def parity_of_configs(configs: list[str], args, report) -> None:
    from pithtrain.config import ConfigError, load_config, model_classes, model_module

    try:
        import transformers
    except ImportError:
        return report("transformers", False, "not installed: pip install 'transformers>=5' (parity needs it)")
    transformers.utils.logging.disable_progress_bar()
    for path in configs:
        try:
            cfg = load_config(path, args.overrides)
        except ConfigError as e:
            raise BadArgs(str(e)) from None
        print(f"== parity: {path} ({cfg.family})", flush=True)
        _, model_cls = model_classes(cfg.family)
        report(f"parity {Path(path).stem}",
               *hf_parity(model_module(cfg.family), model_cls, cfg.model, args.tol, args.seed, args.perturb))


if __name__ == "__main__":
    sys.exit(main())
