"""Tasks are sound: every task folder loads, every Q&A key resolves against today's framework, and on
each CPU task the oracle scores 1 and the null agent 0, run as bench.run runs a trial (local sandbox), with
counts equal to the committed baseline of the deterministic agents (the CI regression gate, task by task).
Also: the Q&A grader's strictness, the read-only Q&A workspace, and verifiers that are not fooled."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import adapters
from adapters import pithtrain
from bench import compare
from bench.harness import qa_keys
from bench.harness.agents.null import NullAgent
from bench.harness.agents.oracle import OracleAgent
from bench.harness.core import AgentContext, AgentResult, discover_tasks
from bench.harness.gpus import GpuPool
from bench.harness.results import RunStore
from bench.harness.sandbox_local import LocalSandbox
from bench.harness.trial import LocalBackend, TrialPlan, run_trial
from bench.harness.verifier import run_verifier

TASKS = discover_tasks()
CPU_TASKS = [t for t in TASKS if t.gpus == 0 and "pithtrain" in t.frameworks]
BASELINE_FRAMEWORK_TRIALS = [(t, fw) for t in TASKS for fw in t.frameworks  # the GPU-only ones run on the H100
                             if fw != "pithtrain" and not t.gpus_needed(fw)]
BY_NAME = {t.name: t for t in TASKS}
ROPE = "qa/rope-implementation"
BASELINE = Path(__file__).resolve().parents[1] / "bench/results/baseline-deterministic.json"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return pithtrain.build_workspace(tmp_path_factory.mktemp("ws") / "workspace")


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory, workspace):
    """framework -> its baseline workspace, built on first use (TorchTitan / Megatron from pinned wheels)."""
    built = {"pithtrain": workspace}

    def get(fw: str) -> Path:
        if fw not in built:
            built[fw] = adapters.get(fw).build(fw, tmp_path_factory.mktemp(fw) / "workspace")
        return built[fw]

    return get


def trial(task, agent, workspace: Path, tmp_path: Path, framework: str = "pithtrain"):
    """One trial as bench.run does it: sandbox -> agent -> verifier. -> (AgentResult, reward, subscores, error)."""
    with LocalSandbox(workspace, read_only=task.read_only, cpus=task.cpus, memory_gb=task.memory_gb) as sb:
        ctx = AgentContext(task=task, framework=framework, sandbox=sb, instruction=task.instruction(framework, sb.workspace),
                           model=None, api_base_in_sandbox=None, log_dir=tmp_path / "logs", timeout_s=task.agent_timeout_s)
        result = agent.run(ctx) if not callable(agent) else agent(ctx)
        sb.set_read_only(False)
        reward, sub, err, _ = run_verifier(task, framework, sb, result.final_message, task.verifier_timeout_s,
                                           log_dir=tmp_path / "logs")
    if getattr(sb, "harness_dir", "").startswith("/tmp/ate-harness."):  # verifier's fallback for a sandbox without one
        shutil.rmtree(sb.harness_dir, ignore_errors=True)
    return result, reward, sub, err


# ------------------------------------------------------------------------------------------ tasks


def test_every_task_loads():
    assert ROPE in BY_NAME and "operate/getting-started" in BY_NAME
    for t in TASKS:
        text = t.instruction(t.frameworks[0], "/workspace")
        assert "{framework}" not in text and "{workspace}" not in text, t.name
        assert (t.tests_dir / "test.sh").is_file(), t.name
        for fw in t.frameworks:
            sol = t.solution_dir(fw)
            assert sol and ((sol / "solve.sh").is_file() or (sol / "answer.md").is_file()), f"{t.name}: no oracle for {fw}"
            if t.category == "qa":
                assert t.read_only and (t.tests_dir / "keys" / f"{fw}.toml").is_file(), t.name


@pytest.mark.parametrize("task", [t for t in TASKS if t.category == "qa"], ids=lambda t: t.name)
def test_qa_key_resolves(task, workspaces):
    for fw in task.frameworks:
        assert qa_keys.check_key_resolves(task.tests_dir / "keys" / f"{fw}.toml", workspaces(fw)) == [], fw


def bench_trial(task, agent: str, tmp_path: Path, framework: str = "pithtrain") -> dict:
    """One trial exactly as `bench.run --sandbox local` runs it; -> its record as written to trials/."""
    store = RunStore(tmp_path / "run")
    store.write_run_meta(run_id="ci", agent=agent, framework=framework, sandbox="local")
    plan = TrialPlan(task=task, framework=framework, agent=agent, attempt=1, model=None, upstream=None,
                     script=None, run_id="ci")
    run_trial(plan, LocalBackend(), GpuPool([]), store)
    return json.loads(store.trial_path(plan.trial_id).read_text())


def assert_matches_baseline(task, agent: str, tmp_path: Path, framework: str = "pithtrain") -> None:
    """The CI regression gate over the whole suite: this trial's counts equal the committed baseline's."""
    rows = compare.gate(BASELINE, [tmp_path / "run"], tasks=[task.name], agents=[agent], frameworks=[framework])
    assert rows and not compare.failed(rows), [r for r in rows if r["status"] != "ok"]


@pytest.mark.parametrize("task", CPU_TASKS, ids=lambda t: t.name)
def test_oracle_scores_one(task, tmp_path):
    rec = bench_trial(task, "oracle", tmp_path)
    assert (rec["failure_mode"], rec["error"], rec["reward"], rec["passed"]) == ("none", "", 1.0, True), rec
    assert_matches_baseline(task, "oracle", tmp_path)


@pytest.mark.parametrize("task", CPU_TASKS, ids=lambda t: t.name)
def test_null_scores_zero(task, tmp_path):
    rec = bench_trial(task, "null", tmp_path)
    assert (rec["failure_mode"], rec["reward"], rec["tool_calls"]) == ("none", 0.0, 0), rec
    assert_matches_baseline(task, "null", tmp_path)


@pytest.mark.parametrize("task,framework", BASELINE_FRAMEWORK_TRIALS, ids=lambda x: getattr(x, "name", x))
def test_baseline_frameworks_oracle_one_null_zero(task, framework, tmp_path):
    """The same tasks on TorchTitan and Megatron-LM: their oracle passes, null fails, both as the baseline says."""
    for agent, reward in (("oracle", 1.0), ("null", 0.0)):
        rec = bench_trial(task, agent, tmp_path / agent, framework)
        assert (rec["failure_mode"], rec["reward"]) == ("none", reward), rec
        assert rec["versions"]["framework"]["framework"] == framework
        assert_matches_baseline(task, agent, tmp_path / agent, framework)


@pytest.mark.parametrize("task", [t for t in CPU_TASKS if t.category == "feature"], ids=lambda t: t.name)
def test_feature_verifier_fails_a_change_without_the_feature(task, workspace, tmp_path):
    """Null scores 0 without running the tests (no diff); a diff that lacks the feature goes through every
    property test and still scores 0."""
    def unrelated_edit(ctx):
        ctx.sandbox.exec("echo 'A note.' >> README.md", timeout=30)
        return AgentResult(exit_code=0, final_message="done")

    _, reward, sub, err = trial(task, unrelated_edit, workspace, tmp_path)
    assert (err, reward) == ("", 0.0), (err, sub)
    assert "unchanged" not in sub["reason"] and sub["reason"], sub
    ran = sub.get("properties_total", sub.get("props_total", 0))
    assert ran > 0, sub


def test_agent_events_are_well_formed(workspace, tmp_path):
    result, reward, _, _ = trial(BY_NAME[ROPE], OracleAgent(), workspace, tmp_path)
    kinds = [e.kind for e in result.events]
    assert reward == 1.0 and kinds[0] == "agent_start" and kinds[-1] == "agent_end"
    assert result.tool_calls == kinds.count("tool_start") == kinds.count("tool_end")
    result, _, _, _ = trial(BY_NAME[ROPE], NullAgent(), workspace, tmp_path)
    assert [e.kind for e in result.events] == ["agent_start", "agent_end"] and result.final_message == ""


def test_oracle_serves_noskills_variant(workspace, tmp_path):
    """pithtrain-noskills uses pithtrain's key and oracle answer."""
    _, reward, sub, err = trial(BY_NAME[ROPE], OracleAgent(), workspace, tmp_path, framework="pithtrain-noskills")
    assert (err, reward) == ("", 1.0), (err, sub)


