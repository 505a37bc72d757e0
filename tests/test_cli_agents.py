"""The real agents on a scripted task (write out.txt, read it back, answer) against the fake server through the
accounting proxy, in a LocalSandbox: the file must exist, every count the proxy recorded must equal what the
fake server returned, and the agent's own figures must agree where they measure the same thing.
The claude / codex CLIs are skipped when missing, except under CI (env CI set), where that fails."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bench.harness.agents import get_agent
from bench.harness.agents.replay import script_from_calls, tool_to_bash
from bench.harness.core import AgentContext, Task
from bench.harness.proxy import TOKEN_FIELDS, Proxy
from bench.harness.sandbox_local import LocalSandbox

SCRIPT = [
    {"bash": ["echo hello > out.txt"], "text": "Creating the file.",
     "usage": {"input": 1200, "cache_read": 3000, "cache_write": 500, "output": 40, "reasoning": 8}},
    {"bash": ["cat out.txt"], "usage": {"input": 300, "cache_read": 4200, "cache_write": 100, "output": 20,
                                        "reasoning": 4}},
    {"bash": None, "text": "Done: out.txt holds hello.",
     "usage": {"input": 50, "cache_read": 4500, "cache_write": 0, "output": 12, "reasoning": 0}},
]
INSTRUCTION = "Create out.txt containing hello, then show its content."
TOTALS = {"input_uncached": 1550, "cache_read": 11700, "cache_write": 600, "output": 72, "reasoning": 12}


def need(binary: str) -> None:
    if shutil.which(binary) is None:
        msg = f"{binary} CLI not installed (npm install -g @anthropic-ai/claude-code@2.1.330 @openai/codex@0.169.0)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def run_agent(tmp_path: Path, agent_name: str, model: str | None, script_turns: list | None = None,
              **agent_kwargs) -> tuple:
    """(result, proxy summary, fake-server log, out.txt text or None)."""
    script = tmp_path / "script.json"
    tmp_path.mkdir(parents=True, exist_ok=True)
    script.write_text(json.dumps(SCRIPT if script_turns is None else script_turns))
    proxy = Proxy.for_agent(agent_name, script=script, log_dir=tmp_path / "logs").start()
    fake = proxy.fake
    try:
        with LocalSandbox(None) as sb:
            ctx = AgentContext(task=Task(id="echo", category="operate", path=tmp_path, frameworks=["any"]),
                               framework="any", sandbox=sb, instruction=INSTRUCTION, model=model,
                               api_base_in_sandbox=proxy.url, log_dir=tmp_path / "logs", timeout_s=90,
                               extra={"script": script, "api_base_host": proxy.url})
            res = get_agent(agent_name, **agent_kwargs).run(ctx)
            out = sb.host_workspace / "out.txt"
            text = out.read_text() if out.exists() else None
        summary = proxy.summary()
    finally:
        proxy.close()
    return res, summary, list(fake.log), text


def check_accounting(res, s: dict, log: list[dict], reasoning: bool) -> None:
    assert not res.error and res.exit_code == 0 and not res.timed_out, res.error
    main = [r for r in log if r["main_agent"]]
    assert [r["turn"] for r in main] == [0, 1, 2], log
    assert s["agent_turns"] == len(main) == 3
    assert s["model_calls"] == len([r for r in log if r["api"] in ("anthropic", "responses", "chat")])
    calls = [c for c in s["calls"] if c["api"] in ("anthropic", "responses", "chat")]
    for c, r in zip(calls, [r for r in log if r["api"] in ("anthropic", "responses", "chat")]):
        assert c["main_agent"] == r["main_agent"]
        assert {f: c[f] for f in TOKEN_FIELDS} == {f: r["usage"]["input" if f == "input_uncached" else f]
                                                   for f in TOKEN_FIELDS}
    want = dict(TOTALS, reasoning=TOTALS["reasoning"] if reasoning else 0)
    side = s["side_tokens"]
    assert {f: s[f"{f}_tokens"] - side[f] for f in TOKEN_FIELDS} == want
    assert s["per_turn_context_p50"] == 4600.0
    assert s["failed_calls"] == 0
    assert res.tool_calls == 2
    kinds = [e.kind for e in res.events]
    assert kinds.count("tool_start") == kinds.count("tool_end") == 2 and kinds[0] == "agent_start"
    ts = [e.t for e in res.events]
    assert ts == sorted(ts) and res.events[-1].kind == "agent_end"
    assert res.final_message == "Done: out.txt holds hello."


def test_claude_code(tmp_path):
    need("claude")
    res, s, log, text = run_agent(tmp_path, "claude-code", "claude-opus-5-5")
    assert text == "hello\n"
    check_accounting(res, s, log, reasoning=False)
    r = res.reported_usage
    assert r["agent_turns"] == s["agent_turns"]
    for f in ("input_uncached", "cache_read", "cache_write", "output"):
        assert r[f"{f}_tokens"] == s[f"{f}_tokens"], f
    assert r["cost_usd"] == pytest.approx(s["cost_usd"])  # our price table agrees with Claude Code's own
    assert (tmp_path / "logs" / "claude-code.jsonl").read_text().count('"type":"result"') == 1


def test_codex(tmp_path):
    need("codex")
    res, s, log, text = run_agent(tmp_path, "codex", "gpt-5.5")
    assert text == "hello\n"
    check_accounting(res, s, log, reasoning=True)
    r = res.reported_usage
    assert r["codex_turns"] == 1  # one Codex "turn" = the whole loop; model calls come from the proxy
    for f in TOKEN_FIELDS:
        assert r[f"{f}_tokens"] == s[f"{f}_tokens"], f
    assert s["cost_usd"] is None and "gpt-5.5" in s["price_source"]


@pytest.mark.parametrize("stream", [True, False])
def test_openai_agent(tmp_path, stream):
    res, s, log, text = run_agent(tmp_path, "openai", "gpt-5", stream=stream)
    assert text == "hello\n"
    check_accounting(res, s, log, reasoning=True)
    assert {f: res.reported_usage[f"{f}_tokens"] for f in TOKEN_FIELDS} == {f: s[f"{f}_tokens"] for f in TOKEN_FIELDS}
    assert res.reported_usage["agent_turns"] == 3
    assert s["cost_usd"] == pytest.approx((1550 * 1.25 + 11700 * 0.125 + 600 * 1.25 + 72 * 10) / 1e6)


def test_replay_is_reproducible(tmp_path):
    runs = []
    for i in range(2):
        res, s, log, text = run_agent(tmp_path / str(i), "replay", None)
        assert text == "hello\n"
        check_accounting(res, s, log, reasoning=True)
        runs.append({k: v for k, v in s.items() if k not in ("calls", "events")})
    assert runs[0] == runs[1]


@pytest.mark.parametrize("agent", ["claude-code", "codex"])
def test_compaction_is_not_a_turn(tmp_path, agent, monkeypatch):
    """A first turn reporting a nearly full context makes the CLI compact its history: that call must not take a
    scripted turn nor count as an agent turn, but its tokens count."""
    need("claude" if agent == "claude-code" else "codex")
    big = [dict(SCRIPT[0], usage={"input": 990_000, "output": 10})] + SCRIPT[1:]
    monkeypatch.setattr(f"{__name__}.SCRIPT", big)
    res, s, log, text = run_agent(tmp_path, agent, "claude-opus-5-5" if agent == "claude-code" else "gpt-5.5")
    assert not res.error, res.error
    assert text == "hello\n" and res.final_message == "Done: out.txt holds hello."
    assert [r["turn"] for r in log if r["main_agent"]] == [0, 1, 2]
    compact = [r for r in log if r["purpose"] == "compact"]
    assert compact and s["compactions"] == len(compact) and s["agent_turns"] == 3
    assert s["model_calls"] == 3 + len(compact)
    for f in TOKEN_FIELDS:
        assert s[f"{f}_tokens"] == sum(r["usage"]["input" if f == "input_uncached" else f] for r in log), f
    if agent == "claude-code":
        assert res.reported_usage["output_tokens"] == s["output_tokens"]
        assert res.reported_usage["input_uncached_tokens"] == s["input_uncached_tokens"]


@pytest.mark.parametrize("agent", ["openai", "claude-code"])
def test_record_then_replay(tmp_path, agent):
    """A run's proxy log becomes a script that replays the same turns, tokens, files and final answer."""
    if agent == "claude-code":
        need("claude")
    rec, s, _, _ = run_agent(tmp_path / "rec", agent, "claude-opus-5-5" if agent == "claude-code" else "gpt-5")
    script = script_from_calls(tmp_path / "rec" / "logs" / "proxy_calls.jsonl")
    drop = (lambda u: dict(u, reasoning=0)) if agent == "claude-code" else (lambda u: u)  # Anthropic: no reasoning
    assert script == [dict(t, usage=drop({"reasoning": 0, **t["usage"]})) for t in SCRIPT]
    res, s2, _, text = run_agent(tmp_path / "replay", "replay", None, script_turns=script)
    assert text == "hello\n" and res.final_message == rec.final_message
    for k in ("agent_turns", *(f"{f}_tokens" for f in TOKEN_FIELDS), "per_turn_context_p50"):
        assert s2[k] == s[k], k


def test_recorded_file_tools_become_commands(tmp_path):
    with LocalSandbox(None) as sb:
        for name, inp in [("Write", {"file_path": "d/a.txt", "content": "one 'two'\nthree"}),
                          ("Edit", {"file_path": "d/a.txt", "old_string": "three", "new_string": "3"}),
                          ("exec_command", {"cmd": "cat d/a.txt > b.txt"})]:
            r = sb.exec(tool_to_bash(name, inp), timeout=30)
            assert r.exit_code == 0, r.output
        assert (sb.host_workspace / "b.txt").read_text() == "one 'two'\n3"
        assert "one 'two'" in sb.exec(tool_to_bash("Read", {"file_path": "d/a.txt"}), timeout=30).output
    assert tool_to_bash("WebFetch", {"url": "x"}).startswith(": not replayable")
