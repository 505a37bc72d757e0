"""getting-started verifier for Megatron-Core: the smoke run's metrics, and its final checkpoint recomputed.

    python check.py <workspace> <pristine workspace> <reward.json>

Passes when runs/smoke holds metrics.jsonl with steps 1..5 and finite losses, config.json of the tiny configuration
(ate_run/tiny.toml: model, batch size, sequence length, seed) and a complete dist_checkpointing checkpoint of step 5
(checkpoints/iter_0000005); the tiny model built by the pristine launch entry, loaded with that checkpoint, must give
a finite loss on a fixed held-out batch of the built-in data, within a factor of 2 of the logged last loss.
Problems with the agent's files give reward 0 with a reason; a problem of this script itself exits non-zero.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # operate_lib.py, megatron_probe.py
import megatron_probe as mp  # noqa: E402
from operate_lib import check_recomputed_loss, read_json, read_metrics, run_check  # noqa: E402

STEPS, BATCH = 5, 8


def check(ws: Path, baseline: Path, sub: dict) -> None:
    run = ws / "runs" / "smoke"
    losses = read_metrics(run, STEPS)
    sub["logged_last_loss"] = round(losses[-1], 4)
    _, cfg = mp.run_config(read_json(run / "config.json"), baseline, ("tiny",))

    import ate_run.pretrain_gpt as pg
    from ate_run import data

    dev = mp.device()
    with pg.device_mode(dev):
        model, fmodel = mp.forward_model(cfg, dev)
        x, y = data.samples(range(BATCH), cfg["train"]["seq_length"], "val")
        init_loss = mp.loss(fmodel, x, y, dev)
        mp.load_weights(model, run / "checkpoints" / f"iter_{STEPS:07d}")
        loss = mp.loss(fmodel, x, y, dev)
        pg.teardown_world()
    check_recomputed_loss(sub, losses[-1], init_loss, loss)


if __name__ == "__main__":
    sys.exit(run_check(check, mp.use_baseline))
