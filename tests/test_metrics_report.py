"""Session-duration and active-time rules, the results store, bench.report and the bench.compare gate."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest

from bench import compare, report
from bench.harness.core import Event, TrialRecord
from bench.harness.metrics import active_time, session_duration
from bench.harness.results import RunStore, aggregate, load_records

ROOT = Path(__file__).resolve().parents[1]


def ev(t, kind="model_call_end"):
    return Event(t=float(t), kind=kind)


# ---------------------------------------------------------------------------------------- metrics


def test_session_duration_gaps_up_to_600s_count_in_full():
    assert session_duration([ev(0), ev(100), ev(700)]) == 700  # the 600 s gap counts in full


def test_session_duration_caps_idle_gap():
    assert session_duration([ev(0), ev(100), ev(2100), ev(2110)]) == 100 + 600 + 10


def test_session_duration_gap_spanning_tool_call_counts_in_full():
    events = [ev(0, "agent_start"), ev(10, "tool_start"), ev(3010, "tool_end"), ev(3020, "model_call_end")]
    assert session_duration(events) == 3020
    # the same gap after the tool ended is idle time: capped
    events = [ev(0, "tool_start"), ev(10, "tool_end"), ev(3010), ev(3020)]
    assert session_duration(events) == 10 + 600 + 10
    # nested/parallel tools: the gap counts while any is still running
    events = [ev(0, "tool_start"), ev(1, "tool_start"), ev(2, "tool_end"), ev(2000, "tool_end")]
    assert session_duration(events) == 2000


def test_session_duration_sorts_events_and_handles_edge_cases():
    events = [ev(0, "agent_start"), ev(5, "tool_start"), ev(1505, "tool_end"), ev(3000), ev(3001, "agent_end")]
    shuffled = events[:]
    random.Random(1).shuffle(shuffled)
    assert session_duration(shuffled) == session_duration(events) == 1505 + 600 + 1
    assert session_duration([]) == session_duration([ev(5)]) == 0


def test_active_time_is_the_union_of_intervals():
    # a launcher (0-10) with workers nested inside, an overlapping run, a separate run
    assert active_time([(8, 12), (0, 10), (2, 5), (3, 9), (20, 25)]) == 12 + 5
    assert active_time([]) == 0
    assert active_time([(0, 1), (1, 2)]) == 2  # touching intervals
    assert active_time([(5, 5), (7, 6)]) == 0  # empty or reversed intervals add nothing


# ---------------------------------------------------------------------------------------- results store


def rec(task="qa/q1-mesh", framework="pithtrain", agent="oracle", attempt=1, run_id="r1", **kw) -> TrialRecord:
    return TrialRecord(run_id=run_id, trial_id=f"{task.replace('/', '__')}__{framework}__{agent}__{attempt}",
                       task=task, framework=framework, agent=agent, model=None, attempt=attempt, sandbox="local", **kw)


def make_run(path: Path, records: list[TrialRecord]) -> Path:
    store = RunStore(path)
    store.write_run_meta(run_id=records[0].run_id if records else "empty", argv=["test"])
    for r in records:
        store.write_trial(r)
    store.finish()
    return path


def test_run_store_round_trip_and_resume(tmp_path):
    store = RunStore(tmp_path / "run")
    meta = store.write_run_meta(argv=["bench.run"], agent="oracle")
    assert meta["run_id"] and meta["finished_at"] is None and "python" in meta["versions"]
    r1, r2 = rec(output_tokens=7), rec(attempt=2, failure_mode="infra_error")
    store.write_trial(r1)
    store.write_trial(r2)
    assert store.finished_trial_ids() == {r1.trial_id, r2.trial_id}
    assert store.finished_trial_ids(retry_failure_modes=("infra_error",)) == {r1.trial_id}
    assert r1 in store.records() and store.run_id == meta["run_id"]
    assert store.trial_dir(r1.trial_id).is_dir()
    store.finish()
    again = RunStore(tmp_path / "run").write_run_meta(argv=["bench.run", "--resume"])
    assert again["run_id"] == meta["run_id"] and again["started_at"] == meta["started_at"]
    assert again["finished_at"] is None and len(again["resumed_at"]) == 1
    assert (tmp_path / "run" / "aggregate.csv").is_file() and (tmp_path / "run" / "aggregate.md").is_file()
    assert not list((tmp_path / "run").rglob("*.tmp"))


KILLED_WRITER = r"""
import os, sys, time
from pathlib import Path
from bench.harness import results
from bench.harness.core import TrialRecord
real_fsync = os.fsync
def slow_fsync(fd):  # the temp file is fully written; stall before the rename
    real_fsync(fd)
    Path(sys.argv[2]).write_text("ready")
    time.sleep(60)
