"""feature/moba-attention on TorchTitan and Megatron-Core, on CPU: the oracle scores 1 through the hidden verifier (the
shared property tests through tests/<framework>/probe.py, MoBA off against the pristine framework, a short training
run through the workspace's launch entry) and a change without the feature scores 0. TorchTitan trains through
tests/torchtitan_cpu.py, Megatron through its launch entry's CPU emulation. Skipped where a framework is not installed.
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
TASK = REPO / "bench" / "tasks" / "feature" / "moba-attention"
INSTALLED = {"torchtitan": ("torchtitan", "datasets"), "megatron": ("megatron.core",)}
FRAMEWORKS = [pytest.param(fw, marks=pytest.mark.skipif(
    not all(importlib.util.find_spec(m.split(".")[0]) for m in mods), reason=f"{fw} is not installed"))
    for fw, mods in INSTALLED.items()]  # fmt: skip
# A file the feature would change, touched by the change without the feature.
MODEL_FILE = {"torchtitan": "torchtitan/models/deepseek_v3/model/model.py",
              "megatron": "megatron/core/transformer/dot_product_attention.py"}  # fmt: skip
_templates: dict[str, Path] = {}


@pytest.fixture(params=FRAMEWORKS)
def ws(request, tmp_path_factory, tmp_path) -> tuple[str, Path]:
    """(framework, a fresh copy of its workspace); the workspace is built once per framework."""
    fw = request.param
    if fw not in _templates:
        _templates[fw] = adapters.get(fw).build(fw, tmp_path_factory.mktemp(fw) / "workspace")
    shutil.copytree(_templates[fw], tmp_path / "workspace", symlinks=True)
    return fw, tmp_path / "workspace"


def python_for(fw: str, tmp: Path) -> str:
    """$PYTHON of the oracle and the verifier: for TorchTitan a wrapper that makes it train on CPU."""
    if fw != "torchtitan":
        return sys.executable
    wrapper = tmp / "python-on-cpu"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tests" / "torchtitan_cpu.py"}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def verify(fw: str, ws: Path, tmp: Path) -> dict:
    """The task's hidden test.sh, staged as the harness stages it (verify_lib beside the tests)."""
    stage = tmp / "verify"
    shutil.copytree(TASK / "tests", stage / "tests")
    for f in VERIFY_LIB.glob("*.py"):
        shutil.copy2(f, stage / "tests" / f.name)
    (stage / "out").mkdir()
    env = {**os.environ, "PYTHON": python_for(fw, tmp), "PYTHONPATH": str(ws), "OMP_NUM_THREADS": "1",
           "ATE_FRAMEWORK_BASE": fw, "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    r = subprocess.run(["bash", str(stage / "tests" / "test.sh"), str(ws), str(stage / "tests"), str(stage / "out")],
                       env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((stage / "out" / "reward.json").read_text())


def test_oracle_scores_1(ws, tmp_path):
    fw, ws = ws
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "ATE_WORKSPACE": str(ws),
    }  # no training
    r = subprocess.run(["bash", str(TASK / "solution" / fw / "solve.sh")], cwd=ws, env=env, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = verify(fw, ws, tmp_path)
    assert result["reward"] == 1.0, result
    assert result["props_passed"] == result["props_total"] >= 13 and result["e2e_passed"] == 1, result


def test_a_change_without_the_feature_scores_0(ws, tmp_path):
    fw, ws = ws
    with open(ws / MODEL_FILE[fw], "a") as f:
        f.write("\n# MoBA: not done\n")
    result = verify(fw, ws, tmp_path)
    assert result["reward"] == 0.0, result
    assert result["props_passed"] == 0 and "props:" in result["reason"], result
