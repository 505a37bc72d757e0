"""Agents, one file each; `get_agent(name)` picks one. Also the small helpers the CLI agents share: each CLI
runs inside the sandbox with its stdout piped through a bash loop that stamps every line with the sandbox
clock (bash's $EPOCHREALTIME, no extra process per line), so tool_start / tool_end events get real times even
though sandbox.exec returns the output only at the end."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from bench.harness.core import Agent, AgentContext, AgentResult, Event, HarnessError

AGENT_NAMES = ("oracle", "null", "replay", "claude-code", "codex", "openai")


def get_agent(name: str, **kwargs) -> Agent:
    """The agent called `name`; kwargs go to its constructor."""
    if name == "claude-code":
        from bench.harness.agents.claude_code import ClaudeCodeAgent
        return ClaudeCodeAgent(**kwargs)
    if name == "codex":
        from bench.harness.agents.codex import CodexAgent
        return CodexAgent(**kwargs)
    if name == "openai":
        from bench.harness.agents.openai_agent import OpenAIAgent
        return OpenAIAgent(**kwargs)
    if name == "replay":
        from bench.harness.agents.replay import ReplayAgent
        return ReplayAgent(**kwargs)
    if name == "oracle":
        from bench.harness.agents.oracle import OracleAgent
        return OracleAgent(**kwargs)
    if name == "null":
        from bench.harness.agents.null import NullAgent
        return NullAgent(**kwargs)
    raise HarnessError(f"unknown agent {name!r} (known: {', '.join(AGENT_NAMES)})")


def stamped(cmd: str) -> str:
    """`cmd` with stdout+stderr lines prefixed by `<unix time>\\t`; exits with cmd's exit code."""
    return ("{ " + cmd + " ; } 2>&1 | while IFS= read -r l || [ -n \"$l\" ]; do "
            "printf '%s\\t%s\\n' \"$EPOCHREALTIME\" \"$l\"; done; exit ${PIPESTATUS[0]}")


def unstamp(output: str) -> list[tuple[float | None, str]]:
    """(time or None, line) for each line of a stamped() command's output."""
    out = []
    for line in output.splitlines():
        head, sep, rest = line.partition("\t")
        try:
            out.append((float(head.replace(",", ".")), rest) if sep else (None, line))
        except ValueError:
            out.append((None, line))
    return out


def json_lines(lines: list[tuple[float | None, str]]) -> tuple[list[tuple[float | None, dict]], list[str]]:
    """Split stamped lines into parsed JSON objects and other text (stderr, warnings)."""
    objs, other = [], []
    for t, line in lines:
        s = line.strip()
        if s.startswith("{"):
            try:
                obj = json.loads(s)
                if isinstance(obj, dict):
                    objs.append((t, obj))
                    continue
            except json.JSONDecodeError:
                pass
        if s:
            other.append(line)
    return objs, other


def run_cli(ctx: AgentContext, name: str, cmd: str, env: dict[str, str]) -> tuple[AgentResult, list, list[str]]:
    """Run a CLI agent's command in the sandbox; save its raw transcript to ctx.log_dir/<name>.jsonl.
    Returns the result so far (exit code, timeout, agent_start/end), the stamped JSON objects and other lines."""
    Path(ctx.log_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    r = ctx.sandbox.exec(stamped(cmd), timeout=ctx.timeout_s, env=env)
    t1 = time.time()
    lines = unstamp(r.output)
    (Path(ctx.log_dir) / f"{name}.jsonl").write_text("".join(f"{ln}\n" for _, ln in lines))
    objs, other = json_lines(lines)
    res = AgentResult(exit_code=r.exit_code, timed_out=r.timed_out,
                      events=[Event(t0, "agent_start", name), Event(t1, "agent_end", name)])
    if r.timed_out:
        res.error = f"{name}: timed out after {ctx.timeout_s:.0f} s"
    return res, objs, other


def tail(lines: list[str], n: int = 300) -> str:
    return " | ".join(lines)[-n:]


def q(s: str) -> str:
    return shlex.quote(s)
