"""What the tests of tasks on TorchTitan and Megatron-Core share: their workspaces (built once per framework and test
process), the $PYTHON that makes TorchTitan train on CPU, and a task's oracle and hidden verifier run as the harness
runs them, on CPU. Neither framework trains on CPU as shipped: TorchTitan goes through tests/torchtitan_cpu.py,
Megatron's launch entry has its own CPU emulation."""

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
from bench.harness.agents.oracle import stage_solution
from bench.harness.verifier import VERIFY_LIB

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "bench" / "tasks"
INSTALLED = {"torchtitan": ("torchtitan", "datasets"), "megatron": ("megatron.core",)}
FRAMEWORKS = [pytest.param(fw, marks=pytest.mark.skipif(
    not all(importlib.util.find_spec(m.split(".")[0]) for m in mods), reason=f"{fw} is not installed"))
    for fw, mods in INSTALLED.items()]  # fmt: skip
_templates: dict[str, Path] = {}


def workspace(fw: str, tmp_path_factory, dest: Path) -> Path:
    """A fresh copy of the framework's workspace at `dest` (the workspace is built once per framework)."""
    if fw not in _templates:
        _templates[fw] = adapters.get(fw).build(fw, tmp_path_factory.mktemp(fw) / "workspace")
    shutil.copytree(_templates[fw], dest, symlinks=True)
    return dest


def cpu_python(fw: str, tmp: Path) -> str:
    """The $PYTHON oracles and verifiers call (torchrun included): for TorchTitan a wrapper that trains on CPU."""
    if fw != "torchtitan":
        return sys.executable
    python = tmp / "python-on-cpu"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tests" / "torchtitan_cpu.py"}" "$@"\n')
    python.chmod(0o755)
    return str(python)


def _env(fw: str, ws: Path, tmp: Path) -> dict:
    return {**os.environ, "PYTHON": cpu_python(fw, tmp), "PYTHONPATH": str(ws), "OMP_NUM_THREADS": "1",
            "ATE_WORKSPACE": str(ws), "ATE_FRAMEWORK_BASE": fw, "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip


def solve(task: str, fw: str, ws: Path, tmp: Path) -> None:
    """The task's oracle (bench/tasks/<task>/solution/<fw>/solve.sh, staged as the oracle agent stages it)."""
    sol = stage_solution(TASKS / task / "solution" / fw, tmp / f"solution-{len(list(tmp.glob('solution-*')))}")
    r = subprocess.run(["bash", str(sol / "solve.sh")], cwd=ws, env={**_env(fw, ws, tmp), "ATE_SOLUTION": str(sol)},
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def verify(task: str, fw: str, ws: Path, tmp: Path) -> dict:
    """The task's hidden test.sh, staged as the harness stages it (verify_lib beside the tests); its reward.json."""
    stage = tmp / f"verify-{len(list(tmp.glob('verify-*')))}"
    shutil.copytree(TASKS / task / "tests", stage / "tests")
    for f in VERIFY_LIB.glob("*.py"):
        shutil.copy2(f, stage / "tests" / f.name)
    (stage / "out").mkdir()
    r = subprocess.run(["bash", str(stage / "tests" / "test.sh"), str(ws), str(stage / "tests"), str(stage / "out")],
                       env=_env(fw, ws, tmp), capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((stage / "out" / "reward.json").read_text())