# ------------------------------------------------------------------------------------------ Q&A


def test_qa_workspace_is_read_only_for_the_agent(workspace, tmp_path):
    def writer(ctx):
        r = ctx.sandbox.exec("touch new.txt; s1=$?; echo x >> pithtrain/__init__.py; s2=$?; rm -f README.md; "
                             "s3=$?; echo $s1 $s2 $s3", timeout=30)
        return AgentResult(exit_code=0, final_message=r.output)

    result, reward, _, _ = trial(BY_NAME[ROPE], writer, workspace, tmp_path)
    assert "0" not in result.final_message.split(), result.final_message
    assert reward == 0.0


def oracle_answer(workspace: Path) -> str:
    template = (BY_NAME[ROPE].solution_dir("pithtrain") / "answer.md").read_text()
    return qa_keys.render_answer(template, workspace)


def test_qa_wrong_answers_score_zero_and_say_why(workspace):
    key = BY_NAME[ROPE].tests_dir / "keys" / "pithtrain.toml"
    good = oracle_answer(workspace)
    assert qa_keys.score(good, key, workspace)["reward"] == 1.0
    layout = "DeepSeek-V2 rotates interleaved pairs; Qwen3-MoE uses rotate-half."
    wrong_lines = "pithtrain/models/deepseek_v2.py:1-5 and pithtrain/models/qwen3_moe.py:2 " + layout
    r = qa_keys.score(wrong_lines, key, workspace)
    assert r["reward"] == 0 and r["anchors"] == 0 and len(r["missed_anchors"]) == 4 and r["facts"] == 1
    r = qa_keys.score(good + "\nAlso pithtrain/models/rope.py:12.", key, workspace)
    assert r["reward"] == 0 and r["bogus_citations"] == 1 and "no such file" in r["bogus"][0]
    r = qa_keys.score(good + "\nSee pithtrain/models/qwen3_moe.py:100000.", key, workspace)
    assert r["reward"] == 0 and "past the end" in r["bogus"][0]
    swapped = good.replace("interleaved pairs (x[2i], x[2i+1])", "rotate-half").replace(
        "layout: rotate-half: dims", "layout: interleaved: dims")
    r = qa_keys.score(swapped, key, workspace)
    assert r["reward"] == 0 and "deepseek_interleaved" in r["missing_facts"]
    shotgun = " ".join(f"pithtrain/models/deepseek_v2.py:{i}" for i in range(1, 200)) + layout
    assert qa_keys.score(shotgun, key, workspace)["too_many_citations"]
    whole_file = "pithtrain/models/deepseek_v2.py:1-480 pithtrain/models/qwen3_moe.py:1-350 " + layout
    assert qa_keys.score(whole_file, key, workspace)["anchors"] == 0


