"""Host-side accounting proxy: the source of truth for what an agent's model calls cost.

The agent (inside its sandbox) talks to this proxy instead of the model API; the proxy forwards each request to
`upstream` (a real API, a local vLLM, or fake_server) and streams the answer back unchanged, chunk by chunk,
while parsing the usage out of the SSE events (or the JSON body). Per call it records start/end time, latency,
API kind, model, whether it is a main-agent call, the answer (text, and tool calls with name and input: enough
to turn a run into a replay script), and tokens:
  input_uncached, cache_read, cache_write, output (reasoning included), reasoning, context (all input).
Anthropic input_tokens exclude cached tokens; OpenAI input_tokens / prompt_tokens include them, so there
uncached = input - cached_tokens - cache_write_tokens (the *_tokens_details field Codex 0.169 reads; taken to
be part of input_tokens like cached_tokens; absent = 0).

Main-agent rule (`call_purpose`, shared with fake_server), per request: "main" = a generation request
(Messages, Responses, Chat Completions) that offers tools, names `main_model` when one is set, and is not a
context compaction; else "compact" (the CLI summarizing its own history, told by its prompt, see
COMPACTION_MARKERS: Claude Code 2.1.330 sends it with its tools and the main model), "side" (no tools: titles,
topic checks), "count_tokens" or "other". Only "main" calls are agent turns; every call's tokens
count. Pass `classify=callable(kind, body) -> purpose` to replace the rule.

Keys: the sandbox only ever holds a dummy key. For Anthropic paths the proxy puts `keys["anthropic"]` (default:
env ANTHROPIC_API_KEY on the host) into x-api-key (or the Bearer token, if the agent used one); for OpenAI
paths `keys["openai"]` (default: env OPENAI_API_KEY) into Authorization. With no host key the agent's header
is forwarded as is (fake server, local vLLM).

Listens on 127.0.0.1:`port` (0 = a free port; None = no TCP) and/or the unix socket `unix_path` (mode 0666:
the docker sandbox bind-mounts its folder and relays a TCP port inside the container to it).
`Proxy.for_agent(...)` builds the one a trial uses (upstream by agent, or a fake server for a script).

    with Proxy("https://api.anthropic.com", port=0, unix_path="/tmp/p/proxy.sock") as p:
        ... agent uses p.url ...
        s = p.summary()   # agent_turns, token sums, per_turn_context_p50, cost_usd, calls, events
    python -m bench.harness.proxy --upstream URL [--port N] [--unix PATH] [--log calls.jsonl]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from bench.harness.core import Event

TOKEN_FIELDS = ("input_uncached", "cache_read", "cache_write", "output", "reasoning")
HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding"}
MAX_JSON_BODY = 64 << 20  # non-SSE bodies are buffered (bounded) for their usage; SSE is parsed as it passes
MAX_TEXT = 100_000  # characters of each answer's text kept in the call record

# USD per million tokens: (uncached input, cache read, cache write, output incl. reasoning). Claude 4.5 and later:
# the prices Claude Code 2.1.330 itself applies (measured from its total_cost_usd against fake_server, one token
# kind at a time; cache write = the 5-minute rate; it prices names it does not know like claude-opus-5-5, we
# give None). Older Claude and OpenAI rows: public list prices as we last knew them (2025); OpenAI cache-write
# tokens are billed as plain input. Names match exactly after dropping a provider prefix ("anthropic/") and a date suffix
# ("-20250929", "-2025-08-07"). Pass `prices=` to Proxy for another table; an unknown model -> cost_usd None.
PRICES: dict[str, tuple[float, float, float, float]] = {
    "claude-opus-5-5": (4.0, 0.20, 5.0, 20.0),
    "claude-opus-5": (5.0, 0.50, 6.25, 25.0),
    "claude-opus-4-7": (5.0, 0.50, 6.25, 25.0),
    "claude-opus-4-6": (5.0, 0.50, 6.25, 25.0),
    "claude-opus-4-5": (5.0, 0.50, 6.25, 25.0),
    "claude-opus-4-1": (15.0, 1.50, 18.75, 75.0),
    "claude-opus-4": (15.0, 1.50, 18.75, 75.0),
    "claude-sonnet-5-5": (2.0, 0.10, 2.5, 10.0),
    "claude-sonnet-5": (2.0, 0.20, 2.5, 10.0),
    "claude-sonnet-4-6": (3.0, 0.30, 3.75, 15.0),
    "claude-sonnet-4-5": (3.0, 0.30, 3.75, 15.0),
    "claude-sonnet-4": (3.0, 0.30, 3.75, 15.0),
    "claude-haiku-5-5": (0.5, 0.05, 0.625, 0.5),
    "claude-haiku-4-5": (1.0, 0.10, 1.25, 5.0),
    "claude-3-5-haiku": (0.8, 0.08, 1.0, 4.0),
    "gpt-5": (1.25, 0.125, 1.25, 10.0),
    "gpt-5-mini": (0.25, 0.025, 0.25, 2.0),
    "gpt-5-nano": (0.05, 0.005, 0.05, 0.40),
    "gpt-5-codex": (1.25, 0.125, 1.25, 10.0),
    "gpt-4.1": (2.0, 0.50, 2.0, 8.0),
    "gpt-4.1-mini": (0.40, 0.10, 0.40, 1.60),
    "gpt-4o": (2.5, 1.25, 2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.075, 0.15, 0.60),
}
DEFAULT_UPSTREAMS = {"claude-code": "https://api.anthropic.com", "codex": "https://api.openai.com",
                     "openai": "https://api.openai.com"}
PRICE_SOURCE = "bench.harness.proxy.PRICES (USD per 1M tokens: Claude Code 2.1.330's own; OpenAI list 2025)"


def api_kind(path: str) -> str:
    """anthropic | count_tokens | responses | chat | other, from the request path."""
    p = urlsplit(path).path.rstrip("/")
    if p.endswith("/messages/count_tokens"):
        return "count_tokens"
    if p.endswith("/messages"):
        return "anthropic"
    if p.endswith("/responses"):
        return "responses"
    if p.endswith("/chat/completions"):
        return "chat"
    return "other"


# Text of the last user message that marks a compaction request: Claude Code 2.1.330 ("CRITICAL: Respond with TEXT
# ONLY. Do NOT call any tools." + summary instructions), Codex 0.169 ("You are performing a CONTEXT CHECKPOINT
# COMPACTION.", sent without tools anyway).
COMPACTION_MARKERS = ("Do NOT call any tools", "CONTEXT CHECKPOINT COMPACTION")


def _last_user_text(kind: str, body: dict) -> str:
    msgs = body.get("messages") if kind != "responses" else body.get("input")
    if isinstance(msgs, str) or not isinstance(msgs, list):
        return msgs if isinstance(msgs, str) else ""
    for m in reversed(msgs):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            return " ".join(str(b.get("text", "")) for b in c or [] if isinstance(b, dict))
    return ""


def call_purpose(kind: str, body: dict, main_model: str | None = None) -> str:
    """main | compact | side | count_tokens | other (the rule: module docstring)."""
    if kind == "count_tokens":
        return "count_tokens"
    if kind not in ("anthropic", "responses", "chat") or not isinstance(body, dict):
        return "other"
    if any(m in _last_user_text(kind, body) for m in COMPACTION_MARKERS):
        return "compact"
    return "side" if not body.get("tools") or (main_model and body.get("model") != main_model) else "main"


def is_main_call(kind: str, body: dict, main_model: str | None = None) -> bool:
    return call_purpose(kind, body, main_model) == "main"


def price_of(model: str | None, prices: dict = PRICES) -> tuple[float, float, float, float] | None:
    if not model:
        return None
    m = model.split("/")[-1]
    m = re.sub(r"-(\d{8}|\d{4}-\d{2}-\d{2})$", "", m)
    return prices.get(m)


# ---------------------------------------------------------------------------------------- usage


TOOL_ITEMS = ("function_call", "custom_tool_call", "local_shell_call")  # Responses output items that call a tool


def _args(text) -> dict:
    try:
        v = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError:
        return {"_raw": text}
    return v if isinstance(v, dict) else {"_raw": v}


def _item_tool(it: dict) -> dict:
    if it.get("type") == "function_call":
        return {"name": it.get("name"), "input": _args(it.get("arguments") or "{}")}
    if it.get("type") == "custom_tool_call":
        return {"name": it.get("name"), "input": {"input": it.get("input")}}
    return {"name": "local_shell", "input": {"command": (it.get("action") or {}).get("command")}}


class UsageParser:
    """Fed the response bytes as they pass; `result()` gives normalized usage, model and the tool calls the model
    made (name and input each, so a run's proxy log can become a replay script)."""

    def __init__(self, kind: str, sse: bool) -> None:
        self.kind, self.sse = kind, sse
        self.raw_usage: dict = {}
        self.model: str | None = None
        self.tools: list[dict] = []
        self.text: list[str] = []  # the answer's text (kept for replay scripts; see MAX_TEXT)
        self.error = ""
        self._buf = bytearray()
        self._data: list[bytes] = []
        self._open: dict = {}  # streamed tool calls still being assembled, by block / call index

    def feed(self, data: bytes) -> None:
        if self.kind not in ("anthropic", "responses", "chat"):
            return
        if not self.sse:
            if len(self._buf) + len(data) <= MAX_JSON_BODY:
                self._buf += data
            return
        self._buf += data
        *lines, rest = self._buf.split(b"\n")
        self._buf = bytearray(rest)
        for line in lines:
            line = line.rstrip(b"\r")
            if not line:
                self._dispatch()
            elif line.startswith(b"data:"):
                self._data.append(bytes(line[5:].lstrip(b" ")))

    def _dispatch(self) -> None:
        if not self._data:
            return
        data, self._data = b"\n".join(self._data), []
        if data.strip() == b"[DONE]":
            return
        try:
            ev = json.loads(data)
        except json.JSONDecodeError:
            return
        if isinstance(ev, dict):
            self._event(ev)

    def _event(self, ev: dict) -> None:
        t = ev.get("type")
        if self.kind == "anthropic":
            if t == "message_start":
                msg = ev.get("message") or {}
                self.model = msg.get("model") or self.model
                self.raw_usage = dict(msg.get("usage") or {})
            elif t == "message_delta":
                self.raw_usage.update({k: v for k, v in (ev.get("usage") or {}).items() if v is not None})
            elif t == "content_block_start" and (ev.get("content_block") or {}).get("type") == "tool_use":
                self._open[ev.get("index")] = [ev["content_block"].get("name"), ""]
            elif t == "content_block_delta" and ev.get("index") in self._open:
                self._open[ev["index"]][1] += (ev.get("delta") or {}).get("partial_json") or ""
            elif t == "content_block_delta" and (ev.get("delta") or {}).get("type") == "text_delta":
                self.text.append(ev["delta"].get("text") or "")
            elif t == "content_block_stop" and ev.get("index") in self._open:
                name, js = self._open.pop(ev["index"])
                self.tools.append({"name": name, "input": _args(js or "{}")})
            elif t == "error":
                self.error = json.dumps(ev.get("error"))[:300]
        elif self.kind == "responses":
            if t in ("response.completed", "response.incomplete", "response.failed"):
                r = ev.get("response") or {}
                self.model = r.get("model") or self.model
                self.raw_usage = dict(r.get("usage") or {})
                if t == "response.failed":
                    self.error = json.dumps(r.get("error"))[:300]
            elif t == "response.output_item.done" and (ev.get("item") or {}).get("type") in TOOL_ITEMS:
                self.tools.append(_item_tool(ev["item"]))
            elif t == "response.output_text.delta":
                self.text.append(ev.get("delta") or "")
            elif t == "error":
                self.error = json.dumps(ev)[:300]
        elif self.kind == "chat":
            self.model = ev.get("model") or self.model
            if ev.get("usage"):
                self.raw_usage = dict(ev["usage"])
            for ch in ev.get("choices") or []:
                self.text.append((ch.get("delta") or {}).get("content") or "")
                for tc in (ch.get("delta") or {}).get("tool_calls") or []:
                    c = self._open.setdefault((ch.get("index"), tc.get("index")), ["", ""])
                    fn = tc.get("function") or {}
                    c[0] += fn.get("name") or ""
                    c[1] += fn.get("arguments") or ""

    def _json_body(self) -> None:
        try:
            body = json.loads(self._buf)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return
        if not isinstance(body, dict):
            return
        if body.get("type") == "error" or ("error" in body and "usage" not in body):
            self.error = json.dumps(body.get("error"))[:300]
        self.model = body.get("model") or self.model
        self.raw_usage = dict(body.get("usage") or {})
        if self.kind == "anthropic":
            blocks = [b for b in body.get("content") or [] if isinstance(b, dict)]
            self.tools = [{"name": b.get("name"), "input": b.get("input") or {}} for b in blocks if b.get("type") == "tool_use"]
            self.text = [str(b.get("text") or "") for b in blocks if b.get("type") == "text"]
        elif self.kind == "responses":
            items = [it for it in body.get("output") or [] if isinstance(it, dict)]
            self.tools = [_item_tool(it) for it in items if it.get("type") in TOOL_ITEMS]
            self.text = [str(p.get("text") or "") for it in items if it.get("type") == "message"
                         for p in it.get("content") or [] if isinstance(p, dict) and p.get("type") == "output_text"]
        elif self.kind == "chat":
            msgs = [c.get("message") or {} for c in body.get("choices") or [] if isinstance(c, dict)]
            self.tools = [{"name": (tc.get("function") or {}).get("name"),
                           "input": _args((tc.get("function") or {}).get("arguments") or "{}")}
                          for m in msgs for tc in m.get("tool_calls") or []]
            self.text = [str(m.get("content") or "") for m in msgs]

    def result(self) -> dict:
        if self.sse:
            self.feed(b"\n\n")
            if self.kind == "chat":
                self.tools = [{"name": n, "input": _args(a or "{}")} for _, (n, a) in sorted(
                    self._open.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1] or 0))]
        else:
            self._json_body()
        u = self.raw_usage
        g = lambda d, k: int((d or {}).get(k) or 0)
        if self.kind == "anthropic":
            tok = {"input_uncached": g(u, "input_tokens"), "cache_read": g(u, "cache_read_input_tokens"),
                   "cache_write": g(u, "cache_creation_input_tokens"), "output": g(u, "output_tokens"),
                   "reasoning": 0}
        elif self.kind == "responses":
            d = u.get("input_tokens_details")
            cached, written = g(d, "cached_tokens"), g(d, "cache_write_tokens")
            tok = {"input_uncached": g(u, "input_tokens") - cached - written, "cache_read": cached,
                   "cache_write": written,
                   "output": g(u, "output_tokens"), "reasoning": g(u.get("output_tokens_details"), "reasoning_tokens")}
        elif self.kind == "chat":
            d = u.get("prompt_tokens_details")
            cached, written = g(d, "cached_tokens"), g(d, "cache_write_tokens")
            tok = {"input_uncached": g(u, "prompt_tokens") - cached - written, "cache_read": cached,
                   "cache_write": written,
                   "output": g(u, "completion_tokens"),
                   "reasoning": g(u.get("completion_tokens_details"), "reasoning_tokens")}
        else:
            tok = dict.fromkeys(TOKEN_FIELDS, 0)
        tok["context"] = tok["input_uncached"] + tok["cache_read"] + tok["cache_write"]
        return {**tok, "usage_seen": bool(u), "response_model": self.model, "tool_calls": len(self.tools),
                "tools": self.tools, "text": "".join(self.text)[:MAX_TEXT], "error": self.error}


