"""Claude Code (`claude -p`, stream-json) inside the sandbox, talking to the accounting proxy.

Offline setup (shared DESIGN.md section 6): ANTHROPIC_BASE_URL = the proxy, a dummy key (the proxy puts the real
one in), nonessential traffic / updater / telemetry / error reporting off, IS_SANDBOX=1 so root may skip
permissions, and a fresh CLAUDE_CONFIG_DIR so no settings or memory leak between trials. Against the fake
server, Claude Code 2.1.330 makes only main-agent calls (`POST /v1/messages?beta=true`, streaming, with its
12 tools): no side, title or count_tokens calls in -p mode, except a context compaction when a reply reports a
nearly full context (same model and tools; the proxy tells it by its prompt and does not count it as a turn).

Transcript: one JSON object per line: system/init, assistant (one line per content block, same message id),
user (tool_result), and a final `result` line with num_turns (compactions included), duration_ms,
total_cost_usd, usage (can miss calls after a compaction; modelUsage sums them all, so we report that) and
is_error (the success flag to trust; subtype says "success" on an API error too).
"""

from __future__ import annotations

from bench.harness.agents import q, run_cli, tail
from bench.harness.core import AgentContext, AgentResult, Event

DUMMY_KEY = "sk-ant-sandbox-dummy"  # the proxy replaces it with the host's key


class ClaudeCodeAgent:
    name = "claude-code"
    needs_model = True

    def __init__(self, binary: str = "claude", extra_env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.binary, self.extra_env, self.extra_args = binary, dict(extra_env or {}), list(extra_args or [])

    def command(self, ctx: AgentContext) -> tuple[str, dict[str, str]]:
        env = {
            "ANTHROPIC_BASE_URL": (ctx.api_base_in_sandbox or "").rstrip("/"), "ANTHROPIC_API_KEY": DUMMY_KEY,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1", "CLAUDE_CODE_MAX_RETRIES": "0", "IS_SANDBOX": "1",
            **ctx.extra.get("env", {}), **self.extra_env,
        }
        args = ["-p", ctx.instruction, "--output-format", "stream-json", "--verbose", "--dangerously-skip-permissions"]
        if ctx.model:
            args += ["--model", ctx.model]
        args += self.extra_args
        cmd = 'export CLAUDE_CONFIG_DIR="$(mktemp -d)"; ' + " ".join(q(a) for a in [self.binary, *args]) + " </dev/null"
        return cmd, env

    def run(self, ctx: AgentContext) -> AgentResult:
        if not ctx.api_base_in_sandbox:
            return AgentResult(exit_code=2, error="claude-code: no model API (api_base_in_sandbox is None)")
        cmd, env = self.command(ctx)
        res, objs, other = run_cli(ctx, "claude-code", cmd, env)
        parse_stream(objs, res)
        if not res.error and res.reported_usage is None:
            res.error = f"claude-code: no result line (exit {res.exit_code}): {tail(other)}"
        if not res.error and res.exit_code != 0:
            res.error = f"claude-code: exit {res.exit_code}: {tail(other)}"
        return res


def parse_stream(objs: list[tuple[float | None, dict]], res: AgentResult) -> None:
    """Fill tool events, tool_calls, reported_usage and error from stream-json objects."""
    started: dict[str, str] = {}
    for t, o in objs:
        typ = o.get("type")
        content = (o.get("message") or {}).get("content")
        if typ == "assistant" and isinstance(content, list):
            for b in content:
                if isinstance(b, dict) and b.get("type") == "tool_use" and b.get("id") not in started:
                    started[b["id"]] = str(b.get("name"))
                    if t is not None:
                        res.events.append(Event(t, "tool_start", f"{b.get('name')} {b['id']}"))
        elif typ == "user" and isinstance(content, list):
            for b in content:
                if isinstance(b, dict) and b.get("type") == "tool_result" and t is not None:
                    tid = b.get("tool_use_id")
                    res.events.append(Event(t, "tool_end", f"{started.get(tid, '?')} {tid}"))
        elif typ == "result":
            # modelUsage sums every call (compactions, other models); `usage` can miss some (seen after compaction)
            mu = o.get("modelUsage") or {}
            tot = lambda k, mu=mu: sum(int(m.get(k) or 0) for m in mu.values() if isinstance(m, dict))
            res.reported_usage = {
                "agent_turns": o.get("num_turns"), "input_uncached_tokens": tot("inputTokens"),
                "cache_read_tokens": tot("cacheReadInputTokens"), "cache_write_tokens": tot("cacheCreationInputTokens"),
                "output_tokens": tot("outputTokens"), "cost_usd": o.get("total_cost_usd"),
                "duration_ms": o.get("duration_ms"), "duration_api_ms": o.get("duration_api_ms"),
                "usage": o.get("usage"), "model_usage": mu,
            }
            res.final_message = str(o.get("result") or "")
            if o.get("is_error"):
                res.error = f"claude-code: is_error ({o.get('subtype')}): {str(o.get('result'))[:300]}"
    res.tool_calls = len(started)
    res.events.sort(key=lambda e: e.t)
