"""TorchTitan and Megatron-Core as operate-task frameworks, on CPU: each workspace's ate_run/ (TorchTitan's flavors
equal to PithTrain's shapes; Megatron's configs are checked in test_megatron_launch.py), and the oracles of
getting-started, collect-routing-trace and train-and-evaluate run unchanged, then scored by the hidden verifiers; a
wrong trace, a wrong export and a missing run score 0. Neither framework trains on CPU as shipped: TorchTitan's runs go through
tests/torchtitan_cpu.py, Megatron's launch entry has its own CPU emulation (--device cpu). On the GPU the same
oracles and verifiers run through bench.run (bench/results/suite-gpu-h100-*). report-heavy-kernels reports CUDA
kernels, so only its failure path runs here. Skipped where a framework is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from baseline_tasks import FRAMEWORKS, REPO, workspace
from baseline_tasks import solve as solve_task
from baseline_tasks import verify as verify_task


@pytest.fixture(params=FRAMEWORKS)
def ws(request, tmp_path_factory, tmp_path) -> tuple[str, Path]:
    """(framework, a fresh copy of its workspace)."""
    return request.param, workspace(request.param, tmp_path_factory, tmp_path / "workspace")


def solve(task: str, fw: str, ws: Path, tmp: Path) -> None:
    solve_task(f"operate/{task}", fw, ws, tmp)


def verify(task: str, fw: str, ws: Path, tmp: Path) -> dict:
    return verify_task(f"operate/{task}", fw, ws, tmp)


@pytest.mark.skipif(importlib.util.find_spec("torchtitan") is None, reason="torchtitan is not installed")
def test_torchtitan_flavors_are_pithtrains_shapes():
    """ate_run's literal flavors equal what the throughput runner maps from PithTrain's configs."""
    from adapters.torchtitan.ate_run import deepseek_v2_lite as spec
    from adapters.torchtitan.throughput import build_model_args, load_pithtrain_config

    for flavor, seq in (("tiny", 128), ("small", 4096)):
        cfg = load_pithtrain_config("deepseek", str(REPO / "framework" / "configs" / f"{flavor}-deepseek-v2-lite.toml"))
        mapped, _ = build_model_args(cfg["model"], seq)
        assert dataclasses.asdict(spec.FLAVORS[flavor]) == dataclasses.asdict(mapped), flavor


def test_getting_started_oracle_passes(ws, tmp_path):
    fw, ws = ws
    solve("getting-started", fw, ws, tmp_path)
    rows = [json.loads(x) for x in (ws / "runs" / "smoke" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    result = verify("getting-started", fw, ws, tmp_path)
    assert result["reward"] == 1.0, result
    assert result["recomputed_loss"] < result["init_loss"]  # the checkpoint holds trained weights


def test_collect_routing_trace_oracle_passes_and_a_wrong_trace_fails(ws, tmp_path):
    fw, ws = ws
    solve("collect-routing-trace", fw, ws, tmp_path)
    result = verify("collect-routing-trace", fw, ws, tmp_path)
    assert result["reward"] == 1.0, result
    assert result["step_4"]["mismatched"] == 0 and result["trace_shape"] == [2, 8, 128, 2]
    path = ws / "traces" / "step_0004.npz"
    arrays = dict(np.load(path))
    arrays["expert_ids"] = (arrays["expert_ids"] + 1) % 8  # every token to other experts
    np.savez(path, **arrays)
    result = verify("collect-routing-trace", fw, ws, tmp_path)
    assert result["reward"] == 0.0 and "routed to other experts" in result["reason"], result


def test_train_and_evaluate_oracle_passes_and_a_wrong_export_fails(ws, tmp_path):
    """TorchTitan's own exporter (checkpoint.last_save_in_hf) and our Megatron converter give exports whose logits
    are the checkpoint's. An export whose config.json is off (another RoPE base, which moves the tiny model's logits
    by only 2e-4) is caught by those logits; checked on Megatron, where the agent writes the converter."""
    fw, ws = ws
    solve("train-and-evaluate", fw, ws, tmp_path)
    result = verify("train-and-evaluate", fw, ws, tmp_path)
    assert result["reward"] == 1.0, result
    assert result["export_logit_err"] < 1e-5 and result["perplexity"] < 2048, result
    if fw != "megatron":
        return
    config = ws / "export" / "hf" / "config.json"
    config.write_text(config.read_text().replace('"rope_theta": 10000.0', '"rope_theta": 20000.0'))
    result = verify("train-and-evaluate", fw, ws, tmp_path)
    assert result["reward"] == 0.0 and "logits differ" in result["reason"], result


def test_report_heavy_kernels_without_a_run_fails(ws, tmp_path):  # the null agent's outcome
    fw, ws = ws
    result = verify("report-heavy-kernels", fw, ws, tmp_path)
    assert result["reward"] == 0.0 and "metrics.jsonl is missing" in result["reason"], result
