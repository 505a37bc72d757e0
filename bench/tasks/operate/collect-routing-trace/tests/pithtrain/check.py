"""collect-routing-trace verifier for PithTrain: every step's trace checked, and the routing recomputed.

    python check.py <workspace> <pristine framework root> <reward.json>

The run in runs/trace must hold steps 1..4 with finite losses and a DeepSeek-V2-Lite config of the
framework (tiny, or small on a GPU). traces/step_000k.npz must hold expert_ids int32 and gate_weights
float32 of shape [MoE layers, sequences of the step, seq_len, top_k]. The routing is then recomputed with
the pristine code: step k's batch from the deterministic loader (the run's seed), through the model with
the weights step k's forward saw: the seeded initialisation for step 1, the checkpoint of step k-1 after.
Step 1 and step 4 must be recomputable (so the checkpoint of step 3 must exist); every other step whose
preceding checkpoint exists is checked too. Each token's expert set must match (a token may differ only at
a near-tie of the router's scores, and then at most 0.5% of them) and its gate weights match within float
rounding. Problems with the agent's files give reward 0 with a reason; a problem of this script itself (an
exception) exits non-zero.
"""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # operate_lib.py, beside the task's tests
from operate_lib import Fail, compare, read_trace  # noqa: E402

STEPS = 4
CONFIGS = ("tiny-deepseek-v2-lite", "small-deepseek-v2-lite")


def known_config(raw: dict, baseline: Path) -> str | None:
    """Which of the framework's DeepSeek-V2-Lite configs the run's model table is (None: neither)."""
    from pithtrain.config import load_config, to_dict

    for name in CONFIGS:
        if to_dict(load_config(baseline / "configs" / f"{name}.toml"))["model"] == raw.get("model"):
            return name
    return None


def recomputed(cfg, checkpoints: Path, steps: list[int]):
    """Yield (step, (expert_ids, gate_weights, selection gap) [layers, batch, seq, k]) for the ascending
    `steps`, as the training forward computed them: one model, seeded like the run's, then loaded with the
    checkpoint of step - 1; the loader walks the run's batches in order. The gap (k-th minus (k+1)-th
    selection score of a token) tells near-ties, where float rounding may flip a choice."""
    from contextlib import nullcontext

    import torch
    import torch.nn.functional as F

    from pithtrain import checkpoint as ckpt
    from pithtrain import train
    from pithtrain.data import DataLoader, TokenShards, builtin_dataset
    from pithtrain.models.blocks import Router
    from pithtrain.parallel.mesh import Parallel

    t, r = cfg.train, cfg.model.router
    device = train.resolve_device(cfg)
    amp = train.autocast_dtype(cfg, device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # fast on a shared CPU; the tiny routing is bit-equal on 1 and 2 threads
    par = Parallel(cfg, device)
    model, _, _ = train.build_model(cfg, par)  # seeded init (and compile), as the run built it
    shards = TokenShards(builtin_dataset())
    loader = DataLoader(shards, t.seq_len, t.micro_batch_size, t.grad_accum, seed=t.seed)
    seen = []  # (router, its input, RouterOutput) per MoE forward, in layer order
    for m in model.modules():
        if isinstance(m, Router):
            m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0].detach(), out)))
    for step in range(1, max(steps) + 1):
        batches = [loader.next_batch() for _ in range(t.grad_accum)]
        if step not in steps:
            continue
        if step > 1:
            path = checkpoints / f"{ckpt.STEP_PREFIX}{step - 1:08d}"
            try:
                ckpt.load_model_weights(path, model)
            except Exception as e:  # DCP raises many kinds for a checkpoint that does not fit the model
                why = f"{type(e).__name__}: {e}"
                raise Fail(f"checkpoint {path.name} does not load into the run's model ({why})") from None
        parts = []
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            seen.clear()
            with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                model(x, labels=y, return_logits=False)  # grad enabled, train mode: the training forward
            ids, weights, gaps = [], [], []
            for router, h, route in seen:
                scores = F.linear(h.float(), router.weight.detach().float())
                scores = scores.softmax(-1) if r.score_func == "softmax" else scores.sigmoid()
                scores = scores + router.expert_bias if r.expert_bias else scores
                top = scores.sort(dim=-1, descending=True).values
                last = top[:, r.top_k - 1]
                gap = last - top[:, r.top_k] if r.top_k < r.num_experts else torch.ones_like(last)
                ids.append(route.expert_ids.view(*x.shape, -1))
                weights.append(route.gate_weights.detach().float().view(*x.shape, -1))
                gaps.append(gap.view(*x.shape))
            parts.append([torch.stack(v) for v in (ids, weights, gaps)])
        yield step, tuple(torch.cat([p[i] for p in parts], dim=1).cpu().numpy() for i in range(3))
    par.close()


