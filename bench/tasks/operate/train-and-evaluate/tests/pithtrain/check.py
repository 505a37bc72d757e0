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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # operate_lib.py, beside the task's tests
from operate_lib import (  # noqa: E402
    EVAL_LENGTH,
    EVAL_WINDOWS,
    Fail,
    check_export,
    hf_perplexity,
    read_eval_report,
    read_json,
    read_metrics,
    run_check,
)

STEPS = 30
CONFIGS = ("tiny-deepseek-v2-lite", "small-deepseek-v2-lite")


def known_config(raw: dict, baseline: Path) -> str | None:
    """Which of the framework's DeepSeek-V2-Lite configs the run's model table is (None: neither)."""
    from pithtrain.config import load_config, to_dict

    for name in CONFIGS:
        if to_dict(load_config(baseline / "configs" / f"{name}.toml"))["model"] == raw.get("model"):
            return name
    return None


def check_run(run: Path, baseline: Path, sub: dict):
    """The run's config (pristine Config) and its step-30 checkpoint."""
    losses = read_metrics(run, STEPS)
    raw = read_json(run / "config.json")
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


def check(ws: Path, baseline: Path, sub: dict) -> None:
    cfg, step_ckpt = check_run(ws / "runs" / "train-eval", baseline, sub)
    reported, export = read_eval_report(ws)
    sub["reported_perplexity"] = reported

    import torch

    from pithtrain import checkpoint as ckpt
    from pithtrain.config import model_classes
    from pithtrain.data import TokenShards, builtin_dataset

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # tiny model: one thread is fastest, and never thrashes a shared CPU
    shards = TokenShards(builtin_dataset())
    x, y = map(torch.stack, zip(*(shards.sample(i, EVAL_LENGTH, "val") for i in range(EVAL_WINDOWS))))
    hf, ppl = hf_perplexity(export, x, y, device)

    _, model_cls = model_classes(cfg.family)
    ours = model_cls(cfg.model)
    try:
        ckpt.load_model_weights(step_ckpt, ours)
    except Exception as e:  # DCP raises many kinds for a checkpoint that does not fit the model
        why = f"{type(e).__name__}: {e}"
        raise Fail(f"checkpoint {step_ckpt.name} does not load into the run's model ({why})") from None
    ours = ours.to(device).eval()
    check_export(sub, hf, lambda t: ours(t.to(device)).logits, x[:2, :32], reported, ppl, cfg.model.vocab_size, STEPS)


def use_baseline(baseline: Path) -> None:
    sys.path.insert(0, str(baseline))  # the pristine framework, ahead of the workspace on PYTHONPATH
    import pithtrain

    if Path(pithtrain.__file__).resolve().parent.parent != baseline.resolve():
        raise ImportError(f"pithtrain was imported from {pithtrain.__file__}, not from {baseline}")


if __name__ == "__main__":
    sys.exit(run_check(check, use_baseline))
