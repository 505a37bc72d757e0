"""Fake model server + accounting proxy: the proxy's counts must equal what the server returned, for every API,
streamed or not, with the stream passed through unchanged and unbuffered."""

from __future__ import annotations

import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from bench.harness.agents.replay import tool_to_bash
from bench.harness.fake_server import FakeServer, shell_call
from bench.harness.proxy import TOKEN_FIELDS, Proxy, UsageParser, price_of, unix_request

SCRIPT = [
    {"bash": ["echo hello > out.txt", "ls"], "text": "Creating it.",
     "usage": {"input": 1200, "cache_read": 3000, "cache_write": 500, "output": 40, "reasoning": 8}},
    {"bash": ["cat out.txt"], "usage": {"input": 300, "cache_read": 4200, "cache_write": 100, "output": 20}},
    {"bash": None, "text": "Done.", "usage": {"input": 50, "cache_read": 4500, "cache_write": 0, "output": 12,
                                              "reasoning": 3}},
]
CLAUDE_TOOLS = [{"name": "Read", "input_schema": {"properties": {"file_path": {"type": "string"}}}},
                {"name": "Bash", "input_schema": {"properties": {"command": {"type": "string"},
                                                                 "timeout": {"type": "number"}}}}]
CODEX_TOOLS = [{"type": "function", "name": "exec_command", "parameters": {"properties": {"cmd": {"type": "string"}}}},
               {"type": "custom", "name": "apply_patch"}]
CHAT_TOOLS = [{"type": "function", "function": {"name": "bash", "parameters": {
    "properties": {"command": {"type": "string"}}}}}]
REQUESTS = {  # api -> (path, request body without `stream`)
    "anthropic": ("/v1/messages?beta=true", {"model": "claude-opus-5-5", "max_tokens": 100, "tools": CLAUDE_TOOLS,
                                             "messages": [{"role": "user", "content": "hi"}]}),
    "responses": ("/v1/responses", {"model": "gpt-5", "tools": CODEX_TOOLS, "input": "hi"}),
    "chat": ("/v1/chat/completions", {"model": "gpt-5", "tools": CHAT_TOOLS, "stream_options": {"include_usage": True},
                                      "messages": [{"role": "user", "content": "hi"}]}),
}


def post(url: str, path: str, body: dict, headers: dict | None = None) -> tuple[int, bytes]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def sse_events(raw: bytes) -> list[dict]:
    out = []
    for block in raw.decode().split("\n\n"):
        data = [ln[5:].strip() for ln in block.splitlines() if ln.startswith("data:")]
        if data and data[0] != "[DONE]":
            out.append(json.loads(data[0]))
    return out


def expected(turn: dict, api: str) -> dict:
    u = {"input": 0, "cache_read": 0, "cache_write": 0, "output": 0, "reasoning": 0, **turn["usage"]}
    return {"input_uncached": u["input"], "cache_read": u["cache_read"], "cache_write": u["cache_write"],
            "output": u["output"], "reasoning": 0 if api == "anthropic" else u["reasoning"]}


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("api", ["anthropic", "responses", "chat"])
def test_proxy_counts_equal_fake_server(api, stream):
    path, body = REQUESTS[api]
    with FakeServer(SCRIPT) as fs, Proxy(fs.url, keys={}) as proxy:
        for _ in SCRIPT:
            status, raw = post(proxy.url, path, dict(body, stream=stream))
            assert status == 200, raw
        s = proxy.summary()
    assert [c["main_agent"] for c in fs.log] == [True] * 3
    assert s["agent_turns"] == 3 and s["side_calls"] == 0
    for call, rec, turn in zip(s["calls"], fs.log, SCRIPT):
        want = expected(turn, api)
        assert {f: call[f] for f in TOKEN_FIELDS} == want
        assert {f: rec["usage"][f if f != "input_uncached" else "input"] for f in TOKEN_FIELDS} == want
        assert call["context"] == want["input_uncached"] + want["cache_read"] + want["cache_write"]
        assert call["tool_calls"] == rec["tool_calls"] == len(turn["bash"] or [])
        assert [tool_to_bash(t["name"], t["input"]) for t in call["tools"]] == (turn["bash"] or [])
        assert call["text"] == turn.get("text", "")
    for f in TOKEN_FIELDS:
        assert s[f"{f}_tokens"] == sum(expected(t, api)[f] for t in SCRIPT)
    assert s["per_turn_context_p50"] == 4600.0  # contexts 4700, 4600, 4550
    assert s["model_tool_calls"] == 3


