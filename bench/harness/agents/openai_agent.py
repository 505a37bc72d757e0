"""Our own minimal agent for any OpenAI-compatible endpoint (vLLM, OpenAI, the fake server): Chat Completions
with one `bash` tool. The loop runs on the host and executes each tool call in the sandbox (sandbox.exec); it
stops when the model answers without tool calls, at `max_turns` model calls, or at ctx.timeout_s.

The model API is reached from the host, so it uses ctx.extra["api_base_host"] when given (the proxy's host-side
URL; needed for docker, where api_base_in_sandbox is a container address), else api_base_in_sandbox. Tool
commands get ctx.extra["env"] (the run meter's variables).
Transcript: ctx.log_dir/openai.json (the messages) and openai_calls.jsonl (one line per model call).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.harness.core import AgentContext, AgentResult, Event

SYSTEM_PROMPT = (
    "You are a coding agent working in the repository at {workspace}. Use the bash tool to inspect files, run "
    "commands and edit code. When the task is complete, reply with a short summary and no tool call."
)
BASH_TOOL = {"type": "function", "function": {
    "name": "bash", "description": "Run a bash command in the workspace; returns exit code and output.",
    "parameters": {"type": "object", "properties": {"command": {"type": "string", "description": "the command"}},
                   "required": ["command"]}}}


class OpenAIAgent:
    name = "openai"
    needs_model = True

    def __init__(self, max_turns: int = 100, cmd_timeout_s: float = 900.0, max_output_chars: int = 30_000,
                 stream: bool = True, api_key: str = "sk-sandbox-dummy", system_prompt: str = SYSTEM_PROMPT) -> None:
        self.max_turns, self.cmd_timeout_s, self.max_output_chars = max_turns, cmd_timeout_s, max_output_chars
        self.stream, self.api_key, self.system_prompt = stream, api_key, system_prompt

    def api_url(self, ctx: AgentContext) -> str | None:
        base = ctx.extra.get("api_base_host") or ctx.api_base_in_sandbox
        return base.rstrip("/") + "/v1/chat/completions" if base else None

    def run(self, ctx: AgentContext) -> AgentResult:
        url = self.api_url(ctx)
        if not url:
            return AgentResult(exit_code=2, error=f"{self.name}: no model API (api base is None)")
        log_dir = Path(ctx.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        deadline = t0 + ctx.timeout_s
        res = AgentResult(exit_code=0, events=[Event(t0, "agent_start", self.name)])
        messages: list[dict] = [{"role": "system", "content": self.system_prompt.format(workspace=ctx.sandbox.workspace)},
                                {"role": "user", "content": ctx.instruction}]
        usage = dict.fromkeys(("agent_turns", "input_uncached_tokens", "cache_read_tokens", "cache_write_tokens",
                               "output_tokens", "reasoning_tokens"), 0)
        calls_log = (log_dir / f"{self.name}_calls.jsonl").open("w")
        try:
            while True:
                if usage["agent_turns"] >= self.max_turns:
                    res.exit_code, res.error = 1, f"{self.name}: stopped at max_turns={self.max_turns}"
                    break
                left = deadline - time.time()
                if left <= 0:
                    res.exit_code, res.timed_out = 124, True
                    res.error = f"{self.name}: timed out after {ctx.timeout_s:.0f} s"
                    break
                body = {"model": ctx.model or "default", "messages": messages, "tools": [BASH_TOOL]}
                if self.stream:
                    body |= {"stream": True, "stream_options": {"include_usage": True}}
                try:
                    msg, u = self._call(url, body, timeout=left)
                except (OSError, ValueError) as e:
                    res.exit_code, res.error = 1, f"{self.name}: model call failed: {_why(e)}"
                    break
                usage["agent_turns"] += 1
                _add_usage(usage, u)
                calls_log.write(json.dumps({"t": time.time(), "usage": u, "tool_calls": len(msg.get("tool_calls") or [])})
                                + "\n")
                messages.append(msg)
                if not msg.get("tool_calls"):
                    res.final_message = msg.get("content") or ""
                    break
                for tc in msg["tool_calls"]:
                    messages.append({"role": "tool", "tool_call_id": tc.get("id", ""), "content": self._tool(ctx, tc, res,
                                                                                                           deadline)})
        finally:
            calls_log.close()
            (log_dir / f"{self.name}.json").write_text(json.dumps(messages, indent=1))
        res.events.append(Event(time.time(), "agent_end", self.name))
        res.reported_usage = usage
        return res

    def _tool(self, ctx: AgentContext, tc: dict, res: AgentResult, deadline: float) -> str:
        fn = tc.get("function") or {}
        res.tool_calls += 1
        try:
            cmd = json.loads(fn.get("arguments") or "{}").get("command")
        except (json.JSONDecodeError, AttributeError):
            cmd = None
        if fn.get("name") != "bash" or not isinstance(cmd, str):
            return f"error: call the bash tool with {{\"command\": \"...\"}}, got {fn.get('name')}({fn.get('arguments')})"
        res.events.append(Event(time.time(), "tool_start", f"bash {tc.get('id', '')}"))
        r = ctx.sandbox.exec(cmd, timeout=max(1.0, min(self.cmd_timeout_s, deadline - time.time())),
                             env=ctx.extra.get("env") or None)
        res.events.append(Event(time.time(), "tool_end", f"bash {tc.get('id', '')}"))
        out = r.output
        if len(out) > self.max_output_chars:
            half = self.max_output_chars // 2
            out = out[:half] + f"\n[... {len(out) - 2 * half} characters cut ...]\n" + out[-half:]
        status = "timed out" if r.timed_out else f"exit code {r.exit_code}"
        return f"[{status}]\n{out}"

    def _call(self, url: str, body: dict, timeout: float) -> tuple[dict, dict]:
        """One Chat Completions call: (assistant message, usage)."""
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            if not body.get("stream"):
                data = json.loads(r.read())
                if not data.get("choices"):
                    raise ValueError(f"no choices in reply: {str(data)[:200]}")
                m = data["choices"][0].get("message") or {}
                msg = {"role": "assistant", "content": m.get("content")}
                if m.get("tool_calls"):
                    msg["tool_calls"] = m["tool_calls"]
                return msg, data.get("usage") or {}
            text, calls, usage = [], {}, {}
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                for ch in chunk.get("choices") or []:
                    d = ch.get("delta") or {}
                    if d.get("content"):
                        text.append(d["content"])
                    for tc in d.get("tool_calls") or []:
                        c = calls.setdefault(tc.get("index", 0), {"id": "", "type": "function",
                                                                   "function": {"name": "", "arguments": ""}})
                        c["id"] = tc.get("id") or c["id"]
                        f = tc.get("function") or {}
                        c["function"]["name"] += f.get("name") or ""
                        c["function"]["arguments"] += f.get("arguments") or ""
            msg = {"role": "assistant", "content": "".join(text) or None}
            if calls:
                msg["tool_calls"] = [calls[i] for i in sorted(calls)]
            return msg, usage


def _add_usage(total: dict, u: dict) -> None:
    """Add one Chat Completions usage (prompt_tokens include cached and cache-write tokens) to the totals."""
    g = lambda d, k: int((d or {}).get(k) or 0)
    cached, written = g(u.get("prompt_tokens_details"), "cached_tokens"), g(u.get("prompt_tokens_details"),
                                                                            "cache_write_tokens")
    total["input_uncached_tokens"] += g(u, "prompt_tokens") - cached - written
    total["cache_read_tokens"] += cached
    total["cache_write_tokens"] += written
    total["output_tokens"] += g(u, "completion_tokens")
    total["reasoning_tokens"] += g(u.get("completion_tokens_details"), "reasoning_tokens")


def _why(e: Exception) -> str:
    if isinstance(e, urllib.error.HTTPError):
        try:
            return f"HTTP {e.code}: {e.read().decode(errors='replace')[:300]}"
        except OSError:
            return f"HTTP {e.code}"
    return str(e)[:300]
