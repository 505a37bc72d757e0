"""report-heavy-kernels verifier for TorchTitan: the CSV's form, and its kernels checked against our profile.

    python check.py <workspace> <pristine workspace> <reward.json>

Passes when results/top_kernels.csv has the header and exactly 3 rows, totals non-increasing, mean = total /
instances, and the named CUDA kernels really dominate step 3. runs/profile (metrics.jsonl with steps 1..3 or more,
finite losses; config.json of the tiny or small configuration) says what was trained; we train it again with the
pristine TorchTitan Trainer, with the run's precision, compile and activation-checkpointing settings, and profile
the train_step of steps 3 and 4 (data loading, forward, backward, clipping, optimizer and LR step, logging).
Timings vary between runs, so each reported kernel must be among the TOP_ANY heaviest of either profiled step, the
first among the TOP_FIRST heaviest; instance counts do not vary, so each must equal ours for step 3.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # operate_lib.py, torchtitan_probe.py
import torchtitan_probe as tt  # noqa: E402
from operate_lib import Fail, check_kernels, read_csv, read_json, read_metrics, run_check  # noqa: E402

PROFILED_STEP, TOP_ANY, TOP_FIRST = 3, 8, 3
# The run's settings that change which kernels a step runs (the shipped config fixes the model and the data).
SETTINGS = {"training": ("dtype", "mixed_precision_param"), "compile": ("enable",),
            "activation_checkpoint": ("mode",)}


def overrides(raw: dict) -> list[str]:
    args = []
    for table, keys in SETTINGS.items():
        for key in keys:
            value = (raw.get(table) or {}).get(key)
            if isinstance(value, bool):
                args.append(f"--{table}.{key}" if value else f"--{table}.no-{key}")
            elif value is not None:
                args += [f"--{table}.{key}", str(value)]
    components = (raw.get("compile") or {}).get("components")
    if (raw.get("compile") or {}).get("enable") and components:
        args += ["--compile.components", ",".join(components)]
    return args


def check(ws: Path, baseline: Path, sub: dict) -> None:
    run = ws / "runs" / "profile"
    read_metrics(run, PROFILED_STEP, more=True)
    raw = read_json(run / "config.json")
    sub["config"] = flavor = tt.run_flavor(raw, baseline)
    reported, reason = read_csv(ws / "results" / "top_kernels.csv", on_gpu=True)
    if reason:
        raise Fail(reason)
    sub["reported"] = [[name[:80], count] for name, _, count in reported]
    profiles = tt.profile_steps(baseline, flavor, overrides(raw), (PROFILED_STEP, PROFILED_STEP + 1))
    reason = check_kernels(reported, profiles, sub, TOP_ANY, TOP_FIRST)
    if reason:
        raise Fail(reason)


if __name__ == "__main__":
    sys.exit(run_check(check, tt.use_baseline))
