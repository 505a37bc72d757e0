"""Fake model server driven by a script of turns: lets tests (and replays) run real agent CLIs offline with
known token counts, so the accounting proxy can be checked against what the server actually returned.

Speaks, streaming (SSE) and not:
  Anthropic Messages      POST /v1/messages[?beta=true], POST /v1/messages/count_tokens
  OpenAI Responses        POST /v1/responses
  OpenAI Chat Completions POST /v1/chat/completions
  plus GET /v1/models (a one-model list) and GET /_log (this server's request log as JSON).

Script (a JSON file or a list): one entry per main-agent model call, in order:

    [{"bash": ["echo hello > out.txt"], "text": "Creating the file.",
      "usage": {"input": 1200, "cache_read": 3000, "cache_write": 500, "output": 40, "reasoning": 8}},
     {"bash": ["cat out.txt"], "usage": {...}},
     {"bash": null, "text": "Done: out.txt holds hello.", "usage": {...}}]

The i-th main-agent request gets turn i. `bash` commands become tool calls in the form the client asked for:
the shell tool is picked from the request's own `tools` (Claude Code `Bash` {"command"}, Codex `exec_command`
{"cmd"} or `shell` {"command": [argv]}, our openai agent `bash` {"command"}); several commands = parallel calls
in one reply. `text` precedes the tool calls; a turn without commands is a plain-text answer that ends the
session. Past the end of the script the server answers "script exhausted." (logged with turn None).
`usage` is what the reply reports; fields mean the same for every API:
  input = uncached input tokens, cache_read / cache_write = cached input read / written,
  output = all output tokens (reasoning included), reasoning = the reasoning part of output.
Anthropic reports input_tokens=input, cache_read_input_tokens, cache_creation_input_tokens, output_tokens
(no reasoning field, so it is reported as 0); OpenAI reports input_tokens (prompt_tokens) = input + cache_read +
cache_write, with input_tokens_details.cached_tokens = cache_read and .cache_write_tokens = cache_write (the
field Codex 0.169 reads into its cache_write_input_tokens), output_tokens incl. reasoning_tokens.
A turn without `usage` gets input = request bytes // 4, output = 10.

Requests that are not main-agent calls (proxy.call_purpose: no tools offered, count_tokens, another model
than `main_model` when one is set, or a context compaction) get a short text answer (`side_text`; for a compaction, the
<analysis>/<summary> text Claude Code expects), never consume a turn, and are logged with main_agent false. Every request is logged (time, api, path, model, stream, main_agent, turn, usage it
returned in the fields above, or None when nothing is billed, tool_calls) to memory, to `log_path` as JSONL,
and at GET /_log.

    python -m bench.harness.fake_server --script FILE --port N [--log FILE]
    with FakeServer("script.json") as fs: ...  # fs.url, fs.log
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from bench.harness.proxy import api_kind, call_purpose

SHELL_TOOL_NAMES = ("Bash", "bash", "exec_command", "shell", "run_shell_command")
COMPACT_TEXT = "<analysis>Fake analysis.</analysis>\n<summary>Fake summary: the task is in progress.</summary>"
CREATED_AT = 1_700_000_000  # fixed timestamps and counter-based ids: identical scripts give identical bytes


def load_script(script: list | str | Path) -> list[dict]:
    turns = json.loads(Path(script).read_text()) if isinstance(script, str | Path) else script
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ValueError("fake_server: a script is a JSON list of turn objects")
    for i, t in enumerate(turns):
        bad = set(t) - {"bash", "text", "usage"}
        if bad:
            raise ValueError(f"fake_server: turn {i}: unknown key {sorted(bad)[0]!r}")
        if t.get("bash") is not None and not (isinstance(t["bash"], list) and all(isinstance(c, str) for c in t["bash"])):
            raise ValueError(f"fake_server: turn {i}: bash must be a list of strings or null")
    return turns


def _tool_schema(tool: dict) -> tuple[str, dict]:
    """(name, JSON-schema properties) of an Anthropic, Responses or Chat Completions tool definition."""
    fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    schema = fn.get("input_schema") or fn.get("parameters") or {}
    return str(fn.get("name", "")), (schema.get("properties") or {}) if isinstance(schema, dict) else {}


def shell_call(tools: list, cmd: str) -> tuple[str, dict]:
    """The request's shell tool and the arguments that run `cmd` with it."""
    named = {}
    for t in tools or []:
        if isinstance(t, dict):
            name, props = _tool_schema(t)
            if name:
                named[name] = props
    name = next((n for n in SHELL_TOOL_NAMES if n in named), None)
    if name is None:
        name = next((n for n, p in named.items() if "cmd" in p or "command" in p), None)
    if name is None:
        raise LookupError(f"no shell tool among {sorted(named)}")
    props = named[name]
    if "cmd" in props:
        # Codex's exec_command returns after `yield_time_ms` and leaves a longer command running in the
        # background; a scripted agent cannot poll it, so ask to wait for the command to finish.
        return name, {"cmd": cmd, **({"yield_time_ms": 600_000} if "yield_time_ms" in props else {})}
    if props.get("command", {}).get("type") == "array":
        return name, {"command": ["bash", "-lc", cmd]}
    return name, {"command": cmd}


