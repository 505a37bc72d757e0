"""getting-started verifier for TorchTitan: the smoke run's metrics, and its final checkpoint recomputed.

    python check.py <workspace> <pristine workspace> <reward.json>

Passes when runs/smoke holds metrics.jsonl with steps 1..5 and finite losses, and config.json of the tiny
configuration (ate_run/tiny.toml: flavor, batch size, sequence length, seed), and a complete DCP checkpoint of step
5 in its checkpoint folder; the tiny model built by the pristine TorchTitan, loaded with that checkpoint, must give
a finite loss on a fixed held-out batch of the built-in data, within a factor of 2 of the logged last loss.
Problems with the agent's files give reward 0 with a reason; a problem of this script itself exits non-zero.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # operate_lib.py, torchtitan_probe.py
import torchtitan_probe as tt  # noqa: E402
from operate_lib import check_recomputed_loss, read_json, read_metrics, run_check  # noqa: E402

STEPS, BATCH = 5, 8


def check(ws: Path, baseline: Path, sub: dict) -> None:
    run = ws / "runs" / "smoke"
    losses = read_metrics(run, STEPS)
    sub["logged_last_loss"] = round(losses[-1], 4)
    raw = read_json(run / "config.json")
    flavor = tt.run_flavor(raw, baseline, ("tiny",))

    import torch
    import torch.nn.functional as F
    from ate_run import data

    config = tt.job_config(baseline, flavor)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = tt.build_model(config, device)
    model.eval()
    x, y = (t.to(device) for t in data.samples(range(BATCH), config.training.seq_len, "val"))
    loss_of = lambda: F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).item()  # noqa: E731
    with torch.no_grad():
        init_loss = loss_of()
        folder = run / str((raw.get("checkpoint") or {}).get("folder", "checkpoint"))
        tt.load_weights(model, folder / f"step-{STEPS}")
        check_recomputed_loss(sub, losses[-1], init_loss, loss_of())


if __name__ == "__main__":
    sys.exit(run_check(check, tt.use_baseline))