# ---------------------------------------------------------------------------------------- proxy


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False


class Proxy:
    """The accounting proxy, serving in background threads (context manager)."""

    def __init__(self, upstream: str, *, port: int | None = 0, host: str = "127.0.0.1",
                 unix_path: str | Path | None = None, main_model: str | None = None,
                 classify: Callable[[str, dict], str] | None = None, keys: dict[str, str] | None = None,
                 log_path: str | Path | None = None, prices: dict | None = None, timeout_s: float = 900.0) -> None:
        if port is None and unix_path is None:
            raise ValueError("proxy: give a TCP port, a unix socket path, or both")
        u = urlsplit(upstream)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"proxy: upstream must be an http(s) URL, got {upstream!r}")
        self.upstream = upstream
        self._up = (u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80), u.path.rstrip("/"))
        self.classify = classify or (lambda kind, body: call_purpose(kind, body, main_model))
        self.keys = {"anthropic": os.environ.get("ANTHROPIC_API_KEY", ""),
                     "openai": os.environ.get("OPENAI_API_KEY", "")} if keys is None else dict(keys)
        self.prices = PRICES if prices is None else prices
        self.timeout_s = timeout_s
        self.log_path = Path(log_path) if log_path else None
        self.calls: list[dict] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition()
        self._inflight = 0
        self._ssl = ssl.create_default_context() if u.scheme == "https" else None
        self._servers: list[socketserver.BaseServer] = []
        self.fake = None  # the FakeServer for_agent started as upstream (close() stops it)
        self._folder: Path | None = None  # for_agent's socket folder (close() removes it)
        self._threads: list[threading.Thread] = []
        handler = _make_handler(self)
        self.unix_path = str(unix_path) if unix_path is not None else None
        try:
            if port is not None:
                tcp = ThreadingHTTPServer((host, port), handler)
                tcp.daemon_threads = True
                self._servers.append(tcp)
            if self.unix_path is not None:
                Path(self.unix_path).unlink(missing_ok=True)
                unix = _UnixHTTPServer(self.unix_path, handler)
                os.chmod(self.unix_path, 0o666)
                self._servers.append(unix)
        except BaseException:
            self._close_servers()
            raise

    @classmethod
    def for_agent(cls, agent: str, *, upstream: str | None = None, script: str | Path | None = None,
                  log_dir: str | Path | None = None, main_model: str | None = None) -> Proxy:
        """A trial's proxy (call start(), then close()): upstream = a fake server serving `script` when one is given
        (replay, or any agent run offline on a script), else `upstream`, else the agent's API (DEFAULT_UPSTREAMS).
        Listens on a free TCP port and on `<fresh temp folder>/proxy.sock`; logs calls to log_dir/proxy_calls.jsonl
        (and the fake server's to log_dir/fake_server.jsonl)."""
        from bench.harness.fake_server import FakeServer

        if script is None and agent == "replay":
            raise ValueError("proxy: the replay agent needs a script")
        if script is None and upstream is None and agent not in DEFAULT_UPSTREAMS:
            raise ValueError(f"proxy: no default model API for agent {agent!r}; give an upstream URL")
        log = Path(log_dir) if log_dir is not None else None
        if log is not None:
            log.mkdir(parents=True, exist_ok=True)
        fake = None
        if script is not None:
            fake = FakeServer(script, log_path=log / "fake_server.jsonl" if log else None,
                              model="replay" if agent == "replay" else "fake-model").start()
        folder = Path(tempfile.mkdtemp(prefix="ate-proxy-"))
        os.chmod(folder, 0o755)
        try:
            p = cls(fake.url if fake else upstream or DEFAULT_UPSTREAMS[agent], port=0, unix_path=folder / "proxy.sock",
                    main_model=main_model, keys={} if fake else None,
                    log_path=log / "proxy_calls.jsonl" if log else None)
        except BaseException:
            if fake:
                fake.stop()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        p.fake, p._folder = fake, folder
        return p

    @property
    def port(self) -> int | None:
        tcp = [s for s in self._servers if isinstance(s, ThreadingHTTPServer)]
        return tcp[0].server_address[1] if tcp else None

    @property
    def url(self) -> str | None:
        tcp = [s for s in self._servers if isinstance(s, ThreadingHTTPServer)]
        return f"http://{tcp[0].server_address[0]}:{tcp[0].server_address[1]}" if tcp else None

    def start(self) -> Proxy:
        for s in self._servers:
            t = threading.Thread(target=s.serve_forever, args=(0.05,), name="accounting-proxy", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for s in self._servers if self._threads else []:
            s.shutdown()
        for t in self._threads:
            t.join()
        self._threads.clear()
        self._close_servers()

    def _close_servers(self) -> None:
        for s in self._servers:
            s.server_close()
        if self.unix_path:
            Path(self.unix_path).unlink(missing_ok=True)
        fake, folder, self.fake, self._folder = self.fake, self._folder, None, None
        if fake is not None:
            fake.stop()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    close = stop

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def record(self, rec: dict) -> None:
        with self._lock:
            self.calls.append(rec)
            if self.log_path:
                with self.log_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")

    def _begin_call(self) -> None:
        with self._idle:
            self._inflight += 1

    def _end_call(self) -> None:
        with self._idle:
            self._inflight -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout_s: float = 5.0) -> bool:
        """Wait until no call is in flight (e.g. an agent killed mid-stream); False if still busy."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout_s)

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()

    # ------------------------------------------------------------------------------------ summary

    def summary(self, wait_s: float = 5.0) -> dict:
        """Totals over every recorded call (side calls cost tokens too); turns and context over the main calls the
        API answered (an HTTP error or unreachable upstream is a failed call, not a turn). Waits up to `wait_s`
        for calls still in flight."""
        self.wait_idle(wait_s)
        with self._lock:
            calls = [dict(c) for c in self.calls]
        gen = [c for c in calls if c["api"] in ("anthropic", "responses", "chat") and 0 < c["status"] < 400]
        main = [c for c in gen if c["main_agent"]]
        out: dict = {"agent_turns": len(main), "model_calls": len(gen), "side_calls": len(gen) - len(main),
                     "failed_calls": sum(bool(c["error"]) or not 0 < c["status"] < 400 for c in calls)}
        for f in TOKEN_FIELDS:
            out[f"{f}_tokens"] = sum(c[f] for c in calls)
        out["compactions"] = sum(c["purpose"] == "compact" for c in gen)
        out["side_tokens"] = {f: sum(c[f] for c in gen if not c["main_agent"]) for f in TOKEN_FIELDS}
        out["per_turn_context_p50"] = float(statistics.median(c["context"] for c in main)) if main else 0.0
        out["model_tool_calls"] = sum(c["tool_calls"] for c in main)
        cost, unknown = 0.0, sorted({c["model"] or "?" for c in gen if self._price(c) is None and _billed(c)})
        for c in gen:
            p = self._price(c)
            if p is not None:
                cost += (c["input_uncached"] * p[0] + c["cache_read"] * p[1] + c["cache_write"] * p[2]
                         + c["output"] * p[3]) / 1e6
        out["cost_usd"] = None if unknown else round(cost, 6)
        out["price_source"] = f"no price for model {', '.join(unknown)}" if unknown else PRICE_SOURCE
        out["calls"] = calls
        out["events"] = self.events(calls)
        return out

    def _price(self, c: dict):
        return price_of(c["model"], self.prices) or price_of(c.get("response_model"), self.prices)

    @staticmethod
    def events(calls: list[dict]) -> list[Event]:
        evs = []
        for c in calls:
            if c["api"] not in ("anthropic", "responses", "chat"):
                continue
            d = f"{c['api']} {c['model']} {c['purpose']}"
            evs += [Event(c["t_start"], "model_call_start", d), Event(c["t_end"], "model_call_end", d)]
        return sorted(evs, key=lambda e: e.t)

    # ------------------------------------------------------------------------------------ forwarding

    def connect(self) -> http.client.HTTPConnection:
        scheme, hostname, port, _ = self._up
        if scheme == "https":
            return http.client.HTTPSConnection(hostname, port, timeout=self.timeout_s, context=self._ssl)
        return http.client.HTTPConnection(hostname, port, timeout=self.timeout_s)

    def auth_headers(self, kind: str, headers: dict[str, str]) -> dict[str, str]:
        """`headers` (lower-case names) with the host's key in place of the sandbox's dummy key."""
        lower = {k.lower() for k in headers}
        if kind in ("anthropic", "count_tokens") or "x-api-key" in lower or "anthropic-version" in lower:
            key = self.keys.get("anthropic")
            if key:
                if "authorization" in lower and "x-api-key" not in lower:
                    headers["authorization"] = f"Bearer {key}"
                else:
                    headers["x-api-key"] = key
                    headers.pop("authorization", None)
        else:
            key = self.keys.get("openai")
            if key:
                headers["authorization"] = f"Bearer {key}"
        return headers


def _billed(c: dict) -> bool:
    return any(c[f] for f in TOKEN_FIELDS)


def _read_body(rfile, headers) -> bytes:
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        parts = []
        while True:
            size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(rfile.read(size))
            rfile.readline()
    return rfile.read(int(headers.get("Content-Length") or 0))


def _make_handler(proxy: Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # calls are recorded; unix-socket peers have no address anyway
            pass

        def _error(self, code: int, msg: str) -> None:
            data = json.dumps({"type": "error", "error": {"type": "proxy_error", "message": msg}}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _forward(self) -> None:
            t0 = time.time()
            proxy._begin_call()
            try:
                self._forward_call(t0)
            finally:
                proxy._end_call()

        def _forward_call(self, t0: float) -> None:
            body = _read_body(self.rfile, self.headers)
            kind = api_kind(self.path)
            try:
                req = json.loads(body) if body else {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                req = {}
            req = req if isinstance(req, dict) else {}
            purpose = proxy.classify(kind, req)
            rec = {"t_start": t0, "t_end": t0, "latency_s": 0.0, "ttfb_s": None, "api": kind, "method": self.command,
                   "path": self.path, "model": req.get("model"), "response_model": None,
                   "stream": bool(req.get("stream")), "purpose": purpose, "main_agent": purpose == "main",
                   "status": 0, "tool_calls": 0, "tools": [], "text": "", "error": "", **dict.fromkeys(TOKEN_FIELDS, 0),
                   "context": 0}
            headers = {k.lower(): v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            headers = proxy.auth_headers(kind, headers)
            headers["content-length"] = str(len(body))
            conn = proxy.connect()
            try:
                conn.request(self.command, proxy._up[3] + self.path, body=body if body or self.command != "GET"
                             else None, headers=headers)
                resp = conn.getresponse()
            except OSError as e:
                conn.close()
                rec.update(t_end=time.time(), status=502, error=f"upstream unreachable: {e}")
                rec["latency_s"] = rec["t_end"] - t0
                proxy.record(rec)
                return self._error(502, f"accounting proxy: upstream {proxy.upstream} unreachable: {e}")
            rec["status"] = resp.status
            sse = "text/event-stream" in (resp.getheader("Content-Type") or "")
            parser = UsageParser(kind, sse)
            length = resp.getheader("Content-Length")
            chunked = length is None and self.command != "HEAD" and resp.status not in (204, 304)
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_HEADERS:
                    self.send_header(k, v)
            if length is not None:
                self.send_header("Content-Length", length)
            elif chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            state = {"client_ok": True, "done": False}

            def finish() -> None:  # record before the client's last bytes: a finished client => a recorded call
                if state["done"]:
                    return
                state["done"] = True
                res = parser.result()
                rec.update({k: res[k] for k in (*TOKEN_FIELDS, "context", "response_model", "tool_calls", "tools", "text")})
                if resp.status >= 400:
                    rec["error"] = rec["error"] or f"HTTP {resp.status} {res['error']}".strip()
                elif res["error"]:
                    rec["error"] = rec["error"] or res["error"]
                rec["t_end"] = time.time()
                rec["latency_s"] = rec["t_end"] - t0
                proxy.record(rec)

            def send(data: bytes) -> None:
                if state["client_ok"]:
                    try:
                        self.wfile.write(data)
                        self.wfile.flush()
                    except OSError:
                        state["client_ok"] = False
                        rec["error"] = rec["error"] or "client disconnected"

            sent, total = 0, int(length) if length is not None and length.isdigit() else None
            try:
                while True:
                    data = resp.read1(65536)
                    if not data:
                        break
                    if rec["ttfb_s"] is None:
                        rec["ttfb_s"] = time.time() - t0
                    parser.feed(data)
                    sent += len(data)
                    if total is not None and sent >= total:
                        finish()
                    send(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            except OSError as e:
                rec["error"] = f"upstream stream broke: {e}"
                self.close_connection = True
            finally:
                conn.close()
                finish()
            if chunked:
                send(b"0\r\n\r\n")
            if not state["client_ok"]:
                self.close_connection = True

        do_POST = do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

    return Handler


# ---------------------------------------------------------------------------------------- helpers


def unix_request(path: str, method: str, url: str, body: bytes | None = None,
                 headers: dict | None = None) -> tuple[int, bytes]:
    """One HTTP request over a unix socket (tests, health checks)."""
    conn = http.client.HTTPConnection("localhost")
    conn.sock = socket.socket(socket.AF_UNIX)
    conn.sock.connect(path)
    try:
        conn.request(method, url, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", required=True, help="API root, e.g. https://api.anthropic.com")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--unix")
    ap.add_argument("--log", help="JSONL file, one line per model call")
    ap.add_argument("--main-model")
    a = ap.parse_args(argv)
    p = Proxy(a.upstream, port=a.port if a.port is not None or a.unix else 0, unix_path=a.unix,
              main_model=a.main_model, log_path=a.log).start()
    print(f"accounting proxy -> {a.upstream} on {p.url or ''} {p.unix_path or ''}", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        p.stop()
        print(json.dumps({k: v for k, v in p.summary().items() if k not in ("calls", "events")}), flush=True)


if __name__ == "__main__":
    main()