os.fsync = slow_fsync
rec = TrialRecord(run_id="r", trial_id="t1", task="qa/x", framework="pithtrain", agent="oracle", model=None,
                  attempt=1, sandbox="local", output_tokens=999, error="x" * 5_000_000)
results.RunStore(Path(sys.argv[1])).write_trial(rec)
"""


def test_killed_writer_leaves_no_partial_record(tmp_path):
    run = tmp_path / "run"
    store = RunStore(run)
    store.write_trial(TrialRecord(run_id="r", trial_id="t1", task="qa/x", framework="pithtrain", agent="oracle",
                                  model=None, attempt=1, sandbox="local", output_tokens=1))
    before = store.trial_path("t1").read_bytes()
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(run), str(ready)], cwd=ROOT)
    deadline = time.time() + 60
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "writer never reached the rename"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert store.trial_path("t1").read_bytes() == before  # the old record, whole
    assert store.finished_trial_ids() == {"t1"}
    assert load_records([run]).output_tokens.tolist() == [1]  # the stray temp file is not read


def test_aggregate_takes_medians_and_leaves_out_infra_failures(tmp_path):
    records = [rec(attempt=i, agent_turns=t, output_tokens=o, passed=p, reward=float(p))
               for i, (t, o, p) in enumerate([(1, 100, True), (5, 300, False), (3, 200, True)])]
    records.append(rec(attempt=9, agent_turns=1000, failure_mode="infra_error"))
    df = load_records([make_run(tmp_path / "run", records)])
    row = aggregate(df).iloc[0]
    assert (row.agent_turns, row.output_tokens, row.reward) == (3, 200, 1.0)
    assert row.pass_rate == pytest.approx(2 / 3) and row.n == 3 and row.n_infra_error == 1
    csv = pd.read_csv(tmp_path / "run" / "aggregate.csv")
    assert csv.loc[0, "agent_turns"] == 3 and csv.loc[0, "n"] == 3


# ---------------------------------------------------------------------------------------- report


def synthetic_run(path: Path, frameworks=("pithtrain", "torchtitan"), agent="claude-code") -> Path:
    """2 tasks x frameworks x 3 trials; torchtitan costs exactly 2x PithTrain on every median."""
    records = []
    for task, gpu in (("qa/q1-mesh", 0.0), ("operate/getting-started", 120.0)):
        for fw in frameworks:
            k = 2 if fw == "torchtitan" else 1
            for i, jitter in enumerate((0.9, 1.0, 1.1)):
                records.append(rec(task=task, framework=fw, agent=agent, attempt=i + 1, reward=1.0, passed=True,
                                   agent_turns=round(10 * k * jitter), input_uncached_tokens=round(1000 * k * jitter),
                                   cache_read_tokens=round(50_000 * k * jitter), cache_write_tokens=round(5000 * k * jitter),
                                   output_tokens=round(3000 * k * jitter), per_turn_context_p50=20_000 * k * jitter,
                                   session_duration_s=300 * k * jitter, active_gpu_s=gpu * k * jitter,
                                   cost_usd=0.5 * k * jitter))
    return make_run(path, records)


PNGS = ["agent_turns.png", "active_gpu_s.png", "output_tokens.png", "session_duration_s.png",
        "per_turn_context_p50.png"]


def test_report_renders_tables_and_charts(tmp_path, capsys):
    run = synthetic_run(tmp_path / "run")
    out = tmp_path / "report"
    assert report.main([str(run), "--out", str(out)]) == 0
    for name in ["report.md", "medians.csv", "medians.md", "ratios.csv", "ratios.md", *PNGS]:
        assert (out / name).is_file(), name
    for name in PNGS:
        img = mpimg.imread(out / name)
        assert img.shape[0] >= 600 and img.shape[1] >= 900 and img.shape[2] in (3, 4), (name, img.shape)
        assert img.std() > 0.05  # not a blank canvas
    med = pd.read_csv(out / "medians.csv")
    assert len(med) == 4 and set(med.columns) >= {*report.TABLE_METRICS, "pass_rate", "n"}
    pt = med[(med.framework == "pithtrain") & (med.task == "qa/q1-mesh")].iloc[0]
    assert (pt.agent_turns, pt.output_tokens, pt.n, pt.pass_rate) == (10, 3000, 3, 1.0)
    rat = pd.read_csv(out / "ratios.csv")
    per_task = rat[rat.task != "geomean (all tasks)"]
    assert len(per_task) == 2 and (per_task.framework == "torchtitan").all()
    for m in ("agent_turns", "output_tokens", "cache_read_tokens", "session_duration_s", "cost_usd"):
        assert per_task[m].tolist() == pytest.approx([2.0, 2.0]), m
    gpu = dict(zip(per_task.task, per_task.active_gpu_s))
    assert gpu["operate/getting-started"] == pytest.approx(2.0) and pd.isna(gpu["qa/q1-mesh"])  # 0/0
    assert rat[rat.task == "geomean (all tasks)"].agent_turns.tolist() == pytest.approx([2.0])
    md = (out / "report.md").read_text()
    assert "## Ratio to PithTrain" in md and "2.00×" in md and "![Agent Turns](agent_turns.png)" in md
    assert "qa/q1-mesh" in (out / "medians.md").read_text()
    assert not list(tmp_path.glob(".report*"))  # the temporary build folder is gone

    # re-running replaces the previous report whole
    assert report.main([str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "run"]


def test_report_single_framework_and_missing_metrics(tmp_path, capsys):
    run = synthetic_run(tmp_path / "run", frameworks=("torchtitan",))
    for p in (run / "trials").glob("*.json"):  # an older record without GPU or per-turn figures
        d = json.loads(p.read_text())
        del d["active_gpu_s"], d["per_turn_context_p50"]
        p.write_text(json.dumps(d))
    out = tmp_path / "report"
    assert report.main([str(run), "--out", str(out)]) == 0
    assert not (out / "ratios.csv").exists() and (out / "agent_turns.png").is_file()
    assert not (out / "active_gpu_s.png").exists() and not (out / "per_turn_context_p50.png").exists()
    text = capsys.readouterr().out
    assert "ratios: skipped, no PithTrain trials" in text and "Active GPU Time: skipped" in text
    assert "Active GPU Time: skipped" in (out / "report.md").read_text()


def test_report_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "empty"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no trial records" in err
    assert report.main([str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    # an --out folder that is not a previous report is never replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    run = synthetic_run(tmp_path / "run")
    assert report.main([str(run), "--out", str(other)]) == 2
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


def test_report_cli_help_and_exit_status(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.report", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "ratios.csv" in r.stdout
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "bench.report", str(tmp_path / "empty"), "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------- compare


def det_run(path: Path, output_tokens=500, session_s=30.0, tasks=("qa/q1-mesh", "qa/q2-config")) -> Path:
    return make_run(path, [rec(task=t, agent="oracle", attempt=i, reward=1.0, passed=True, agent_turns=4,
                               tool_calls=3, output_tokens=output_tokens, session_duration_s=session_s * i)
                           for t in tasks for i in (1, 2, 3)])


def live_run(path: Path, output_tokens: list[int], rewards=(1.0, 1.0, 1.0)) -> Path:
    return make_run(path, [rec(agent="claude-code", attempt=i, output_tokens=o, reward=r, passed=r == 1.0,
                               agent_turns=20)
                           for i, (o, r) in enumerate(zip(output_tokens, rewards))])


def test_compare_identical_runs_pass(tmp_path, capsys):
    base, cur = det_run(tmp_path / "base"), det_run(tmp_path / "cur", session_s=99.0)  # timing differs: ignored
    assert compare.main(["--baseline", str(base), str(cur)]) == 0
    out = capsys.readouterr().out
    assert "output_tokens" in out and "REGRESSED" not in out and "session_duration_s" not in out
    # the same through a written baseline file
    bfile = tmp_path / "baseline.json"
    assert compare.main(["--write-baseline", str(bfile), str(base)]) == 0
    data = json.loads(bfile.read_text())
    assert data["format"] == compare.FORMAT and len(data["entries"]) == 2
    assert data["entries"][0]["metrics"]["output_tokens"] == {"median": 500, "min": 500, "max": 500}
    assert compare.main(["--baseline", str(bfile), str(cur)]) == 0


def test_compare_deterministic_agent_token_change_fails(tmp_path, capsys):
    base, cur = det_run(tmp_path / "base"), det_run(tmp_path / "cur", output_tokens=501)
    assert compare.main(["--baseline", str(base), str(cur)]) == 1
    assert "REGRESSED" in capsys.readouterr().out
    rows = compare.compare(compare.load_summary(base), compare.load_summary(cur), compare.parse_thresholds([]))
    assert {r["metric"] for r in compare.failed(rows)} == {"output_tokens"}
    # fewer tokens is a change too: deterministic agents must match exactly
    assert compare.main(["--baseline", str(base), str(det_run(tmp_path / "less", output_tokens=499))]) == 1


def test_compare_missing_task_fails_new_task_does_not(tmp_path, capsys):
    base = det_run(tmp_path / "base")
    assert compare.main(["--baseline", str(base), str(det_run(tmp_path / "part", tasks=("qa/q1-mesh",)))]) == 1
    assert "MISSING" in capsys.readouterr().out
    more = det_run(tmp_path / "more", tasks=("qa/q1-mesh", "qa/q2-config", "qa/q3-new"))
    assert compare.main(["--baseline", str(base), str(more)]) == 0
    assert "new" in capsys.readouterr().out
    # --tasks gates part of the suite: the part the run holds passes, a task the baseline lacks is bad input
    part = str(det_run(tmp_path / "part2", tasks=("qa/q1-mesh",)))
    assert compare.main(["--baseline", str(base), part, "--tasks", "q1-mesh"]) == 0
    assert compare.main(["--baseline", str(base), part, "--tasks", "qa"]) == 1
    assert compare.main(["--baseline", str(base), part, "--tasks", "operate"]) == 2
    assert compare.main(["--baseline", str(base), part, "--tasks", "q1-mesh", "--frameworks", "pithtrain"]) == 0
    assert compare.main(["--baseline", str(base), part, "--tasks", "q1-mesh", "--frameworks", "megatron"]) == 2
    assert compare.main(["--baseline", str(base), part, "--tasks", "q1-mesh", "--agents", "oracle"]) == 0
    assert compare.main(["--baseline", str(base), part, "--agents", "null"]) == 2


def test_compare_live_agent_spread_and_threshold(tmp_path):
    base = live_run(tmp_path / "base", [1000, 1200, 1400])  # median 1200, spread 400 > 10% of 1200
    assert compare.main(["--baseline", str(base), str(live_run(tmp_path / "ok", [1500, 1550, 1600]))]) == 0
    worse = live_run(tmp_path / "worse", [1650, 1700, 1750])  # +500 > 400
    assert compare.main(["--baseline", str(base), str(worse)]) == 1
    assert compare.main(["--baseline", str(base), str(worse), "--threshold", "output_tokens=0.5"]) == 0
    assert compare.main(["--baseline", str(base), str(worse), "--threshold", "all=0.5"]) == 0
    better = live_run(tmp_path / "better", [100, 100, 100])  # far fewer tokens: not a regression
    assert compare.main(["--baseline", str(base), str(better)]) == 0
    # lower is worse for reward and pass rate
    failing = live_run(tmp_path / "failing", [1200, 1200, 1200], rewards=(0.0, 0.0, 1.0))
    rows = compare.compare(compare.load_summary(base), compare.load_summary(failing), compare.parse_thresholds([]))
    assert {r["metric"] for r in compare.failed(rows)} == {"reward", "pass_rate"}


def test_compare_bad_input_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    base = det_run(tmp_path / "base")
    assert compare.main(["--baseline", str(base), str(tmp_path / "empty")]) == 2
    assert compare.main(["--baseline", str(tmp_path / "empty"), str(base)]) == 2
    assert compare.main(["--baseline", str(tmp_path / "missing.json"), str(base)]) == 2
    (tmp_path / "bad.json").write_text("{}")
    assert compare.main(["--baseline", str(tmp_path / "bad.json"), str(base)]) == 2
    assert compare.main(["--baseline", str(base), str(base), "--threshold", "nope=1"]) == 2
    assert compare.main(["--baseline", str(base), str(base), "--threshold", "output_tokens=x"]) == 2
    assert compare.main(["--write-baseline", str(tmp_path / "b.json"), str(tmp_path / "empty")]) == 2
    assert not (tmp_path / "b.json").exists()
    err = capsys.readouterr().err
    assert all(line.startswith("bench.compare: ") for line in err.strip().splitlines())
    r = subprocess.run([sys.executable, "-m", "bench.compare", "--baseline", str(base), str(tmp_path / "empty")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
