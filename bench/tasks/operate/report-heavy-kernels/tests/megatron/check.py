"""report-heavy-kernels verifier for Megatron-Core: the CSV's form, and its kernels checked against our profile.

    python check.py <workspace> <pristine workspace> <reward.json>

Passes when results/top_kernels.csv has the header and exactly 3 rows, totals non-increasing, mean = total /
instances, and the named CUDA kernels really dominate step 3. runs/profile (metrics.jsonl with steps 1..3 or more,
finite losses; config.json of the tiny or small configuration) says what was trained; we train it again with the
pristine launch entry's parts and profile the train_step of steps 3 and 4 (forward, backward, optimizer step and
LR step; the step's data are on the host, so data loading adds no kernels). Timings vary between runs, so each
reported kernel must be among the TOP_ANY heaviest of either profiled step, the first among the TOP_FIRST heaviest;
instance counts do not vary, so each must equal ours for step 3.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # operate_lib.py, megatron_probe.py
import megatron_probe as mp  # noqa: E402
from operate_lib import Fail, check_kernels, read_csv, read_json, read_metrics, run_check  # noqa: E402

PROFILED_STEP, TOP_ANY, TOP_FIRST = 3, 8, 3


def check(ws: Path, baseline: Path, sub: dict) -> None:
    run = ws / "runs" / "profile"
    read_metrics(run, PROFILED_STEP, more=True)
    sub["config"], cfg = mp.run_config(read_json(run / "config.json"), baseline)
    reported, reason = read_csv(ws / "results" / "top_kernels.csv", on_gpu=True)
    if reason:
        raise Fail(reason)
    sub["reported"] = [[name[:80], count] for name, _, count in reported]
    profiles = mp.profile_steps(cfg, (PROFILED_STEP, PROFILED_STEP + 1))
    reason = check_kernels(reported, profiles, sub, TOP_ANY, TOP_FIRST)
    if reason:
        raise Fail(reason)


if __name__ == "__main__":
    sys.exit(run_check(check, mp.use_baseline))
