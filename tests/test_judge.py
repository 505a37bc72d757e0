"""The optional LLM judge of feature diffs: asks our fake model server, records the verdict beside the reward
(never in it), and reports a malformed or missing verdict as judge_error."""

from __future__ import annotations

import json
from pathlib import Path

from bench.harness.core import load_task
from bench.harness.fake_server import FakeServer
from bench.harness.gpus import GpuPool
from bench.harness.judge import Judge, parse_verdict, rule_count
from bench.harness.results import RunStore
from bench.harness.trial import LocalBackend, TrialPlan, run_trial

RUBRIC = "Judge the diff:\n\n1. Place: new code lives in pithtrain/.\n2. Tests: a test is added.\n3. Docs: README says so.\n"
VERDICT = {"rules": [{"rule": 1, "pass": True, "reason": "in place"}, {"rule": 2, "pass": False, "reason": "no test"},
                     {"rule": 3, "pass": True, "reason": "documented"}]}


def make_task(root: Path) -> Path:
    """A feature task whose oracle adds one file and edits the README; its hidden test always passes."""
    task = root / "feature" / "tiny-change"
    (task / "tests").mkdir(parents=True)
    (task / "solution" / "pithtrain").mkdir(parents=True)
    (task / "task.toml").write_text('id = "tiny-change"\ncategory = "feature"\nframeworks = ["pithtrain"]\n'
                                    "agent_timeout_s = 60\nverifier_timeout_s = 60\n")
    (task / "instruction.md").write_text("Change {framework} in {workspace}.\n")
    (task / "tests" / "rubric.md").write_text(RUBRIC)
    (task / "tests" / "test.sh").write_text('echo \'{"reward": 1.0}\' > "$3/reward.json"\n')
    (task / "solution" / "pithtrain" / "solve.sh").write_text(
        'cd "${ATE_WORKSPACE:-.}" && echo "def feature(): return 1" > pithtrain/feature.py && '
        'echo "Feature: on." >> README.md\n')
    return task


def test_verdict_parsing():
    assert rule_count(RUBRIC) == 3
    rules = parse_verdict("Here you go: " + json.dumps(VERDICT) + " done", 3)
    assert [r["pass"] for r in rules] == [True, False, True]
    for bad in ("no json", json.dumps({"rules": VERDICT["rules"][:2]}), '{"rules": [{"pass": "yes"}]}'):
        try:
            parse_verdict(bad, 3)
        except Exception as e:
            assert type(e).__name__ == "JudgeError"
        else:
            raise AssertionError(f"accepted {bad!r}")


def test_judge_asks_the_endpoint_and_never_touches_the_reward(tmp_path):
    task = load_task(make_task(tmp_path / "tasks"))
    with FakeServer([], side_text=json.dumps(VERDICT), dump_requests=True) as fs:
        store = RunStore(tmp_path / "run")
        plan = TrialPlan(task=task, framework="pithtrain", agent="oracle", attempt=1, model=None, upstream=None,
                         script=None, run_id="t", judge=Judge("judge-model", fs.url + "/v1"))
        rec = run_trial(plan, LocalBackend(), GpuPool([]), store)
        asked = [r for r in fs.log if r["api"] == "chat"]
    assert rec.failure_mode == "none" and rec.reward == 1.0, rec.error
    judge = rec.subscores["judge"]
    assert judge["model"] == "judge-model" and judge["score"] == round(2 / 3, 4)
    assert [r["pass"] for r in judge["rules"]] == [True, False, True]
    assert len(asked) == 1 and asked[0]["model"] == "judge-model"
    prompt = asked[0]["request"]["messages"][1]["content"]
    assert "1. Place" in prompt and "+def feature(): return 1" in prompt and "+Feature: on." in prompt
    written = json.loads(store.trial_path(plan.trial_id).read_text())
    assert written["subscores"]["judge"] == judge


def test_judge_failures_are_recorded_not_raised(tmp_path):
    task = load_task(make_task(tmp_path / "tasks"))
    with FakeServer([], side_text="I think it is fine.") as fs:
        plan = TrialPlan(task=task, framework="pithtrain", agent="oracle", attempt=1, model=None, upstream=None,
                         script=None, run_id="t", judge=Judge("judge-model", fs.url + "/v1"))
        rec = run_trial(plan, LocalBackend(), GpuPool([]), RunStore(tmp_path / "run"))
    assert rec.reward == 1.0 and "judge" not in rec.subscores
    assert "not a verdict on 3 rules" in rec.subscores["judge_error"]
    unreachable = Judge("m", "http://127.0.0.1:9/v1", timeout_s=5)
    assert "judge_error" in unreachable.judge(RUBRIC, "+x\n")
    empty = Judge("m", "http://127.0.0.1:9/v1").judge(RUBRIC, "")  # no change: every rule fails, no call
    assert empty["judge"]["score"] == 0 and {r["reason"] for r in empty["judge"]["rules"]} == {"no change"}
