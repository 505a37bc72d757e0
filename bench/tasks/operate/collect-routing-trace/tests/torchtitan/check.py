"""collect-routing-trace verifier for TorchTitan: every step's trace checked, and the routing recomputed.

    python check.py <workspace> <pristine workspace> <reward.json>

runs/trace must hold metrics.jsonl with steps 1..4 and finite losses, and config.json of the tiny or small
configuration (ate_run/*.toml: flavor, batch size, sequence length, seed). traces/step_000k.npz must hold
expert_ids int32 and gate_weights float32 of shape [MoE layers, sequences of the step, seq_len, top_k]. The routing
is then recomputed by the pristine TorchTitan: the model loaded from the checkpoint of step k-1 (TorchTitan's DCP
folder step-{k-1}), fed step k's batch of the built-in data in the run's order, under the training forward's
autocast. Step 4 must be recomputable (the checkpoint of step 3 must exist); every other step whose preceding
checkpoint exists is checked too (step 1 has none: TorchTitan saves no step 0 unless asked for a seed checkpoint).
Each token's expert set must match (a token may differ only at a near-tie, at most 0.5% of them) and its gate
weights match within rounding.
"""

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # operate_lib.py, torchtitan_probe.py
import torchtitan_probe as tt  # noqa: E402
from operate_lib import Fail, compare, read_json, read_metrics, read_traces, run_check  # noqa: E402

STEPS = 4


def check(ws: Path, baseline: Path, sub: dict) -> None:
    run = ws / "runs" / "trace"
    read_metrics(run, STEPS)
    raw = read_json(run / "config.json")
    sub["config"] = flavor = tt.run_flavor(raw, baseline)

    import numpy as np
    import torch
    from ate_run import data

    config = tt.job_config(baseline, flavor)
    t = config.training
    accum = max(1, t.global_batch_size // t.local_batch_size)
    model, args = tt.build_model(config, "cuda" if torch.cuda.is_available() else "cpu")
    shape = (args.n_layers - args.n_dense_layers, t.local_batch_size * accum, t.seq_len, args.moe_args.top_k)
    sub["trace_shape"] = list(shape)
    got = read_traces(ws / "traces", STEPS, shape, args.moe_args.num_experts)

    folder = run / str((raw.get("checkpoint") or {}).get("folder", "checkpoint"))
    usable = [k for k in range(2, STEPS + 1) if (folder / f"step-{k - 1}" / ".metadata").is_file()]
    sub["recomputed_steps"] = usable
    if STEPS not in usable:
        raise Fail(f"no checkpoint of step {STEPS - 1} in {folder}: step {STEPS}'s routing cannot be recomputed")
    device = next(model.parameters()).device.type
    bf16 = tt.autocast(config, device) is not None
    tie_gap, atol, rtol = (2e-2, 2e-2, 5e-2) if bf16 else (1e-5, 1e-5, 1e-4)
    batches = data.batches(t.seq_len, t.local_batch_size, accum, config.debug.seed or 0)
    for step in range(1, STEPS + 1):
        micro = list(itertools.islice(batches, accum))
        if step not in usable:
            continue
        tt.load_weights(model, folder / f"step-{step - 1}")
        parts = [tt.routes(model, config, x, device) for x, _ in micro]
        mine = tuple(np.concatenate([p[i] for p in parts], axis=1) for i in range(3))
        stats, reason = compare(mine, got[step], tie_gap, atol, rtol)
        sub[f"step_{step}"] = stats
        if reason:
            raise Fail(f"step {step}: {reason}")


if __name__ == "__main__":
    sys.exit(run_check(check, tt.use_baseline))
