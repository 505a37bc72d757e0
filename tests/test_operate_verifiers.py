"""The operate verifiers are not fooled: outputs of a real run, then tampered, score 0 for the right reason.

No sandbox: each task's oracle (or a hand-made run folder) fills a workspace, the output is edited, and the
task's test.sh runs on it directly, with the pristine framework taken from the workspace's first commit.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from adapters import pithtrain
from bench.harness.verifier import VERIFY_LIB

TASKS = Path(__file__).resolve().parents[1] / "bench" / "tasks" / "operate"


def env(tmp: Path, ws: Path) -> dict:
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ws), "OMP_NUM_THREADS": "1",
            "PITHTRAIN_CACHE": str(tmp / "cache"), "ATE_FRAMEWORK_BASE": "pithtrain"}


def solved(task: str, tmp: Path) -> Path:
    """A fresh workspace after the task's oracle ran in it."""
    ws = pithtrain.build_workspace(tmp / "workspace")
    subprocess.run(["bash", str(TASKS / task / "solution/pithtrain/solve.sh")], cwd=ws, env=env(tmp, ws),
                   check=True, capture_output=True, timeout=600)
    return ws


def verify(task: str, ws: Path, tmp: Path) -> dict:
    out = Path(tmp / f"verify-{len(list(tmp.glob('verify-*')))}" / "out")
    out.mkdir(parents=True)
    tests = out.parent / "tests"  # staged as the harness does: the task's tests plus verify_lib beside them
    shutil.copytree(TASKS / task / "tests", tests)
    for f in VERIFY_LIB.glob("*.py"):
        shutil.copy2(f, tests / f.name)
    r = subprocess.run(["bash", str(tests / "test.sh"), str(ws), str(tests), str(out)], env=env(tmp, ws),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads((out / "reward.json").read_text())


# ---------------------------------------------------------------------------------- train-and-evaluate


def test_train_and_evaluate_rejects_a_wrong_perplexity(tmp_path):
    ws = solved("train-and-evaluate", tmp_path)
    report = ws / "results" / "eval.json"
    data = json.loads(report.read_text())
    report.write_text(json.dumps({**data, "perplexity": data["perplexity"] * 0.95}))
    got = verify("train-and-evaluate", ws, tmp_path)
    assert got["reward"] == 0 and "differs from the export's" in got["reason"], got
    assert got["export_logit_err"] < 1e-4
    assert abs(got["perplexity"] - data["perplexity"]) < 1e-3 * data["perplexity"]


# ------------------------------------------------------------------------------- collect-routing-trace


def tamper(f: Path, **change) -> None:
    arrays = dict(np.load(f))
    np.savez(f, **{k: change[k](v) if k in change else v for k, v in arrays.items()})


def test_routing_trace_rejects_shuffled_tokens_and_swapped_weights(tmp_path):
    ws = solved("collect-routing-trace", tmp_path)
    traces = ws / "traces"
    shutil.copytree(traces, tmp_path / "good")
    perm = np.random.default_rng(0).permutation(128)
    tamper(traces / "step_0002.npz", expert_ids=lambda a: a[:, :, perm])  # tokens of each sequence shuffled
    got = verify("collect-routing-trace", ws, tmp_path)
    assert got["reward"] == 0 and got["reason"].startswith("step 2: ")
    assert "other experts" in got["reason"], got
    assert got["step_1"]["mismatched"] == 0
    shutil.rmtree(traces)
    shutil.copytree(tmp_path / "good", traces)
    tamper(traces / "step_0004.npz", gate_weights=lambda a: a[..., ::-1].copy())  # two weights swapped
    got = verify("collect-routing-trace", ws, tmp_path)
    assert got["reward"] == 0 and got["reason"].startswith("step 4: gate weights differ"), got


# -------------------------------------------------------------------------------- report-heavy-kernels


def profiled_run(tmp: Path) -> Path:
    """A workspace with a hand-made 3-step run of the tiny config (the verifier profiles its own steps)."""
    ws = pithtrain.build_workspace(tmp / "workspace")
    run = ws / "runs" / "profile"
    run.mkdir(parents=True)
    code = ("import json; from pithtrain.config import load_config, to_dict; print(json.dumps(to_dict("
            "load_config('configs/tiny-deepseek-v2-lite.toml', ['train.steps=3']))))")
    cfg = subprocess.run([sys.executable, "-c", code], cwd=ws, env=env(tmp, ws), check=True,
                         capture_output=True, text=True).stdout
    (run / "config.json").write_text(cfg)
    rows = [{"step": s, "loss": 8.3 - s / 10} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ws


def write_csv(ws: Path, rows: list[tuple[str, float, int]]) -> None:
    (ws / "results").mkdir(exist_ok=True)
    with open(ws / "results" / "top_kernels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kernel_name", "total_time_ms", "instances", "mean_time_ms"])
        w.writerows((name, f"{t:.4f}", n, f"{t / n:.4f}") for name, t, n in rows)


def test_heavy_kernels_rejects_wrong_order_counts_and_light_ops(tmp_path):
    ws = profiled_run(tmp_path)
    write_csv(ws, [("aten::bmm", 20.0, 24), ("aten::mm", 100.0, 168), ("aten::_log_softmax", 18.0, 1)])
    got = verify("report-heavy-kernels", ws, tmp_path)
    assert got["reward"] == 0 and "not ordered" in got["reason"], got
    write_csv(ws, [("aten::mm", 100.0, 84), ("aten::bmm", 20.0, 24), ("aten::_log_softmax", 18.0, 1)])
    got = verify("report-heavy-kernels", ws, tmp_path)  # half of mm's calls: not one step
    assert got["reward"] == 0 and "'aten::mm' ran 168 times" in got["reason"], got
    write_csv(ws, [("aten::mm", 100.0, 168), ("aten::bmm", 20.0, 24), ("aten::cos", 18.0, 1)])
    got = verify("report-heavy-kernels", ws, tmp_path)  # one call of ~20 us (the RoPE table): never heavy
    assert got["reward"] == 0 and "'aten::cos' is not among the 8 heaviest" in got["reason"], got
