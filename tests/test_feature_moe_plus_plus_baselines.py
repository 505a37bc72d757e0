"""feature/moe-plus-plus on the baselines (TorchTitan; Megatron-LM has no probe and oracle yet), on CPU: the oracle (solution/<framework>/) scores 1 through
the hidden verifier (the framework-neutral property tests through tests/<framework>/probe.py, a short training run
of the workspace's launch entry, the feature-off model against the pristine framework), and a change without the
feature scores 0 having run the tests. TorchTitan trains through tests/torchtitan_cpu.py; the GPU runs go through
bench.run. Skipped where a framework is not installed.
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
TASK = REPO / "bench" / "tasks" / "feature" / "moe-plus-plus"
INSTALLED = {"torchtitan": ("torchtitan", "datasets")}
FRAMEWORKS = [pytest.param(fw, marks=pytest.mark.skipif(
    not all(importlib.util.find_spec(m.split(".")[0]) for m in mods), reason=f"{fw} is not installed"))
    for fw, mods in INSTALLED.items()]  # fmt: skip
_templates: dict[str, Path] = {}


@pytest.fixture(params=FRAMEWORKS)
def ws(request, tmp_path_factory, tmp_path) -> tuple[str, Path]:
    """(framework, a fresh copy of its workspace); the workspace is built once per framework."""
    fw = request.param
    if fw not in _templates:
        _templates[fw] = adapters.get(fw).build(fw, tmp_path_factory.mktemp(fw) / "workspace")
    shutil.copytree(_templates[fw], tmp_path / "workspace", symlinks=True)
    return fw, tmp_path / "workspace"


def cpu_env(fw: str, ws: Path, tmp: Path) -> dict:
    """One thread, no GPU; $PYTHON runs TorchTitan on the CPU (the oracle and the verifier's training run call it)."""
    python = Path(sys.executable)
    if fw == "torchtitan":
        python = tmp / "python-on-cpu"
        python.write_text(
            f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tests" / "torchtitan_cpu.py"}" "$@"\n'
        )
        python.chmod(0o755)
    return {
        **os.environ,
        "PYTHON": str(python),
        "PYTHONPATH": str(ws),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "ATE_WORKSPACE": str(ws),
        "ATE_FRAMEWORK_BASE": fw,
    }


def verify(fw: str, ws: Path, tmp: Path) -> dict:
    """The task's hidden test.sh, staged as the harness stages it (verify_lib beside the tests)."""
    stage = tmp / "verify"
    shutil.copytree(TASK / "tests", stage / "tests")
    for f in VERIFY_LIB.glob("*.py"):
        shutil.copy2(f, stage / "tests" / f.name)
    (stage / "out").mkdir()
    r = subprocess.run(
        ["bash", str(stage / "tests" / "test.sh"), str(ws), str(stage / "tests"), str(stage / "out")],
        env=cpu_env(fw, ws, tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads((stage / "out" / "reward.json").read_text())


def test_oracle_scores_one(ws, tmp_path):
    fw, root = ws
    r = subprocess.run(
        ["bash", str(TASK / "solution" / fw / "solve.sh")],
        cwd=root,
        env=cpu_env(fw, root, tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = verify(fw, root, tmp_path)
    assert got["reward"] == 1.0, got
    assert got["props_passed"] == got["props_total"] > 10 and got["e2e_passed"] == got["e2e_total"] == 2, got


def test_change_without_the_feature_scores_zero(ws, tmp_path):
    fw, root = ws
    with open(root / "README.md", "a") as f:
        f.write("A note.\n")
    got = verify(fw, root, tmp_path)
    assert got["reward"] == 0.0 and got["props_total"] > 10 and got["props_passed"] < got["props_total"], got
    assert got["e2e_passed"] == 1 and "test_short_training_run_learns" in str(got["e2e_failed"]), (
        got
    )  # off: same
