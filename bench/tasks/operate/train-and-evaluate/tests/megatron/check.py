"""train-and-evaluate verifier for Megatron-Core: the run, the export and the perplexity, all recomputed.

    python check.py <workspace> <pristine workspace> <reward.json>

Passes when runs/train-eval holds metrics.jsonl with steps 1..30 and finite losses, config.json of ate_run's tiny
or small configuration as shipped (model, gpt tables, batch size, sequence length, seed) and a complete
dist_checkpointing checkpoint of step 30 (checkpoints/iter_0000030); when results/eval.json names an export that
transformers loads (no remote code) and whose logits on a few held-out tokens equal those of the pristine
Megatron-Core model loaded from that checkpoint and run in float32; and when the perplexity we compute from the
export on the task's windows (val split, windows 0..15 of 128 + 1 tokens) agrees with the reported one within 2%
and is well below the vocabulary size. Problems with the agent's files give reward 0 with a reason; a problem of
this script itself exits non-zero.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # operate_lib.py, megatron_probe.py
import megatron_probe as mp  # noqa: E402
from operate_lib import (  # noqa: E402
    EVAL_LENGTH,
    EVAL_WINDOWS,
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
    sub["config"], cfg = mp.run_config(read_json(run / "config.json"), baseline)
    reported, export = read_eval_report(ws)
    sub["reported_perplexity"] = reported

    import torch
    from ate_run import data

    dev = mp.device()
    if dev == "cpu":
        torch.set_num_threads(1)
    x, y = data.samples(range(EVAL_WINDOWS), EVAL_LENGTH, "val")
    hf, ppl = hf_perplexity(export, x, y, dev)
    # The checkpoint's (bf16) weights in a float32 model (a [model] key overrides the launch entry's bf16): computed
    # in float32 as the export is.
    fp32 = {"bf16": False, "params_dtype": torch.float32, "pipeline_dtype": torch.float32}
    import ate_run.pretrain_gpt as pg

    model = pg.build_model({**cfg, "model": {**cfg["model"], **fp32}}, dev).to(dev)
    mp.load_weights(model, run / "checkpoints" / f"iter_{STEPS:07d}")
    model.eval()

    def logits(t):
        t = t.to(dev)
        return model(t, torch.arange(t.shape[1], device=dev).expand_as(t), None)

    check_export(sub, hf, logits, x[:2, :32], reported, ppl, cfg["gpt"]["vocab_size"], STEPS)


if __name__ == "__main__":
    sys.exit(run_check(check, mp.use_baseline))