def test_qa_wrong_answer_through_the_verifier(workspace, tmp_path):
    def wrong(ctx):
        return AgentResult(exit_code=0, final_message="`pithtrain/models/rope.py:3` DeepSeek interleaved, Qwen rotate-half")

    _, reward, sub, err = trial(BY_NAME[ROPE], wrong, workspace, tmp_path)
    assert err == "" and reward == 0.0 and sub["bogus_citations"] == 1 and len(sub["missed_anchors"]) == 4


def test_citation_parsing(tmp_path):
    cites = qa_keys.parse_citations(
        "see `./a/b.py:12`, /workspace/a/b.py:3-7, a/b.py#L4-L9, b.py:5,8-9, and http://127.0.0.1:8000/x.py:3 at 12:30")
    assert [(c.path, c.start, c.end) for c in cites] == [
        ("./a/b.py", 12, 12), ("/workspace/a/b.py", 3, 7), ("a/b.py", 4, 9), ("b.py", 5, 5), ("b.py", 8, 9)]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.py").write_text("x = 1\n" * 20)
    files = qa_keys.workspace_files(tmp_path)
    for p in ("./a/b.py", f"{tmp_path}/a/b.py", "/workspace/a/b.py", "framework/a/b.py", "b.py"):
        assert qa_keys.resolve_path(p, tmp_path, files) == ["a/b.py"], p
    assert qa_keys.resolve_path("c/b.py", tmp_path, files) == []


def test_symbol_spans():
    src = ("import x\n\nLIMIT: int = 3\n\n\nclass A:\n    @staticmethod\n    def f(y):\n        z = y + 1\n"
           "        for i in range(3):\n            z = g(\n                i)\n        return z\n")
    assert qa_keys.symbol_spans(src, "LIMIT") == [(3, 3)]
    assert qa_keys.symbol_spans(src, "A") == [(6, 13)]
    assert qa_keys.symbol_spans(src, "A.f") == [(7, 13)]
    assert qa_keys.symbol_spans(src, r"A.f:g\(") == [(11, 12)]  # the whole statement, not the loop
    assert qa_keys.symbol_spans(src, "A.f:for i") == [(10, 10)]  # a loop header only
    with pytest.raises(qa_keys.KeyFileError):
        qa_keys.symbol_spans(src, "A.h")