def test_openai_input_includes_cached_tokens():
    """OpenAI input_tokens include cached (and cache-write) tokens; Anthropic input_tokens exclude them."""
    u = {"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 700, "cache_write_tokens": 100},
         "output_tokens": 50, "output_tokens_details": {"reasoning_tokens": 20}}
    p = UsageParser("responses", sse=True)
    p.feed(b'event: response.completed\ndata: ' + json.dumps({"type": "response.completed", "response": {
        "model": "gpt-5", "usage": u}}).encode() + b"\n\n")
    r = p.result()
    assert (r["input_uncached"], r["cache_read"], r["cache_write"], r["output"], r["reasoning"]) == (200, 700, 100, 50, 20)
    p = UsageParser("anthropic", sse=False)
    p.feed(json.dumps({"model": "m", "content": [], "usage": {"input_tokens": 10, "cache_read_input_tokens": 700,
                                                                "cache_creation_input_tokens": 5, "output_tokens": 3}}).encode())
    r = p.result()
    assert (r["input_uncached"], r["cache_read"], r["cache_write"], r["context"]) == (10, 700, 5, 715)


def test_anthropic_stream_events_and_split_chunks():
    """Every event Claude Code needs is there, and the parser copes with events split at any byte."""
    with FakeServer(SCRIPT) as fs:
        _, raw = post(fs.url, *REQUESTS["anthropic"][:1], dict(REQUESTS["anthropic"][1], stream=True))
    types = [e["type"] for e in sse_events(raw)]
    for t in ("message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
              "message_stop"):
        assert t in types
    evs = sse_events(raw)
    assert evs[0]["message"]["usage"]["cache_read_input_tokens"] == 3000
    tool = [e for e in evs if e["type"] == "content_block_start" and e["content_block"]["type"] == "tool_use"]
    assert [t["content_block"]["name"] for t in tool] == ["Bash", "Bash"]
    deltas = [json.loads(e["delta"]["partial_json"]) for e in evs if e["type"] == "content_block_delta"
              and e["delta"]["type"] == "input_json_delta"]
    assert deltas == [{"command": "echo hello > out.txt"}, {"command": "ls"}]
    p = UsageParser("anthropic", sse=True)
    for i in range(0, len(raw), 7):
        p.feed(raw[i:i + 7].replace(b"\n", b"\r\n"))
    r = p.result()
    assert (r["input_uncached"], r["cache_read"], r["cache_write"], r["output"], r["tool_calls"]) == (1200, 3000, 500, 40, 2)


def test_shell_tool_forms():
    assert shell_call(CLAUDE_TOOLS, "ls") == ("Bash", {"command": "ls"})
    assert shell_call(CODEX_TOOLS, "ls") == ("exec_command", {"cmd": "ls"})
    shell = [{"type": "function", "name": "shell", "parameters": {"properties": {"command": {"type": "array"}}}}]
    assert shell_call(shell, "ls") == ("shell", {"command": ["bash", "-lc", "ls"]})
    with pytest.raises(LookupError):
        shell_call([{"name": "Read", "input_schema": {"properties": {"file_path": {}}}}], "ls")


def test_passthrough_is_byte_identical():
    """Identical scripts give identical bytes; through the proxy the client must get exactly those bytes."""
    for api, (path, body) in REQUESTS.items():
        body = dict(body, stream=True)
        with FakeServer(SCRIPT) as direct, FakeServer(SCRIPT) as behind, Proxy(behind.url, keys={}) as proxy:
            a = [post(direct.url, path, body)[1] for _ in SCRIPT]
            b = [post(proxy.url, path, body)[1] for _ in SCRIPT]
        assert a == b, api


class _SlowSSE(BaseHTTPRequestHandler):
    """Upstream that sends one event, then waits before the rest: a buffering proxy would hold the first."""
    protocol_version = "HTTP/1.1"
    gate = threading.Event()

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        first = b'event: message_start\ndata: {"type":"message_start","message":{"model":"m","usage":{"input_tokens":5}}}\n\n'
        self.wfile.write(b"%x\r\n%s\r\n" % (len(first), first))
        self.wfile.flush()
        self.gate.wait(10)
        last = b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":7}}\n\n'
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(last), last))


def test_stream_is_not_buffered():
    up = ThreadingHTTPServer(("127.0.0.1", 0), _SlowSSE)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    try:
        with Proxy(f"http://127.0.0.1:{up.server_address[1]}", keys={}) as proxy:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            conn.request("POST", "/v1/messages", body=b'{"stream": true}', headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            first = r.read1(65536)
            assert b"message_start" in first and b"message_delta" not in first  # arrived before the upstream finished
            _SlowSSE.gate.set()
            rest = r.read()
            conn.close()
            deadline = time.time() + 5
            while not proxy.calls and time.time() < deadline:
                time.sleep(0.02)
            c = proxy.calls[0]
        assert b"message_delta" in rest
        assert (c["input_uncached"], c["output"], c["main_agent"]) == (5, 7, False)  # no tools offered: side call
    finally:
        up.shutdown()
        up.server_close()


def test_side_calls_do_not_consume_turns():
    path, body = REQUESTS["anthropic"]
    with FakeServer(SCRIPT) as fs, Proxy(fs.url, keys={}) as proxy:
        side = {"model": "claude-haiku-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": "title?"}]}
        assert post(proxy.url, path, dict(side, stream=True))[0] == 200
        status, raw = post(proxy.url, "/v1/messages/count_tokens", {"model": "x", "messages": []})
        assert status == 200 and json.loads(raw)["input_tokens"] > 0
        _, raw = post(proxy.url, path, dict(body, stream=True))
        s = proxy.summary()
    assert [r["turn"] for r in fs.log] == [None, None, 0]
    assert [r["main_agent"] for r in fs.log] == [False, False, True]
    assert b"Creating it." in raw  # the main call still got turn 0
    assert (s["agent_turns"], s["side_calls"], s["model_calls"]) == (1, 1, 2)
    assert s["side_tokens"]["output"] == fs.log[0]["usage"]["output"]
    assert [c["api"] for c in s["calls"]] == ["anthropic", "count_tokens", "anthropic"]
    assert [e.kind for e in s["events"]] == ["model_call_start", "model_call_end"] * 2


