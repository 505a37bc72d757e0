"""Replay a recorded trajectory. A trajectory IS a fake-server script (format: bench/harness/fake_server.py):
one turn per main-agent model call, with the bash commands that call issued and the usage it reported.

How a replay runs: the harness serves the script with the fake server and puts the accounting proxy in front
of it (`Proxy.for_agent("replay", script=PATH)` does both), and this agent is the openai agent loop pointed
at the proxy. Every turn's commands are really executed in the sandbox (so the workspace ends up as the recorded
run left it, up to non-determinism in the commands), and the proxy records exactly the scripted turns and
tokens: replaying the same script twice gives identical counts. The agent gets the script as ctx.extra["script"]
(a path), used here only to bound the loop. needs_model is True: it needs the proxy (in front of the fake
server), though no real model.

Recording: `script_from_calls` turns a run's proxy log (log_dir/proxy_calls.jsonl: each main call's usage and
tool calls) into a script. Shell tools map exactly (Bash, bash, exec_command, shell); Claude Code's Read, Write
and Edit become equivalent commands; any other tool becomes a no-op `:` comment, so such a replay reproduces
turns and tokens exactly but the workspace only approximately.
"""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

from bench.harness.agents.openai_agent import OpenAIAgent
from bench.harness.core import AgentContext, AgentResult
from bench.harness.fake_server import load_script

REPLAY_MODEL = "replay"
# Edit FILE OLD NEW REPLACE_ALL, as Claude Code's Edit tool does
EDIT_PY = ("import sys; p, a, b, al = sys.argv[1:]; t = open(p).read(); "
           "open(p, 'w').write(t.replace(a, b) if al == '1' else t.replace(a, b, 1))")


def tool_to_bash(name: str, inp: dict) -> str:
    """A bash command doing what one recorded tool call did."""
    q = shlex.quote
    if name in ("Bash", "bash") and isinstance(inp.get("command"), str):
        return inp["command"]
    if name == "exec_command" and isinstance(inp.get("cmd"), str):
        return inp["cmd"]
    if name in ("shell", "local_shell") and isinstance(inp.get("command"), list):
        return shlex.join(str(a) for a in inp["command"])
    path = inp.get("file_path")
    if name == "Read" and isinstance(path, str):
        return f"cat -n {q(path)}"
    if name == "Write" and isinstance(path, str):
        return f"mkdir -p \"$(dirname {q(path)})\" && printf %s {q(str(inp.get('content', '')))} > {q(path)}"
    if name == "Edit" and isinstance(path, str):
        return (f"python3 -c {q(EDIT_PY)} {q(path)} {q(str(inp.get('old_string', '')))} "
                f"{q(str(inp.get('new_string', '')))} {'1' if inp.get('replace_all') else '0'}")
    return f": not replayable: {name}"


def script_from_calls(calls: list[dict] | str | Path) -> list[dict]:
    """A replay script from proxy call records (a list, or a proxy_calls.jsonl path): one turn per main call."""
    if isinstance(calls, str | Path):
        calls = [json.loads(ln) for ln in Path(calls).read_text().splitlines() if ln.strip()]
    turns = []
    for c in calls:
        if not c.get("main_agent") or not 0 < c.get("status", 200) < 400:
            continue
        cmds = [tool_to_bash(str(t.get("name")), t.get("input") or {}) for t in c.get("tools") or []]
        usage = {"input": c["input_uncached"], "cache_read": c["cache_read"], "cache_write": c["cache_write"],
                 "output": c["output"], "reasoning": c["reasoning"]}
        turn = {"bash": cmds or None, "text": c.get("text") or ("" if cmds else "Done."), "usage": usage}
        turns.append({k: v for k, v in turn.items() if v != ""})
    return turns


def script_path(ctx: AgentContext) -> Path | None:
    p = ctx.extra.get("script")
    return Path(p) if p else None


class ReplayAgent(OpenAIAgent):
    name = "replay"
    needs_model = True  # the proxy and fake server, not a real model

    def run(self, ctx: AgentContext) -> AgentResult:
        path = script_path(ctx)
        if path is not None:
            try:
                self.max_turns = len(load_script(path)) + 1  # +1: past the end the server says "script exhausted."
            except (OSError, ValueError) as e:
                return AgentResult(exit_code=2, error=f"replay: bad script {path}: {e}")
        if ctx.model is None:
            ctx = copy.copy(ctx)
            ctx.model = REPLAY_MODEL
        return super().run(ctx)