def test_stale_key_is_a_verifier_error_not_a_zero(workspace, tmp_path):
    key = BY_NAME[ROPE].tests_dir / "keys" / "pithtrain.toml"
    ws = tmp_path / "edited"
    subprocess.run(["cp", "-a", str(workspace), str(ws)], check=True)
    f = ws / "pithtrain/models/qwen3_moe.py"
    f.write_text(f.read_text().replace("rope_cos_sin", "rotary_tables"))
    errors = qa_keys.check_key_resolves(key, ws)  # CI: every alternative must resolve
    assert len(errors) == 1 and "rope_cos_sin" in errors[0]
    assert qa_keys.score("x", key, ws)["reward"] == 0  # trials: one resolving alternative is enough
    f.write_text(f.read_text().replace("def rope(", "def rotary("))  # now no alternative is left
    _, reward, _, err = trial(BY_NAME[ROPE], lambda ctx: AgentResult(exit_code=0, final_message="x"), ws, tmp_path)
    assert reward == 0.0 and err.startswith("verifier_error:") and "qwen3_cos_sin" in err


def test_negative_anchor_keys(tmp_path):
    (tmp_path / "m.py").write_text("def build_mesh():\n    return ('dp', 'ep')\n")
    key = tmp_path / "k.toml"
    key.write_text('[[anchors]]\nid = "mesh"\nfile = "m.py"\nsymbol = "build_mesh"\nnegative = true\n'
                   'absent = ["context_parallel"]\n\n[[facts]]\nid = "absent"\nany = ["no context parallel"]\n')
    assert qa_keys.check_key_resolves(key, tmp_path) == []
    assert qa_keys.score("There is no context parallelism; the mesh is built at m.py:2.", key, tmp_path)["reward"] == 1
    assert qa_keys.score("Context parallel lives at m.py:2.", key, tmp_path)["reward"] == 0
    (tmp_path / "m.py").write_text("def build_mesh():\n    context_parallel = 2\n")
    assert "now appears at m.py:2" in qa_keys.check_key_resolves(key, tmp_path)[0]


# ------------------------------------------------------------------------------------------ getting-started


def test_getting_started_rejects_faked_metrics(workspace, tmp_path):
    def faker(ctx):
        lines = "".join(json.dumps({"step": s, "loss": 8.0 - s / 10}) + "\n" for s in range(1, 6))
        ctx.sandbox.exec(f"mkdir -p runs/smoke && printf '%s' '{lines}' > runs/smoke/metrics.jsonl", timeout=30)
        return AgentResult(exit_code=0, final_message="Done: 5 steps, loss 8.0 -> 7.5, checkpoint saved.")

    _, reward, sub, err = trial(BY_NAME["operate/getting-started"], faker, workspace, tmp_path)
    assert err == "" and reward == 0.0 and sub["metrics_steps"] == 5 and "checkpoint" in sub["reason"], sub


# ------------------------------------------------------------------------------------------ adapter


def test_adapter_workspace(tmp_path):
    a = pithtrain.build_workspace(tmp_path / "a")
    b = pithtrain.build(
        "pithtrain-noskills", tmp_path / "b")
    head = lambda ws: subprocess.run(["git", "-C", str(ws), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert head(a) == head(pithtrain.build_workspace(tmp_path / "c"))  # reproducible baseline commit
    assert pithtrain.baseline_commit(a) == head(a).strip()
    assert (a / "pithtrain" / "models").is_dir() and (a / "AGENTS.md").is_file() and not (b / "skills").exists()
    assert (a / "skills" / "README.md").is_file() and (a / "scripts" / "slurm.sh").is_file()
    assert "## Skills" in (a / "AGENTS.md").read_text() and "## Skills" not in (b / "AGENTS.md").read_text()
    assert (a / "tests" / "test_skills.py").is_file() and not (b / "tests" / "test_skills.py").exists()
    assert "## Rules of the house" in (b / "AGENTS.md").read_text()
    assert not list(a.rglob("__pycache__")) and not (a / "runs").exists() and not list(a.glob("*.egg-info"))
    assert pithtrain.run_spec_command("tiny-qwen3-moe", 5, "runs/x") == (
        "python -m pithtrain.train --config configs/tiny-qwen3-moe.toml --set train.steps=5 --set train.run_dir=runs/x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n')
    assert [m["step"] for m in pithtrain.parse_metrics(tmp_path / "run")] == [1, 2]
    assert pithtrain.version()["version"]
