"""train-and-evaluate verifier for TorchTitan: the run, the export and the perplexity, all recomputed.

    python check.py <workspace> <pristine workspace> <reward.json>

Passes when runs/train-eval holds metrics.jsonl with steps 1..30 and finite losses, config.json of the
deepseek_v2_lite tiny or small configuration as shipped (ate_run/<flavor>.toml: flavor, batch size, sequence length,
seed), not started from a checkpoint, and a complete checkpoint of step 30 (DCP, or the Hugging Face safetensors of
checkpoint.last_save_in_hf); when results/eval.json names an export that transformers loads (no remote code) and
whose logits on a few held-out tokens equal those of the pristine TorchTitan model loaded from that checkpoint; and
when the perplexity we compute from the export on the task's windows (val split, windows 0..15 of 128 + 1 tokens)
agrees with the reported one within 2% and is well below the vocabulary size. Problems with the agent's files give
reward 0 with a reason; a problem of this script itself exits non-zero.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # operate_lib.py, torchtitan_probe.py
import torchtitan_probe as tt  # noqa: E402
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


def check(ws: Path, baseline: Path, sub: dict) -> None:
    run = ws / "runs" / "train-eval"
    losses = read_metrics(run, STEPS)
    sub["logged_last_loss"] = round(losses[-1], 4)
    raw = read_json(run / "config.json")
    sub["config"] = flavor = tt.run_flavor(raw, baseline)
    ckpt = raw.get("checkpoint") or {}
    if ckpt.get("initial_load_path"):
        raise Fail(f"the run started from {ckpt['initial_load_path']}, not from random initialisation")
    reported, export = read_eval_report(ws)
    sub["reported_perplexity"] = reported

    import torch
    from ate_run import data

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)
    x, y = data.samples(range(EVAL_WINDOWS), EVAL_LENGTH, "val")
    hf, ppl = hf_perplexity(export, x, y, device)
    model, args = tt.build_model(tt.job_config(baseline, flavor), device)
    tt.load_weights(model, run / str(ckpt.get("folder", "checkpoint")) / f"step-{STEPS}", args)
    model.eval()
    check_export(sub, hf, lambda t: model(t.to(device)), x[:2, :32], reported, ppl, args.vocab_size, STEPS)


if __name__ == "__main__":
    sys.exit(run_check(check, tt.use_baseline))
