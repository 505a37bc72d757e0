"""feature/dynmoe on TorchTitan and Megatron-Core, on CPU: each oracle (solution/<framework>/) scores 1 through the
hidden verifier (the shared tests/test_dynmoe.py through tests/<framework>/probe.py), and a change without the
feature scores 0 in its property tests. TorchTitan's training run goes through tests/torchtitan_cpu.py (the probe
runs it under $ATE_TRAIN_PYTHON), Megatron's through its launch entry's CPU emulation. Skipped where a framework is
not installed. On the GPU the same oracles and verifiers run through bench.run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import adapters
from bench.harness.verifier import VERIFY_LIB

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "bench" / "tasks" / "feature" / "dynmoe"
INSTALLED = {"torchtitan": ("torchtitan", "datasets"), "megatron": ("megatron.core",)}
FRAMEWORKS = [pytest.param(fw, marks=pytest.mark.skipif(
    not all(importlib.util.find_spec(m.split(".")[0]) for m in mods), reason=f"{fw} is not installed"))
    for fw, mods in INSTALLED.items()]  # fmt: skip
ROUTER_FILE = {
    "torchtitan": "torchtitan/models/moe/moe.py",
    "megatron": "megatron/core/transformer/moe/router.py",
}
_templates: dict[str, Path] = {}


@pytest.fixture(params=FRAMEWORKS)
def ws(request, tmp_path_factory, tmp_path) -> tuple[str, Path]:
    """(framework, a fresh copy of its workspace); the workspace is built once per framework."""
    fw = request.param
    if fw not in _templates:
        _templates[fw] = adapters.get(fw).build(fw, tmp_path_factory.mktemp(fw) / "workspace")
    shutil.copytree(_templates[fw], tmp_path / "workspace", symlinks=True)
    return fw, tmp_path / "workspace"


def verify(fw: str, ws: Path, tmp: Path) -> dict:
    """The task's hidden test.sh, staged as the harness stages it (verify_lib beside the tests), on CPU."""
    stage = tmp / "verify"
    shutil.copytree(TASK / "tests", stage / "tests")
    for f in VERIFY_LIB.glob("*.py"):
        shutil.copy2(f, stage / "tests" / f.name)
    (stage / "out").mkdir()
    python = tmp / "python-on-cpu"  # TorchTitan trains on CPU only through this wrapper
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tests" / "torchtitan_cpu.py"}" "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ws), "OMP_NUM_THREADS": "1",
           "ATE_FRAMEWORK_BASE": fw, "CUDA_VISIBLE_DEVICES": "", "ATE_TRAIN_PYTHON": str(python)}  # fmt: skip
    r = subprocess.run(["bash", str(stage / "tests" / "test.sh"), str(ws), str(stage / "tests"), str(stage / "out")],
                       env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((stage / "out" / "reward.json").read_text())


def test_oracle_scores_1(ws, tmp_path):
    fw, ws = ws
    env = {**os.environ, "PYTHON": sys.executable, "ATE_WORKSPACE": str(ws)}
    r = subprocess.run(["bash", str(TASK / "solution" / fw / "solve.sh")], cwd=ws, env=env, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = verify(fw, ws, tmp_path)
    assert result["reward"] == 1.0, result
    assert result["props_passed"] == result["props_total"] == 9 and result["e2e_passed"] == 2, result


def test_change_without_the_feature_scores_0(ws, tmp_path):
    fw, ws = ws
    with open(ws / ROUTER_FILE[fw], "a") as f:
        f.write("\n# DynMoE top-any gating: to do\n")
    result = verify(fw, ws, tmp_path)
    assert result["reward"] == 0.0, result
    # the property tests fail, not only the run
    assert result["props_passed"] < result["props_total"], result
