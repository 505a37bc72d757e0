"""report-heavy-kernels verifier for PithTrain: the CSV's form, and its kernels checked against our profile.

    python check.py <workspace> <pristine framework root> <reward.json>

Passes when results/top_kernels.csv has the header and exactly 3 rows, totals non-increasing, mean = total /
instances, and the named kernels really dominate step 3. The run in runs/profile (steps 1..3 or more, finite
losses, a DeepSeek-V2-Lite config of the framework) says which configuration was profiled; we rebuild it
with the pristine code, train steps 1-2 and profile steps 3 and 4 (forward, backward, optimizer update): on
CPU the aten ops on one thread, as the task asks; on a GPU the CUDA kernels, not the GPU-side copies of
annotated ranges. Timings vary between runs, so they are not compared: each reported kernel must be among
the TOP_ANY heaviest of either of our profiled steps, the reported first among the TOP_FIRST heaviest.
Instance counts do not vary: the step's op sequence is fixed by the model (every expert runs its GEMM even
when it got no tokens), so a kernel's count must equal ours for the forward, backward and optimizer update,
plus at most what the step's data loading and logging add (the task lets those fall inside the window).
Problems with the agent's files give reward 0 with a reason; a problem of this script itself (an exception)
exits non-zero.
"""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # operate_lib.py, beside the task's tests
from operate_lib import check_kernels, read_csv  # noqa: E402

PROFILED_STEP = 3
CONFIGS = ("tiny-deepseek-v2-lite", "small-deepseek-v2-lite")
TOP_ANY, TOP_FIRST = 8, 3


def known_config(raw: dict, baseline: Path) -> str | None:
    """Which of the framework's DeepSeek-V2-Lite configs the run's model table is (None: neither)."""
    from pithtrain.config import load_config, to_dict

    for name in CONFIGS:
        if to_dict(load_config(baseline / "configs" / f"{name}.toml"))["model"] == raw.get("model"):
            return name
    return None


def own_profiles(cfg) -> tuple[list[dict], dict, dict]:
    """Our profiles of steps 3 and 4 ({kernel: (total ms, count)} each), the counts of step 3's forward,
    backward and optimizer update, and the counts its data loading and logging add."""
    from contextlib import nullcontext

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from pithtrain import train
    from pithtrain.data import DataLoader, TokenShards, builtin_dataset
    from pithtrain.parallel.mesh import Parallel

    t = cfg.train
    device = train.resolve_device(cfg)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(1)
    par = Parallel(cfg, device)
    amp = train.autocast_dtype(cfg, device)
    model, _, _ = train.build_model(cfg, par)
    optimizer = train.build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: train.lr_factor(s, cfg.optim, t.steps))
    shards = TokenShards(builtin_dataset())
    loader = DataLoader(shards, t.seq_len, t.micro_batch_size, t.grad_accum, seed=t.seed)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])

    def table(prof) -> dict:
        out = {}
        for e in prof.key_averages():
            if on_gpu and e.device_type == DeviceType.CUDA and not e.is_user_annotation:  # not a range
                out[e.key] = (e.self_device_time_total / 1e3, e.count)
            elif not on_gpu and e.key.startswith("aten::"):
                out[e.key] = (e.self_cpu_time_total / 1e3, e.count)
        return out

    profiles, extra = [], {}
    for step in range(1, PROFILED_STEP + 2):
        watch = step >= PROFILED_STEP
        with profile(activities=acts) if watch else nullcontext() as p_load:
            batches = [loader.next_batch() for _ in range(t.grad_accum)]
        with profile(activities=acts) if watch else nullcontext() as p_step:
            ce, lb, z, load = train.forward_backward(model, batches, par, device, amp)
            norm = train.optimizer_step(model, optimizer, scheduler, par, cfg.optim.grad_clip)
            if on_gpu:
                torch.cuda.synchronize()
        with profile(activities=acts) if watch else nullcontext() as p_log:  # what train.py logs per step
            torch.stack([ce.float(), lb.float(), z.float()]).tolist()
            train.load_stats(load)
            norm.item()
        if watch:
            profiles.append(table(p_step))
        if step == PROFILED_STEP:
            for p in (p_load, p_log):
                for k, (_, n) in table(p).items():
                    extra[k] = extra.get(k, 0) + n
    par.close()
    core = {k: n for k, (_, n) in profiles[0].items()}
    return profiles, core, extra


def check(ws: Path, baseline: Path, sub: dict) -> str:
    run = ws / "runs" / "profile"
    try:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        steps, losses = [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]
        raw = json.loads((run / "config.json").read_text())
        if not isinstance(raw, dict):
            raise ValueError("config.json is not a JSON object")
    except FileNotFoundError as e:
        return f"no profiled run: {e.filename} is missing"
    except (ValueError, KeyError, TypeError) as e:
        return f"run files are malformed ({type(e).__name__}: {e})"
    if steps[:PROFILED_STEP] != list(range(1, PROFILED_STEP + 1)) or steps != list(range(1, len(steps) + 1)) \
            or not all(map(math.isfinite, losses)):
        return f"metrics.jsonl must hold steps 1..{PROFILED_STEP} (or more), finite losses; has {steps[:10]}"

    from pithtrain import train
    from pithtrain.config import ConfigError, build_config

    raw.pop("source", None)
    try:
        cfg = build_config(raw)
    except ConfigError as e:
        return f"config.json is not a valid config ({e})"
    sub["config"] = known_config(raw, baseline)
    if sub["config"] is None or cfg.data.path != "builtin":
        return "the run is not of the framework's DeepSeek-V2-Lite config on its builtin data"
    on_gpu = train.resolve_device(cfg).type == "cuda"
    reported, reason = read_csv(ws / "results" / "top_kernels.csv", on_gpu)
    if reason:
        return reason
    sub["reported"] = [[name[:80], count] for name, _, count in reported]
    profiles, _, extra = own_profiles(cfg)
    return check_kernels(reported, profiles, sub, TOP_ANY, TOP_FIRST, extra)


def main() -> int:
    ws, baseline, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    sys.path.insert(0, str(baseline))  # the pristine framework, ahead of the workspace on PYTHONPATH
    import pithtrain

    if Path(pithtrain.__file__).resolve().parent.parent != baseline.resolve():
        raise ImportError(f"pithtrain was imported from {pithtrain.__file__}, not from {baseline}")
    sub: dict = {}
    reason = check(ws, baseline, sub)  # an exception here is ours: the agent's problems come back as reasons
    result = {"reward": 0.0 if reason else 1.0, **sub, "reason": reason}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
