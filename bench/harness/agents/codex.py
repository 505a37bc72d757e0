"""Codex CLI (`codex exec --json`) inside the sandbox, talking to the accounting proxy.

Offline setup (shared DESIGN.md section 6): a fresh CODEX_HOME per run, a custom provider `local` pointing at
the proxy's /v1 with wire_api="responses" and a dummy key in LOCAL_KEY, analytics and plugins off. Against the
fake server, Codex 0.169 makes only main-agent calls (`POST /v1/responses`, streaming, tools exec_command,
write_stdin, apply_patch (custom), ...); no /v1/models, no title or memory calls in exec mode.

Transcript (--json): thread.started, turn.started, item.started / item.completed (command_execution,
file_change, mcp_tool_call, web_search, agent_message, reasoning), turn.completed {usage: input_tokens (all
input), cached_input_tokens, cache_write_input_tokens, output_tokens, reasoning_output_tokens}, turn.failed,
error. No cost or duration; one "turn" is a whole agent loop, so model calls are counted at the proxy.
"""

from __future__ import annotations

from bench.harness.agents import q, run_cli, tail
from bench.harness.core import AgentContext, AgentResult, Event

DEFAULT_MODEL = "gpt-5.5"
TOOL_ITEMS = ("command_execution", "file_change", "mcp_tool_call", "web_search")


class CodexAgent:
    name = "codex"
    needs_model = True

    def __init__(self, binary: str = "codex", extra_env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.binary, self.extra_env, self.extra_args = binary, dict(extra_env or {}), list(extra_args or [])

    def command(self, ctx: AgentContext) -> tuple[str, dict[str, str]]:
        base = (ctx.api_base_in_sandbox or "").rstrip("/") + "/v1"
        provider = f'{{name="local",base_url="{base}",env_key="LOCAL_KEY",wire_api="responses"}}'
        args = ["exec", "--json", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox",
                "-m", ctx.model or DEFAULT_MODEL, "-c", "model_provider=local", "-c", f"model_providers.local={provider}",
                "-c", "analytics.enabled=false", "-c", "features.plugins=false", *self.extra_args, ctx.instruction]
        cmd = 'export CODEX_HOME="$(mktemp -d)"; ' + " ".join(q(a) for a in [self.binary, *args]) + " </dev/null"
        return cmd, {"LOCAL_KEY": "sk-sandbox-dummy", **ctx.extra.get("env", {}), **self.extra_env}

    def run(self, ctx: AgentContext) -> AgentResult:
        if not ctx.api_base_in_sandbox:
            return AgentResult(exit_code=2, error="codex: no model API (api_base_in_sandbox is None)")
        cmd, env = self.command(ctx)
        res, objs, other = run_cli(ctx, "codex", cmd, env)
        parse_stream(objs, res)
        if not res.error and res.exit_code != 0:
            res.error = f"codex: exit {res.exit_code}: {tail(other)}"
        if not res.error and res.reported_usage is None:
            res.error = f"codex: no turn.completed: {tail(other)}"
        return res


def parse_stream(objs: list[tuple[float | None, dict]], res: AgentResult) -> None:
    """Fill tool events, tool_calls, reported_usage and error from `codex exec --json` events."""
    tools: set[str] = set()
    usage: dict[str, int] = {}
    turns, errors = 0, []
    for t, o in objs:
        typ = o.get("type")
        item = o.get("item") or {}
        if typ in ("item.started", "item.completed") and item.get("type") in TOOL_ITEMS:
            iid = str(item.get("id"))
            if typ == "item.started" or iid not in tools:
                if t is not None:
                    res.events.append(Event(t, "tool_start", f"{item['type']} {iid}"))
            if typ == "item.completed" and t is not None:
                res.events.append(Event(t, "tool_end", f"{item['type']} {iid}"))
            tools.add(iid)
        elif typ == "item.completed" and item.get("type") == "agent_message":
            res.final_message = str(item.get("text") or "")
        elif typ == "turn.completed":
            turns += 1
            for k, v in (o.get("usage") or {}).items():
                if isinstance(v, int):
                    usage[k] = usage.get(k, 0) + v
        elif typ == "turn.failed":
            res.error = f"codex: turn failed: {str((o.get('error') or {}).get('message'))[:300]}"
        elif typ == "error":  # also sent for retries ("Reconnecting..."): fatal only if no turn completes
            errors.append(str(o.get("message"))[:300])
    if errors and not turns and not res.error:
        res.error = f"codex: {errors[-1]}"
    res.tool_calls = len(tools)
    if turns:
        cached, written = usage.get("cached_input_tokens", 0), usage.get("cache_write_input_tokens", 0)
        res.reported_usage = {
            "codex_turns": turns, "input_uncached_tokens": usage.get("input_tokens", 0) - cached - written,
            "cache_read_tokens": cached, "cache_write_tokens": written, "output_tokens": usage.get("output_tokens", 0),
            "reasoning_tokens": usage.get("reasoning_output_tokens", 0), "raw": usage,
        }
    res.events.sort(key=lambda e: e.t)