def _sse(event: str | None, data: dict | str) -> bytes:
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + f"data: {body}\n\n".encode()


class FakeServer:
    """The server in a background thread (context manager). `port=0` picks a free port."""

    def __init__(self, script: list | str | Path, *, port: int = 0, host: str = "127.0.0.1",
                 log_path: str | Path | None = None, main_model: str | None = None, model: str = "fake-model",
                 dump_requests: bool = False, side_text: str = "Fake session") -> None:
        self.turns = load_script(script)
        self.side_text = side_text  # the answer to side calls (no tools offered): a title, or a judge's verdict
        self.main_model, self.model, self.dump_requests = main_model, model, dump_requests
        self.log: list[dict] = []
        self.log_path = Path(log_path) if log_path else None
        self._next_turn = 0
        self._n = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self._httpd.server_address[0]}:{self.port}"

    @property
    def main_log(self) -> list[dict]:
        return [r for r in self.log if r["main_agent"]]

    def start(self) -> FakeServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="fake-model-server",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------ turns

    def take(self, main: bool) -> tuple[int | None, dict, int]:
        """(turn index or None, turn, request number): main calls consume the next scripted turn."""
        with self._lock:
            self._n += 1
            if not main:
                return None, {}, self._n
            i = self._next_turn
            self._next_turn += 1
        if i < len(self.turns):
            return i, self.turns[i], self._n
        return None, {"bash": None, "text": "script exhausted."}, self._n

    def record(self, rec: dict) -> None:
        with self._lock:
            self.log.append(rec)
            if self.log_path:
                with self.log_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")


