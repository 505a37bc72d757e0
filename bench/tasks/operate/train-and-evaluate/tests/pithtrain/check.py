"""train-and-evaluate verifier for PithTrain: the run, the export and the perplexity, all recomputed.

    python check.py <workspace> <pristine framework root> <reward.json>

Passes when runs/train-eval holds steps 1..30 with finite losses, a DeepSeek-V2-Lite config of the framework
(tiny, or small on a GPU) started from random init on the builtin data, and a complete checkpoint of step
30; when results/eval.json names an export that transformers loads (no remote code) and whose logits on a
few held-out tokens equal those of the pristine framework's model loaded from that checkpoint; and when the
perplexity we compute from the export on the task's windows (val split, windows 0..15 of 128 + 1 tokens)
agrees with the reported one within 2% and is well below the vocabulary size (the model trained). Problems
with the agent's files give reward 0 with a reason; a problem of this script itself exits non-zero.
"""

import json
import math
import sys
from pathlib import Path

STEPS, WINDOWS, LENGTH = 30, 16, 128
CONFIGS = ("tiny-deepseek-v2-lite", "small-deepseek-v2-lite")
PPL_RTOL = 0.02
LOGIT_TOL = 2e-3  # relative to the logits' scale; float32 export and model agree to ~1e-6


class Fail(Exception):
    """A problem with the agent's outputs: reward 0 with this reason."""


def known_config(raw: dict, baseline: Path) -> str | None:
    """Which of the framework's DeepSeek-V2-Lite configs the run's model table is (None: neither)."""
    from pithtrain.config import load_config, to_dict

    for name in CONFIGS:
        if to_dict(load_config(baseline / "configs" / f"{name}.toml"))["model"] == raw.get("model"):
            return name
    return None


def check_run(run: Path, baseline: Path, sub: dict):
    """The run's config (pristine Config) and its step-30 checkpoint."""
    try:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        steps, losses = [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]
        raw = json.loads((run / "config.json").read_text())
        if not isinstance(raw, dict):
            raise ValueError("config.json is not a JSON object")
    except FileNotFoundError as e:
        raise Fail(f"no run: {e.filename} is missing") from None
    except (ValueError, KeyError, TypeError) as e:
        raise Fail(f"run files are malformed ({type(e).__name__}: {e})") from None
    if steps != list(range(1, STEPS + 1)) or not all(map(math.isfinite, losses)):
        raise Fail(f"metrics.jsonl must hold steps 1..{STEPS} with finite losses, has {steps[:5]}...")
    from pithtrain.config import ConfigError, build_config  # imports torch: only now

    raw.pop("source", None)
    try:
        cfg = build_config(raw)  # copies what it reads: raw stays as written
    except ConfigError as e:
        raise Fail(f"config.json is not a valid config ({type(e).__name__}: {e})") from None
    sub["config"] = known_config(raw, baseline)
    if sub["config"] is None or cfg.data.path != "builtin":
        raise Fail("the run is not of the framework's DeepSeek-V2-Lite config on its builtin data")
    if cfg.checkpoint.init_from:
        raise Fail(f"the run started from {cfg.checkpoint.init_from}, not from random initialisation")
    from pithtrain import checkpoint as ckpt

    path = ckpt.checkpoint_dir(run) / f"{ckpt.STEP_PREFIX}{STEPS:08d}"
    if not (path / ".metadata").is_file():
        raise Fail(f"no complete checkpoint of step {STEPS} at {path}")
    sub["logged_last_loss"] = round(losses[-1], 4)
    return cfg, path


def read_report(ws: Path) -> tuple[float, Path]:
    path = ws / "results" / "eval.json"
    try:
        report = json.loads(path.read_text())
        ppl, tokens, export = report["perplexity"], report["num_tokens"], report["export_dir"]
    except FileNotFoundError:
        raise Fail(f"no {path}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise Fail(f"{path.name} is malformed ({type(e).__name__}: {e})") from None
    if isinstance(ppl, bool) or not isinstance(ppl, (int, float)) or not math.isfinite(ppl) or ppl < 1:
        raise Fail(f"{path.name}: perplexity must be a finite number >= 1, got {ppl!r}")
    if tokens != WINDOWS * LENGTH or isinstance(tokens, bool):
        raise Fail(f"{path.name}: num_tokens must be {WINDOWS * LENGTH}, got {tokens!r}")
    folder = Path(export) if Path(str(export)).is_absolute() else ws / str(export)
    if not (folder / "config.json").is_file():
        raise Fail(f"{path.name}: export_dir {export!r} holds no config.json")
    return float(ppl), folder


def check(ws: Path, baseline: Path, sub: dict) -> None:
    cfg, step_ckpt = check_run(ws / "runs" / "train-eval", baseline, sub)
    reported, export = read_report(ws)
    sub["reported_perplexity"] = reported

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from pithtrain import checkpoint as ckpt
    from pithtrain.config import model_classes
    from pithtrain.data import TokenShards, builtin_dataset

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # tiny model: one thread is fastest, and never thrashes a shared CPU
    try:
        hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds for a folder it cannot read
        why = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        raise Fail(f"transformers cannot load {export} ({why})") from None
    hf = hf.to(device).eval()
    shards = TokenShards(builtin_dataset())
    windows = [shards.sample(i, LENGTH, "val") for i in range(WINDOWS)]
    nll = 0.0
    with torch.no_grad():
        for x, y in windows:
            logits = hf(input_ids=x[None].to(device)).logits[0].float()
            nll += F.cross_entropy(logits, y.to(device), reduction="sum").item()
    ppl = math.exp(nll / (WINDOWS * LENGTH))
    sub["perplexity"] = round(ppl, 4)
    sub["vocab_size"] = cfg.model.vocab_size

    _, model_cls = model_classes(cfg.family)
    ours = model_cls(cfg.model)
    try:
        ckpt.load_model_weights(step_ckpt, ours)
    except Exception as e:  # DCP raises many kinds for a checkpoint that does not fit the model
        why = f"{type(e).__name__}: {e}"
        raise Fail(f"checkpoint {step_ckpt.name} does not load into the run's model ({why})") from None
    ours = ours.to(device).eval()
    x = torch.stack([windows[0][0][:32], windows[1][0][:32]]).to(device)
    with torch.no_grad():
        want, got = ours(x).logits.float(), hf(input_ids=x).logits.float()
    err = (want - got).abs().max().item() / (1.0 + want.abs().max().item())
    sub["export_logit_err"] = float(f"{err:.3g}")
    if not err <= LOGIT_TOL:
        raise Fail(f"the export's logits differ from the step-{STEPS} checkpoint's (rel. error {err:.3g})")
    if abs(reported - ppl) > PPL_RTOL * ppl:
        raise Fail(f"reported perplexity {reported:.3f} differs from the export's {ppl:.3f} by over 2%")
    if not ppl < cfg.model.vocab_size / 2:
        raise Fail(f"perplexity {ppl:.1f} is not well below the vocabulary size {cfg.model.vocab_size}")


def main() -> int:
    ws, baseline, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    sys.path.insert(0, str(baseline))  # the pristine framework, ahead of the workspace on PYTHONPATH
    import pithtrain

    if Path(pithtrain.__file__).resolve().parent.parent != baseline.resolve():
        raise ImportError(f"pithtrain was imported from {pithtrain.__file__}, not from {baseline}")
    sub: dict = {}
    try:
        check(ws, baseline, sub)
        reason = ""
    except Fail as e:  # anything else is a bug of this script: exit non-zero
        reason = str(e)
    result = {"reward": 0.0 if reason else 1.0, **sub, "reason": reason}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
