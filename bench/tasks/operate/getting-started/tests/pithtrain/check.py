"""getting-started verifier for PithTrain: the smoke run's metrics, and its final checkpoint recomputed.

    python check.py <run_dir> <pristine framework root> <reward.json>

Passes when metrics.jsonl holds steps 1..5 with finite losses, the run folder has config.json and a
complete DCP checkpoint of step 5, and the model rebuilt from config.json with those weights gives a
finite loss on a fixed held-out batch of the builtin data, within a factor of 2 of the logged last
loss. Nothing printed by the agent's run is trusted: the loss is recomputed here. Problems with the
agent's files give reward 0 with a reason; a problem of this script itself exits non-zero.
"""

import json
import math
import sys
import traceback
from pathlib import Path

STEPS = 5
BATCH = 8  # held-out windows in the fixed batch


def check(run: Path, sub: dict) -> str:
    """Fill sub-scores; return the reason for failing ('' when passed)."""
    metrics_path = run / "metrics.jsonl"
    if not metrics_path.is_file():
        return f"no {metrics_path}"
    try:
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        steps = [int(r["step"]) for r in rows]
        losses = [float(r["loss"]) for r in rows]
    except (ValueError, KeyError, TypeError) as e:
        return f"metrics.jsonl is malformed ({type(e).__name__}: {e})"
    sub["metrics_steps"] = len(steps)
    if steps != list(range(1, STEPS + 1)):
        return f"metrics.jsonl has steps {steps[:10]}, expected 1..{STEPS}"
    sub["finite_losses"] = all(math.isfinite(x) for x in losses)
    if not sub["finite_losses"]:
        return f"non-finite logged loss: {losses}"
    sub["logged_last_loss"] = round(losses[-1], 4)

    import torch  # only now: a run without metrics fails in a blink

    from pithtrain import checkpoint as ckpt
    from pithtrain.config import build_config, model_classes
    from pithtrain.data import TokenShards, builtin_dataset

    latest = ckpt.latest_checkpoint(run)
    sub["checkpoint"] = latest.name if latest else None
    if latest is None or latest.name != f"{ckpt.STEP_PREFIX}{STEPS:08d}":
        return f"no complete checkpoint of step {STEPS} in {run / 'checkpoints'} (newest: {sub['checkpoint']})"
    try:
        raw = json.loads((run / "config.json").read_text())
        raw.pop("source", None)
        cfg = build_config(raw)
    except Exception as e:
        return f"config.json does not give a model ({type(e).__name__}: {e})"
    torch.manual_seed(0)
    _, model_cls = model_classes(cfg.family)
    model = model_cls(cfg.model)
    model.init_weights()
    model.eval()
    shards = TokenShards(builtin_dataset())
    x, y = shards.batch(range(BATCH), cfg.train.seq_len, "val")
    with torch.no_grad():
        init_loss = model(x, labels=y, return_logits=False).loss.item()
        try:
            ckpt.load_model_weights(latest, model)
        except Exception as e:
            return f"checkpoint {latest} does not load into the model of config.json ({type(e).__name__}: {e})"
        loss = model(x, labels=y, return_logits=False).loss.item()
    sub["recomputed_loss"] = round(loss, 4) if math.isfinite(loss) else str(loss)
    sub["init_loss"] = round(init_loss, 4)  # a fresh model on the same batch: shows the checkpoint trained
    if not math.isfinite(loss):
        return f"the checkpoint gives a non-finite loss ({loss})"
    ratio = loss / losses[-1] if losses[-1] > 0 else math.inf
    sub["loss_ratio"] = round(ratio, 4)
    if not 0.5 <= ratio <= 2.0:
        return f"recomputed loss {loss:.4f} is not of the order of the logged last loss {losses[-1]:.4f}"
    return ""


def main() -> int:
    run, baseline, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    sys.path.insert(0, baseline)  # the pristine framework, ahead of the workspace on PYTHONPATH
    import pithtrain

    if Path(pithtrain.__file__).resolve().parent.parent != Path(baseline).resolve():
        raise ImportError(f"pithtrain was imported from {pithtrain.__file__}, not from {baseline}")
    sub: dict = {}
    try:
        reason = check(run, sub)
    except ImportError:
        raise
    except Exception as e:  # the agent's files broke something we read: its failure, not ours
        reason = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    result = {"reward": 0.0 if reason else 1.0, **sub, "reason": reason}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
