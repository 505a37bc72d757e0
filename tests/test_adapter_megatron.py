"""Megatron-Core throughput runner on the CPU: both benchmark shapes build through Megatron-Core's local spec with
exactly PithTrain's parameter count, and a tiny model trains a few steps through Megatron's whole training path.
megatron-core is not a project dependency (the runner carries its own wheel to the GPU machine), so these skip
where it is not installed, as in CI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron") is None
                                or importlib.util.find_spec("megatron.core") is None,
                                reason="megatron-core is not installed (pip install megatron-core==0.16.1)")


def run(*args: str, tmp_path: Path) -> dict:
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "framework"), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "adapters.megatron.throughput", *args, "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("shape", ["qwen3", "deepseek"])
def test_dry_run_matches_pithtrain_parameter_count(shape, tmp_path):
    res = run("--shape", shape, "--dry-run", tmp_path=tmp_path)
    assert res["dry_run"] and res["framework"] == "megatron-core"
    assert res["params"] == res["pithtrain_params"] > 2e9
    assert "no Transformer Engine" in res["backend"] and res["notes"]


def test_tiny_deepseek_trains_on_cpu_on_builtin_data(tmp_path):
    """MLA, a dense first layer, shared experts and SequentialMLP through DDP, the DistributedOptimizer, the
    no-pipelining schedule and selective recompute; on the standard run spec's data (PithTrain's builtin corpus in its
    trainer's order) with metrics.jsonl in PithTrain's fields. The loss starts near ln(vocab)."""
    metrics = tmp_path / "metrics.jsonl"
    res = run("--shape", "deepseek", "--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1",
              "--recompute", "selective", "--data", "builtin", "--metrics", str(metrics), tmp_path=tmp_path)
    assert res["params"] == res["pithtrain_params"]
    assert res["skipped_steps"] == 0 and len(res["per_step"]) == 3 and res["tokens_per_s"] > 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert res["data"] == "builtin" and [r["step"] for r in rows] == [1, 2, 3]
    assert {"step", "loss", "grad_norm", "tokens_per_s", "step_time_s"} <= rows[0].keys()
    assert [r["loss"] for r in rows] == [r["loss"] for r in res["per_step"]]
    assert abs(rows[0]["loss"] - 8.32) < 0.3  # ln(4096) = 8.32 at init, real text or not