def test_main_model_rule_and_exhausted_script():
    path, body = REQUESTS["anthropic"]
    with FakeServer(SCRIPT[2:], main_model="claude-opus-5-5") as fs, \
            Proxy(fs.url, keys={}, main_model="claude-opus-5-5") as proxy:
        post(proxy.url, path, dict(body, model="claude-haiku-4-5"))  # has tools but another model: side call
        post(proxy.url, path, body)
        _, raw = post(proxy.url, path, body)
        s = proxy.summary()
    assert [r["main_agent"] for r in fs.log] == [c["main_agent"] for c in s["calls"]] == [False, True, True]
    assert [r["turn"] for r in fs.log] == [None, 0, None]
    assert json.loads(raw)["content"][0]["text"] == "script exhausted."


def test_unix_socket_and_log_endpoint(tmp_path):
    sock = str(tmp_path / "proxy.sock")
    path, body = REQUESTS["responses"]
    with FakeServer(SCRIPT, log_path=tmp_path / "fs.jsonl") as fs, Proxy(fs.url, port=None, unix_path=sock,
                                                                         keys={}) as proxy:
        assert proxy.url is None
        status, raw = unix_request(sock, "POST", path, json.dumps(dict(body, stream=True)).encode(),
                                   {"Content-Type": "application/json"})
        assert status == 200 and b"response.completed" in raw
        status, raw = unix_request(sock, "GET", "/_log")  # any path is forwarded
        assert status == 200 and json.loads(raw)[0]["usage"]["cache_read"] == 3000
        assert proxy.summary()["agent_turns"] == 1
    assert not (tmp_path / "proxy.sock").exists()
    assert json.loads((tmp_path / "fs.jsonl").read_text().splitlines()[0])["turn"] == 0


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        data = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.mark.parametrize("keys", [{}, {"anthropic": "sk-ant-REAL", "openai": "sk-REAL"}])
def test_key_substitution(keys):
    up = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    try:
        with Proxy(f"http://127.0.0.1:{up.server_address[1]}", keys=keys) as proxy:
            _, a = post(proxy.url, "/v1/messages", {}, {"x-api-key": "dummy", "anthropic-version": "2023-06-01"})
            _, o = post(proxy.url, "/v1/responses", {}, {"Authorization": "Bearer dummy"})
    finally:
        up.shutdown()
        up.server_close()
    a, o = json.loads(a), json.loads(o)
    assert a["x-api-key"] == keys.get("anthropic", "dummy") and "authorization" not in a
    assert o["authorization"] == f"Bearer {keys.get('openai', 'dummy')}"
    assert a.get("accept-encoding", "identity") == "identity"  # uncompressed, so usage can be read


def test_cost_and_unknown_model():
    path, body = REQUESTS["anthropic"]
    with FakeServer(SCRIPT) as fs, Proxy(fs.url, keys={}) as proxy:
        post(proxy.url, path, body)
        s = proxy.summary()
        post(proxy.url, path, dict(body, model="mystery-model"))
        s2 = proxy.summary()
    assert s["cost_usd"] == pytest.approx((1200 * 4 + 3000 * 0.2 + 500 * 5 + 40 * 20) / 1e6)
    assert s2["cost_usd"] is None and "mystery-model" in s2["price_source"]
    assert price_of("anthropic/claude-sonnet-4-5-20250929") == price_of("claude-sonnet-4-5")
    assert price_of("gpt-5-2025-08-07") == price_of("gpt-5") and price_of("gpt-5.5") is None


def test_upstream_down_is_recorded():
    with Proxy("http://127.0.0.1:9", keys={}) as proxy:
        status, _ = post(proxy.url, *REQUESTS["chat"][:1], REQUESTS["chat"][1])
        s = proxy.summary()
    assert status == 502 and s["failed_calls"] == 1 and "unreachable" in s["calls"][0]["error"]
    assert s["model_calls"] == s["agent_turns"] == 0