def check(ws: Path, baseline: Path, sub: dict) -> str:
    run, traces = ws / "runs" / "trace", ws / "traces"
    try:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        steps, losses = [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]
        raw = json.loads((run / "config.json").read_text())
        if not isinstance(raw, dict):
            raise ValueError("config.json is not a JSON object")
    except FileNotFoundError as e:
        return f"no run: {e.filename} is missing"
    except (ValueError, KeyError, TypeError) as e:
        return f"run files are malformed ({type(e).__name__}: {e})"
    if steps != list(range(1, STEPS + 1)) or not all(math.isfinite(v) for v in losses):
        return f"metrics.jsonl must hold steps 1..{STEPS} with finite losses, has steps {steps[:10]}"

    import numpy as np

    from pithtrain import checkpoint as ckpt
    from pithtrain.config import ConfigError, build_config

    raw.pop("source", None)
    try:
        cfg = build_config(raw)
    except ConfigError as e:
        return f"config.json is not a valid config ({e})"
    sub["config"] = known_config(raw, baseline)
    if sub["config"] is None or cfg.data.path != "builtin":
        return "the run is not of the framework's DeepSeek-V2-Lite config on its builtin data"
    t, m = cfg.train, cfg.model
    shape = (m.num_hidden_layers - m.first_k_dense_replace, t.micro_batch_size * t.grad_accum, t.seq_len,
             m.router.top_k)
    sub["trace_shape"] = list(shape)
    files = [traces / f"step_{k:04d}.npz" for k in range(1, STEPS + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        return f"missing trace files in {traces}: {missing}"
    got = {}
    for k, f in enumerate(files, 1):
        try:
            got[k] = read_trace(f, shape)
        except ValueError as e:
            return str(e)
        except Exception as e:  # np.load of a broken file raises many kinds (OSError, BadZipFile, ...)
            return f"{f.name}: unreadable ({type(e).__name__}: {e})"
        ids = got[k][0]
        if ids.min() < 0 or ids.max() >= m.router.num_experts:
            return f"{f.name}: expert_ids outside [0, {m.router.num_experts})"
    if any(np.array_equal(got[k][0], got[k + 1][0]) for k in range(1, STEPS)):
        return "two consecutive steps have identical expert_ids: not per-step traces"

    folder = ckpt.checkpoint_dir(run)
    saved = {k for k in range(1, STEPS) if (folder / f"{ckpt.STEP_PREFIX}{k:08d}" / ".metadata").is_file()}
    usable = [k for k in range(1, STEPS + 1) if k == 1 or k - 1 in saved]
    sub["recomputed_steps"] = usable
    if STEPS not in usable:
        return f"no checkpoint of step {STEPS - 1} in {folder}: step {STEPS}'s routing cannot be recomputed"
    from pithtrain import train

    bf16 = train.autocast_dtype(cfg, train.resolve_device(cfg)) is not None  # the run's own precision
    tie_gap, atol, rtol = (2e-2, 2e-2, 5e-2) if bf16 else (1e-5, 1e-5, 1e-4)
    for k, mine in recomputed(cfg, folder, usable):
        stats, reason = compare(mine, got[k], tie_gap, atol, rtol)
        sub[f"step_{k}"] = stats
        if reason:
            return f"step {k}: {reason}"
    return ""


def main() -> int:
    ws, baseline, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    sys.path.insert(0, str(baseline))  # the pristine framework, ahead of the workspace on PYTHONPATH
    import pithtrain

    if Path(pithtrain.__file__).resolve().parent.parent != baseline.resolve():
        raise ImportError(f"pithtrain was imported from {pithtrain.__file__}, not from {baseline}")
    sub: dict = {}
    try:
        reason = check(ws, baseline, sub)
    except Fail as e:  # anything else is a bug of this script: exit non-zero
        reason = str(e)
    result = {"reward": 0.0 if reason else 1.0, **sub, "reason": reason}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
