"""End to end through `python -m bench.run`, as a user runs it: oracle passes and null fails every seed
task in both sandboxes; the real Claude Code and Codex CLIs complete getting-started against the fake
model server with every counter equal to what the server logged; a SIGKILLed run resumes without
losing finished trials or leaving containers; report and the regression gate read the results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAJECTORY = ROOT / "bench/trajectories/getting-started-pithtrain.json"
BASELINE = ROOT / "bench/results/baseline-deterministic.json"
SEED_TASKS = {"operate/getting-started", "qa/rope-implementation"}


def bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def records(out: Path) -> dict[str, dict]:
    rows = [json.loads(p.read_text()) for p in (out / "trials").glob("*.json")]
    return {r["task"]: r for r in rows}


def docker_ready() -> None:
    try:
        import docker

        docker.from_env(timeout=10).ping()
    except Exception as e:
        if os.environ.get("CI"):
            pytest.fail(f"no Docker engine in CI: {e}")
        pytest.skip(f"no Docker engine: {e}")


@pytest.mark.parametrize("sandbox", ["local", pytest.param("docker", marks=pytest.mark.docker)])
def test_oracle_passes_null_fails_every_seed_task(sandbox, tmp_path):
    if sandbox == "docker":
        docker_ready()
    for agent, reward in (("oracle", 1.0), ("null", 0.0)):
        out = tmp_path / agent
        r = bench("bench.run", "--agent", agent, "--framework", "pithtrain", "--sandbox", sandbox,
                  "--tasks", *sorted(SEED_TASKS), "--out", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
        recs = records(out)
        assert set(recs) == SEED_TASKS
        for rec in recs.values():
            assert rec["reward"] == reward, (agent, rec["task"], rec["subscores"], rec["error"])
            assert rec["failure_mode"] == "none" and rec["sandbox"] == sandbox
            assert rec["harness_overhead_s"] < 5.0
        if agent == "oracle":  # the oracle's training run was metered
            assert recs["operate/getting-started"]["subscores"]["active_run_s"] > 0


@pytest.mark.docker
@pytest.mark.parametrize("agent", ["claude-code", "codex"])
def test_real_cli_completes_task_in_docker_with_exact_accounting(agent, tmp_path):
    docker_ready()
    out = tmp_path / "run"
    r = bench("bench.run", "--agent", agent, "--framework", "pithtrain", "--sandbox", "docker",
              "--tasks", "getting-started", "--script", str(TRAJECTORY), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rec = records(out)["operate/getting-started"]
    assert rec["passed"], (rec["subscores"], rec["error"])
    served = [json.loads(line) for line in
              next((out / "logs").glob("*/fake_server.jsonl")).read_text().splitlines()]
    main = [s for s in served if s["main_agent"]]
    script = json.loads(TRAJECTORY.read_text())
    assert rec["agent_turns"] == len(main) == len(script)
    for field, key in (("input_uncached_tokens", "input"), ("cache_read_tokens", "cache_read"),
                       ("cache_write_tokens", "cache_write"), ("output_tokens", "output")):
        assert rec[field] == sum(s["usage"][key] for s in served if s["usage"]), field
    assert rec["tool_calls"] == sum(len(t["bash"] or []) for t in script)
    assert rec["subscores"]["active_run_s"] > 0  # the smoke run inside the container was metered
    reported = rec["agent_reported"]
    assert reported["input_uncached_tokens"] == rec["input_uncached_tokens"]
    assert reported["output_tokens"] == rec["output_tokens"]


def test_sigkill_then_resume_loses_nothing(tmp_path):
    """Kill the harness (SIGKILL) after its first finished trial; --resume runs only what is missing."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bench.run", "--agent", "oracle", "--sandbox", "local", "--tasks", "getting-started",
           "rope-implementation", "--trials", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "trials").glob("*.json"))) < 1:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {p.name: p.read_text() for p in (out / "trials").glob("*.json")}
    assert 1 <= len(first) < 4
    for text in first.values():
        json.loads(text)  # every record on disk is whole
    r = bench("bench.run", "--agent", "oracle", "--sandbox", "local", "--tasks", "getting-started",
              "rope-implementation", "--trials", "2", "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"({len(first)} already recorded)" in r.stderr
    after = {p.name: p.read_text() for p in (out / "trials").glob("*.json")}
    assert len(after) == 4 and all(after[k] == v for k, v in first.items())


def test_report_and_regression_gate(tmp_path):
    """The committed baseline of the deterministic agents still holds, and bench.report draws the run."""
    runs = []
    for agent, tasks, extra in (("oracle", sorted(SEED_TASKS), []), ("null", sorted(SEED_TASKS), []),
                                ("replay", ["getting-started"], ["--script", str(TRAJECTORY)])):
        out = tmp_path / agent
        r = bench("bench.run", "--agent", agent, "--sandbox", "local", "--tasks", *tasks, "--out", str(out), *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(str(out))
    assert records(tmp_path / "replay")["operate/getting-started"]["passed"]
    gate = bench("bench.compare", "--baseline", str(BASELINE), *runs, "--tasks", *sorted(SEED_TASKS),
                 "--frameworks", "pithtrain")
    assert gate.returncode == 0, gate.stdout[-4000:] + gate.stderr[-2000:]
    report = bench("bench.report", *runs, "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs and (tmp_path / "report" / "medians.csv").is_file()
    # A changed count for a deterministic agent is a regression.
    rec_path = next((tmp_path / "replay" / "trials").glob("*.json"))
    rec = json.loads(rec_path.read_text())
    rec["output_tokens"] += 1
    rec_path.write_text(json.dumps(rec))
    regressed = bench("bench.compare", "--baseline", str(BASELINE), *runs, "--tasks", *sorted(SEED_TASKS),
                 "--frameworks", "pithtrain")
    assert regressed.returncode == 1 and "REGRESSED" in regressed.stdout and "MISSING" not in regressed.stdout