def _usage(turn: dict, body_len: int, main: bool) -> dict:
    u = {"input": max(1, body_len // 4), "cache_read": 0, "cache_write": 0, "output": 10, "reasoning": 0}
    if not main:
        u["output"] = 5
    u.update({k: int(v) for k, v in (turn.get("usage") or {}).items() if k in u})
    return u


# ---------------------------------------------------------------------------------------- replies


def anthropic_reply(body: dict, turn: dict, usage: dict, n: int, model: str) -> tuple[list[bytes], dict, int]:
    """(SSE events, non-streaming JSON message, tool-call count) for the Messages API."""
    blocks: list[dict] = []
    if turn.get("text") or not turn.get("bash"):
        blocks.append({"type": "text", "text": turn.get("text") or "OK."})
    for j, cmd in enumerate(turn.get("bash") or []):
        name, args = shell_call(body.get("tools"), cmd)
        blocks.append({"type": "tool_use", "id": f"toolu_fake{n:04d}_{j}", "name": name, "input": args})
    calls = sum(b["type"] == "tool_use" for b in blocks)
    stop = "tool_use" if calls else "end_turn"
    u_start = {"input_tokens": usage["input"], "cache_creation_input_tokens": usage["cache_write"],
               "cache_read_input_tokens": usage["cache_read"], "output_tokens": 1}
    msg = {"id": f"msg_fake{n:04d}", "type": "message", "role": "assistant", "model": model, "content": [],
           "stop_reason": None, "stop_sequence": None, "usage": u_start}
    ev = [_sse("message_start", {"type": "message_start", "message": msg}), _sse("ping", {"type": "ping"})]
    for i, b in enumerate(blocks):
        if b["type"] == "text":
            ev.append(_sse("content_block_start", {"type": "content_block_start", "index": i,
                                                   "content_block": {"type": "text", "text": ""}}))
            ev.append(_sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                                   "delta": {"type": "text_delta", "text": b["text"]}}))
        else:
            ev.append(_sse("content_block_start", {"type": "content_block_start", "index": i, "content_block": {
                "type": "tool_use", "id": b["id"], "name": b["name"], "input": {}}}))
            ev.append(_sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(b["input"])}}))
        ev.append(_sse("content_block_stop", {"type": "content_block_stop", "index": i}))
    ev.append(_sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": usage["output"]}}))
    ev.append(_sse("message_stop", {"type": "message_stop"}))
    full = dict(msg, content=blocks, stop_reason=stop, usage=dict(u_start, output_tokens=usage["output"]))
    return ev, full, calls


def responses_reply(body: dict, turn: dict, usage: dict, n: int, model: str) -> tuple[list[bytes], dict, int]:
    """(SSE events, response object, tool-call count) for the Responses API."""
    items: list[dict] = []
    if turn.get("text") or not turn.get("bash"):
        items.append({"type": "message", "id": f"msg_fake{n:04d}", "status": "completed", "role": "assistant",
                      "content": [{"type": "output_text", "text": turn.get("text") or "OK.", "annotations": []}]})
    for j, cmd in enumerate(turn.get("bash") or []):
        name, args = shell_call(body.get("tools"), cmd)
        items.append({"type": "function_call", "id": f"fc_fake{n:04d}_{j}", "call_id": f"call_fake{n:04d}_{j}",
                      "name": name, "arguments": json.dumps(args), "status": "completed"})
    resp = {"id": f"resp_fake{n:04d}", "object": "response", "created_at": CREATED_AT + n, "status": "in_progress",
            "model": model, "output": [], "usage": None}
    seq = iter(range(1_000_000))
    ev = [_sse("response.created", {"type": "response.created", "sequence_number": next(seq), "response": resp})]
    for i, it in enumerate(items):
        if it["type"] == "message":
            text = it["content"][0]["text"]
            ev.append(_sse("response.output_item.added", {
                "type": "response.output_item.added", "sequence_number": next(seq), "output_index": i,
                "item": dict(it, status="in_progress", content=[])}))
            ev.append(_sse("response.content_part.added", {
                "type": "response.content_part.added", "sequence_number": next(seq), "item_id": it["id"],
                "output_index": i, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}))
            ev.append(_sse("response.output_text.delta", {
                "type": "response.output_text.delta", "sequence_number": next(seq), "item_id": it["id"],
                "output_index": i, "content_index": 0, "delta": text}))
            ev.append(_sse("response.output_text.done", {
                "type": "response.output_text.done", "sequence_number": next(seq), "item_id": it["id"],
                "output_index": i, "content_index": 0, "text": text}))
            ev.append(_sse("response.content_part.done", {
                "type": "response.content_part.done", "sequence_number": next(seq), "item_id": it["id"],
                "output_index": i, "content_index": 0, "part": it["content"][0]}))
        else:
            ev.append(_sse("response.output_item.added", {
                "type": "response.output_item.added", "sequence_number": next(seq), "output_index": i,
                "item": dict(it, status="in_progress", arguments="")}))
            ev.append(_sse("response.function_call_arguments.delta", {
                "type": "response.function_call_arguments.delta", "sequence_number": next(seq), "item_id": it["id"],
                "output_index": i, "delta": it["arguments"]}))
            ev.append(_sse("response.function_call_arguments.done", {
                "type": "response.function_call_arguments.done", "sequence_number": next(seq), "item_id": it["id"],
                "output_index": i, "arguments": it["arguments"]}))
        ev.append(_sse("response.output_item.done", {
            "type": "response.output_item.done", "sequence_number": next(seq), "output_index": i, "item": it}))
    total_in = usage["input"] + usage["cache_read"] + usage["cache_write"]
    u = {"input_tokens": total_in,
         "input_tokens_details": {"cached_tokens": usage["cache_read"], "cache_write_tokens": usage["cache_write"]},
         "output_tokens": usage["output"], "output_tokens_details": {"reasoning_tokens": usage["reasoning"]},
         "total_tokens": total_in + usage["output"]}
    done = dict(resp, status="completed", output=items, usage=u)
    ev.append(_sse("response.completed", {"type": "response.completed", "sequence_number": next(seq),
                                          "response": done}))
    return ev, done, sum(it["type"] == "function_call" for it in items)


def chat_reply(body: dict, turn: dict, usage: dict, n: int, model: str) -> tuple[list[bytes], dict, int]:
    """(SSE chunks, chat.completion object, tool-call count) for Chat Completions."""
    calls = []
    for j, cmd in enumerate(turn.get("bash") or []):
        name, args = shell_call(body.get("tools"), cmd)
        calls.append({"id": f"call_fake{n:04d}_{j}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(args)}})
    text = turn.get("text") or (None if calls else "OK.")
    finish = "tool_calls" if calls else "stop"
    total_in = usage["input"] + usage["cache_read"] + usage["cache_write"]
    u = {"prompt_tokens": total_in, "completion_tokens": usage["output"], "total_tokens": total_in + usage["output"],
         "prompt_tokens_details": {"cached_tokens": usage["cache_read"], "cache_write_tokens": usage["cache_write"]},
         "completion_tokens_details": {"reasoning_tokens": usage["reasoning"]}}
    head = {"id": f"chatcmpl-fake{n:04d}", "created": CREATED_AT + n, "model": model}
    msg = {"role": "assistant", "content": text}
    if calls:
        msg["tool_calls"] = calls
    full = dict(head, object="chat.completion", usage=u,
                choices=[{"index": 0, "message": msg, "finish_reason": finish}])
    chunk = dict(head, object="chat.completion.chunk")
    ev = [_sse(None, dict(chunk, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}]))]
    if text:
        ev.append(_sse(None, dict(chunk, choices=[{"index": 0, "delta": {"content": text}, "finish_reason": None}])))
    for j, c in enumerate(calls):
        ev.append(_sse(None, dict(chunk, choices=[{"index": 0, "delta": {"tool_calls": [dict(c, index=j)]},
                                                   "finish_reason": None}])))
    ev.append(_sse(None, dict(chunk, choices=[{"index": 0, "delta": {}, "finish_reason": finish}])))
    if (body.get("stream_options") or {}).get("include_usage"):
        ev.append(_sse(None, dict(chunk, choices=[], usage=u)))
    ev.append(_sse(None, "[DONE]"))
    return ev, full, len(calls)


REPLIES = {"anthropic": anthropic_reply, "responses": responses_reply, "chat": chat_reply}


# ---------------------------------------------------------------------------------------- HTTP


def _make_handler(server: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # the JSONL log is the record; keep stderr quiet
            pass

        def _send_json(self, code: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path == "/_log":
                return self._send_json(200, server.log)
            server.record({"t": time.time(), "api": "other", "path": self.path, "model": None, "stream": False,
                           "purpose": "other", "main_agent": False, "turn": None, "usage": None, "tool_calls": 0})
            if path.rstrip("/").endswith("/models"):
                return self._send_json(200, {"object": "list", "data": [
                    {"id": server.main_model or server.model, "object": "model", "type": "model",
                     "created": CREATED_AT, "owned_by": "fake", "display_name": "Fake"}]})
            self._send_json(404, {"error": {"type": "not_found_error", "message": f"no route {path}"}})

        def do_POST(self) -> None:
            t0 = time.time()
            path = urlsplit(self.path).path
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                return self._send_json(400, {"error": {"type": "invalid_request_error", "message": "bad JSON"}})
            kind = api_kind(path)
            model = body.get("model")
            purpose = call_purpose(kind, body, server.main_model)
            rec = {"t": t0, "api": kind, "path": self.path, "model": model, "stream": bool(body.get("stream")),
                   "purpose": purpose, "main_agent": False, "turn": None, "usage": None, "tool_calls": 0}
            if server.dump_requests:
                rec["request"], rec["headers"] = body, dict(self.headers.items())
            if kind == "count_tokens":
                n = max(1, len(raw) // 4)
                rec["counted_tokens"] = n  # a count, not billed usage
                server.record(rec)
                return self._send_json(200, {"input_tokens": n})
            if kind not in REPLIES:
                server.record(rec)
                return self._send_json(404, {"error": {"type": "not_found_error", "message": f"no route {path}"}})
            main = purpose == "main"
            i, turn, n = server.take(main)
            if not main:
                turn = {"bash": None, "text": COMPACT_TEXT if purpose == "compact" else server.side_text}
            usage = _usage(turn, len(raw), main)
            try:
                events, full, calls = REPLIES[kind](body, turn, usage, n, model or server.model)
            except LookupError as e:
                rec.update(main_agent=main, turn=i, error=str(e))
                server.record(rec)
                return self._send_json(400, {"error": {"type": "invalid_request_error",
                                                       "message": f"fake_server: {e}"}})
            if kind == "anthropic":
                usage["reasoning"] = 0  # the Messages API has no reasoning figure
            rec.update(main_agent=main, turn=i, usage=usage, tool_calls=calls)
            if not body.get("stream"):
                server.record(rec)
                return self._send_json(200, full)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for e in events:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(e), e))
                self.wfile.flush()
            server.record(rec)  # before the stream's end: a client that has the whole answer finds it logged
            self.wfile.write(b"0\r\n\r\n")

    return Handler


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--script", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--log")
    ap.add_argument("--main-model", help="only requests for this model are main-agent calls")
    ap.add_argument("--dump-requests", action="store_true", help="also log each request body")
    ap.add_argument("--side-text", default="Fake session", help="answer to side calls (requests offering no tools)")
    a = ap.parse_args(argv)
    fs = FakeServer(a.script, port=a.port, host=a.host, log_path=a.log, main_model=a.main_model,
                    dump_requests=a.dump_requests, side_text=a.side_text)
    print(f"fake model server on {fs.url} ({len(fs.turns)} turns)", file=sys.stderr, flush=True)
    try:
        fs._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        fs._httpd.server_close()


if __name__ == "__main__":
    main()
