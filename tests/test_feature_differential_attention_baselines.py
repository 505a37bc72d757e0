"""feature/differential-attention on TorchTitan and Megatron-LM, on CPU: each oracle scores 1 through the hidden
verifier (the shared property tests through tests/<framework>/probe.py, the feature-off model against the pristine
framework, a short training run through the workspace's launch entry), and a change without the feature scores 0.
TorchTitan trains through tests/torchtitan_cpu.py, Megatron through its launch entry's CPU emulation. Skipped where a
framework is not installed. On the GPU the same oracles and verifiers run through bench.run.
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
TASK = REPO / "bench" / "tasks" / "feature" / "differential-attention"
INSTALLED = {"torchtitan": ("torchtitan", "datasets"), "megatron": ("megatron.core",)}
# A change that leaves the feature out: the verifier must run its tests and fail them, not stop at "no diff".
NO_FEATURE = {"torchtitan": "torchtitan/models/deepseek_v3/model/model.py",
              "megatron": "megatron/core/transformer/multi_latent_attention.py"}  # fmt: skip
FRAMEWORKS = [pytest.param(fw, marks=pytest.mark.skipif(
    not all(importlib.util.find_spec(m.split(".")[0]) for m in mods), reason=f"{fw} is not installed"))
    for fw, mods in INSTALLED.items()]  # fmt: skip


def cpu_python(tmp: Path, fw: str) -> str:
    """The $PYTHON the oracle and the verifier's training run call: TorchTitan's goes through torchtitan_cpu.py."""
    if fw != "torchtitan":
        return sys.executable
    python = tmp / "python-on-cpu"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tests" / "torchtitan_cpu.py"}" "$@"\n')
    python.chmod(0o755)
    return str(python)


def verify(fw: str, ws: Path, tmp: Path) -> dict:
    """The task's hidden test.sh, staged as the harness stages it (verify_lib beside the tests)."""
    stage = tmp / "verify"
    shutil.copytree(TASK / "tests", stage / "tests")
    for f in VERIFY_LIB.glob("*.py"):
        shutil.copy2(f, stage / "tests" / f.name)
    (stage / "out").mkdir()
    env = {**os.environ, "PYTHON": cpu_python(tmp, fw), "PYTHONPATH": str(ws), "OMP_NUM_THREADS": "1",
           "ATE_FRAMEWORK_BASE": fw, "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    r = subprocess.run(["bash", str(stage / "tests" / "test.sh"), str(ws), str(stage / "tests"), str(stage / "out")],
                       env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((stage / "out" / "reward.json").read_text())


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_oracle_scores_1_and_no_feature_scores_0(fw, tmp_path):
    template = adapters.get(fw).build(fw, tmp_path / "workspace")
    oracle = tmp_path / "oracle"
    shutil.copytree(template, oracle, symlinks=True)
    env = {
        **os.environ,
        "PYTHON": cpu_python(tmp_path, fw),
        "PYTHONPATH": str(oracle),
        "ATE_WORKSPACE": str(oracle),
    }
    r = subprocess.run(["bash", str(TASK / "solution" / fw / "solve.sh")], cwd=oracle, env=env, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = verify(fw, oracle, tmp_path / "v-oracle")
    assert result["reward"] == 1.0, result
    assert result["props_passed"] == result["props_total"] >= 10 and result["e2e_passed"] == 2, result

    path = template / NO_FEATURE[fw]
    path.write_text(path.read_text() + "\n# differential attention: not implemented\n")
    result = verify(fw, template, tmp_path / "v-null")
    assert result["reward"] == 0.0, result
    assert result["props_passed"] == 0 and result["e2e_passed"] == 1, (
        result
    )  # only the feature-off model passes
