"""collect-routing-trace verifier for Megatron-Core: every step's trace checked, and the routing recomputed.

    python check.py <workspace> <pristine workspace> <reward.json>

runs/trace must hold metrics.jsonl with steps 1..4 and finite losses, and config.json of the tiny or small
configuration (ate_run/*.toml: model, batch size, sequence length, seed). traces/step_000k.npz must hold expert_ids
int32 and gate_weights float32 of shape [MoE layers, sequences of the step, seq_length, top_k]. The routing is then
recomputed by the pristine launch entry: the model as the run's seed initialises it for step 1, loaded from the
checkpoint of step k-1 (checkpoints/iter_{k-1:07d}) for step k, fed step k's batch of the built-in data in the
run's order, through the training forward (Float16Module, bf16). Step 1 and step 4 must be recomputable (the
checkpoint of step 3 must exist); every other step whose preceding checkpoint exists is checked too. Each token's
expert set must match (a token may differ only at a near-tie, at most 2% of them: see MAX_NEAR_TIE_FLIPS) and its
gate weights match within bf16 rounding.
"""

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # operate_lib.py, megatron_probe.py
import megatron_probe as mp  # noqa: E402
from operate_lib import Fail, compare, read_json, read_metrics, read_traces, run_check  # noqa: E402

STEPS = 4
# Megatron-Core's MoE forward is not deterministic on the GPU: the same weights and batch, run twice in one process
# on an H100, routed 0 / 14 / 94 of 8,192 tokens differently in the three MoE layers of the small config (the first
# MoE layer never differs; later ones inherit the float noise of the expert-output combine). So near-tie flips may
# reach 2% of a step's tokens here (0.5% for the deterministic frameworks); a trace off by one step, in another token
# order or of other weights differs in ~99% of them.
MAX_NEAR_TIE_FLIPS = 0.02


def check(ws: Path, baseline: Path, sub: dict) -> None:
    run = ws / "runs" / "trace"
    read_metrics(run, STEPS)
    sub["config"], cfg = mp.run_config(read_json(run / "config.json"), baseline)

    import ate_run.pretrain_gpt as pg
    import numpy as np
    from ate_run import data

    t, m = cfg["train"], cfg["model"]
    accum = t["global_batch_size"] // t["micro_batch_size"]
    shape = (sum(m["moe_layer_freq"]), t["global_batch_size"], t["seq_length"], m["moe_router_topk"])
    sub["trace_shape"] = list(shape)
    got = read_traces(ws / "traces", STEPS, shape, m["num_moe_experts"])
    folder = run / "checkpoints"
    usable = [k for k in range(1, STEPS + 1) if k == 1 or (folder / f"iter_{k - 1:07d}" / "metadata.json").is_file()]
    sub["recomputed_steps"] = usable
    if STEPS not in usable:
        raise Fail(f"no checkpoint of step {STEPS - 1} in {folder}: step {STEPS}'s routing cannot be recomputed")
    dev = mp.device()
    batches = data.batches(t["seq_length"], t["micro_batch_size"], accum, t["seed"])
    with pg.device_mode(dev):
        model, fmodel = mp.forward_model(cfg, dev)  # the seeded initialisation: step 1's weights
        for step in range(1, STEPS + 1):
            micro = list(itertools.islice(batches, accum))
            if step not in usable:
                continue
            if step > 1:
                mp.load_weights(model, folder / f"iter_{step - 1:07d}")
            parts = [mp.routes(fmodel, x, y, dev) for x, y in micro]
            mine = tuple(np.concatenate([p[i] for p in parts], axis=1) for i in range(3))
            stats, reason = compare(mine, got[step], 2e-2, 2e-2, 5e-2, MAX_NEAR_TIE_FLIPS)
            sub[f"step_{step}"] = stats
            if reason:
                raise Fail(f"step {step}: {reason}")
        pg.teardown_world()


if __name__ == "__main__":
    sys.exit(run_check(check, mp.use_baseline))
