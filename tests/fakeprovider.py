"""A faithful local fake LLM provider for llmtap's tests and benchmarks.

The only stand-in in the test-suite: everything else (mitmproxy, the official SDKs,
HTTP over loopback) is real.  A raw asyncio HTTP/1.1 server running on its own
thread and event loop, so sync and async tests can share it::

    with FakeProvider() as fp:                 # binds 127.0.0.1:0
        fp.script(status(529), ok())           # per-request behaviours, FIFO
        fp.script_for_model("bad", status(503))  # every request for model "bad"
        ...  # point a client at fp.url
        fp.wait_requests(2, timeout=5)
        assert fp.requests[0].json["model"] == "..."

Dialects are chosen by path (any prefix): ``/chat/completions`` (OpenAI chat),
``/responses`` (OpenAI Responses), ``/messages`` (Anthropic), ``/api/chat``
(Ollama NDJSON), ``:streamGenerateContent`` / ``:generateContent`` (Gemini),
``/models`` and ``/api/tags`` (model lists); anything else is a 404 OpenAI error.
The framing follows recorded provider transcripts, as in tests/fixtures/wire (SSE per
provider, usage chunk + ``[DONE]``, Anthropic ping/thinking/signature, Gemini CRLF).

Standalone (benchmarks)::

    python tests/fakeprovider.py --port 0 --chunk-delay-ms 5 [--bench --chunks 20]

prints ``READY http://127.0.0.1:PORT`` once listening and serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from typing import Any

__all__ = [
    "Behaviour", "FakeProvider", "RecordedRequest",
    "ok", "status", "reset", "stall", "cut", "garbage", "slow", "linger",
]


# --------------------------------------------------------------------------- behaviours

@dataclasses.dataclass(frozen=True)
class Behaviour:
    kind: str                       # ok | status | reset | stall | cut | garbage
    chunks: int | None = None       # answer split into this many content pieces
    delay_s: float | None = None    # spacing between stream events (None: fp.chunk_delay_s)
    code: int = 200
    body: Any = None                # dict/list -> JSON, str/bytes -> raw
    headers: dict | None = None
    seconds: float = 0.0            # stall length
    after_events: int = 0           # cut after this many events
    rst: bool = True                # reset/cut: RST (SO_LINGER 0) instead of FIN
    then: "Behaviour | None" = None  # stall: what to do once the stall is over
    tool: str | bool | None = None  # ok: None calls the first declared tool, False none, a name that one
    tool_args: dict | None = None   # ok: the arguments of that tool call (None: fp.tool_arguments)
    linger_s: float = 0.0           # ok, streamed: the wait between the last event and the end of body


def ok(chunks: int | None = None, delay_s: float | None = None, tool: str | bool | None = None,
       tool_args: dict | None = None) -> Behaviour:
    """Normal answer; stream events spaced ``delay_s`` (non-stream: answer after delay_s).

    When the request declares tools the answer calls the first of them, or ``tool`` by name
    (with ``tool_args``), or none with ``tool=False`` -- how an agent loop ends.
    """
    return Behaviour("ok", chunks=chunks, delay_s=delay_s, tool=tool, tool_args=tool_args)


def linger(seconds: float, tool: str | bool | None = None) -> Behaviour:
    """A streamed ``ok`` whose end of body comes ``seconds`` after its last event (``[DONE]``,
    ``message_stop``...), as from a provider that holds the stream open: an SDK that stops at
    that event hangs up first. The wait ends as soon as the client goes away."""
    return Behaviour("ok", tool=tool, linger_s=seconds)


def slow(delay_s: float, chunks: int | None = None) -> Behaviour:
    """Same as ``ok`` with spacing ``delay_s`` between stream events."""
    return Behaviour("ok", chunks=chunks, delay_s=delay_s)


def status(code: int, body: Any = None, headers: dict | None = None,
           retry_after: float | int | None = None) -> Behaviour:
    """Error ``code`` with the dialect's own error JSON (or ``body`` verbatim)."""
    h = dict(headers or {})
    if retry_after is not None:
        h["retry-after"] = str(retry_after)
    return Behaviour("status", code=code, body=body, headers=h)


def reset(rst: bool = True) -> Behaviour:
    """Read the request, then close the connection before any response byte."""
    return Behaviour("reset", rst=rst)


def stall(seconds: float, then: Behaviour | None = None) -> Behaviour:
    """Read the request, send nothing for ``seconds``, then carry on with ``then`` (ok)."""
    return Behaviour("stall", seconds=seconds, then=then)


def cut(after_events: int = 1, rst: bool = True, delay_s: float | None = None) -> Behaviour:
    """Send headers and ``after_events`` events, then reset mid-body (never completes)."""
    return Behaviour("cut", after_events=after_events, rst=rst, delay_s=delay_s)


def garbage() -> Behaviour:
    """200 with a body that is neither JSON nor UTF-8."""
    return Behaviour("garbage")


GARBAGE_BODY = b"\xff\xfe\x00<html>\x80\x81 not json \xc3\x28 {\"truncated\": \xe2\x82\n"


# --------------------------------------------------------------------------- requests

@dataclasses.dataclass
class RecordedRequest:
    method: str
    path: str                 # including the query string
    headers: dict[str, str]   # lower-case names (repeated headers joined with ", ")
    body: bytes
    json: Any                 # parsed body or None
    received_at: float        # time.monotonic() when the request head arrived
    http_version: str = "HTTP/1.1"
    dialect: str = ""
    behaviour: str = ""
    disconnected: bool = False  # the client went away before the response was complete

    @property
    def model(self) -> str | None:
        if isinstance(self.json, dict) and isinstance(self.json.get("model"), str):
            return self.json["model"]
        m = _GEMINI_MODEL.search(self.path)
        return m.group(1) if m else None

    @property
    def path_only(self) -> str:
        return self.path.split("?", 1)[0]


# --------------------------------------------------------------------------- helpers

_GEMINI_MODEL = re.compile(r"/models/([^/:?]+):")
_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')

_REASONS = {
    200: "OK", 100: "Continue", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large",
    422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout", 529: "Overloaded",
}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def split_text(text: str, n: int | None) -> list[str]:
    """Split ``text`` into word-like tokens (n None) or into ``n`` near-equal slices."""
    if not text:
        return []
    if n is None:
        parts = re.findall(r"\s*\S+", text)
        tail = text[len("".join(parts)):]
        if tail:
            parts.append(tail)
        return parts
    n = max(1, min(n, len(text)))
    q, r = divmod(len(text), n)
    out, i = [], 0
    for k in range(n):
        j = i + q + (1 if k < r else 0)
        out.append(text[i:j])
        i = j
    return out


def _fake_args(tool_params: Any) -> dict:
    """Deterministic arguments satisfying a JSON schema's (required) properties."""
    if not isinstance(tool_params, dict):
        return {}
    props = tool_params.get("properties") or {}
    names = tool_params.get("required") or list(props)
    out = {}
    for name in names:
        spec = props.get(name) or {}
        t = spec.get("type")
        if isinstance(t, list):
            t = t[0] if t else None
        if isinstance(t, str):
            t = t.lower()
        if "enum" in spec and spec["enum"]:
            out[name] = spec["enum"][0]
        elif t in ("integer", "number"):
            out[name] = 1
        elif t == "boolean":
            out[name] = True
        elif t == "array":
            out[name] = []
        elif t == "object":
            out[name] = {}
        else:
            out[name] = "fake"
    return out


class _Gone(Exception):
    """The client went away while we were answering."""


class _Conn:
    __slots__ = ("reader", "writer", "buf", "gone", "watcher", "task", "chunked", "keep")

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.gone = asyncio.Event()
        self.watcher: asyncio.Task | None = None
        self.task: asyncio.Task | None = None
        self.chunked = True
        self.keep = True


@dataclasses.dataclass
class _Answer:
    status: int
    ctype: str
    events: list[bytes] | None = None   # stream: each element is written separately
    body: bytes | None = None           # non-stream
    headers: dict | None = None


# --------------------------------------------------------------------------- the server

class FakeProvider:
    """Fake LLM API server on its own thread/loop.  See module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 reply_text: str = "Fake answer: 2\u2075 = 32 holes \u2014 deterministic.",
                 reasoning_text: str = "Each fold doubles the layers; five folds give 2\u2075 = 32.",
                 chunk_delay_s: float = 0.0, chunks: int | None = None,
                 split_events: bool = False, bench: bool = False, record: bool = True):
        self.host = host
        self._want_port = port
        self.reply_text = reply_text
        self.reasoning_text = reasoning_text
        self.chunk_delay_s = chunk_delay_s
        self.chunks = chunks                  # default content pieces (None: one per word)
        self.split_events = split_events      # write each event as two HTTP chunks
        self.chat_reasoning_field: str | None = None  # "reasoning_content" | "reasoning" | None
        self.tool_arguments: dict | None = None       # None: derived from the tool's schema
        self._tool_choice: tuple[str | bool | None, dict | None] = (None, None)  # the current ok()'s
        self.input_tokens = 12
        self.models = ["fake-model", "fake-model-mini"]
        self.bench = bench
        self.record = record

        self.requests: list[RecordedRequest] = []
        self.disconnects = 0
        self.disconnect_event = threading.Event()
        self.connections = 0          # TCP connections accepted (to assert upstream reuse)
        self._cond = threading.Condition()
        self._script: collections.deque[Behaviour] = collections.deque()
        self._model_script: dict[str, Behaviour] = {}
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()
        self.port = 0
        self._bench_cache: dict = {}
        self.fail_rate = 0.0              # share of requests failing at random (503/429/reset)
        self._rng = random.Random(0)

    # ---- lifecycle
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "FakeProvider":
        if self._thread is not None:
            return self
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fakeprovider",
                                        daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self):
        self._server = await asyncio.start_server(self._handle, self.host, self._want_port,
                                                  limit=1 << 20, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
            self._loop = self._thread = None

    async def _stop(self):
        if self._server is not None:
            self._server.close()
        tasks = []
        for c in list(self._conns):
            c.writer.transport.abort()
            if c.task is not None and c.task is not asyncio.current_task():
                c.task.cancel()
                tasks.append(c.task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def __enter__(self) -> "FakeProvider":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "FakeProvider":
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.close)

    # ---- scripting
    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests (FIFO; default ``ok()`` when empty)."""
        self._script.extend(behaviours)

    def script_for_model(self, model: str, behaviour: Behaviour | None) -> None:
        """Apply ``behaviour`` to every request whose model matches (None removes it).
        Takes precedence over the FIFO script, which it does not consume."""
        if behaviour is None:
            self._model_script.pop(model, None)
        else:
            self._model_script[model] = behaviour

    def reset(self) -> None:
        """Clear recorded requests, disconnect count, scripts and model overrides."""
        with self._cond:
            self.requests.clear()
            self.disconnects = 0
            self.connections = 0
            self.disconnect_event.clear()
            self._script.clear()
            self._model_script.clear()

    # ---- observation
    def wait_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.requests) >= n, timeout):
                raise TimeoutError(f"expected {n} requests, got {len(self.requests)}")
            return list(self.requests)

    def wait_disconnects(self, n: int = 1, timeout: float = 5.0) -> int:
        with self._cond:
            if not self._cond.wait_for(lambda: self.disconnects >= n, timeout):
                raise TimeoutError(f"expected {n} disconnects, got {self.disconnects}")
            return self.disconnects

    async def await_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        return await asyncio.to_thread(self.wait_requests, n, timeout)

    async def await_disconnects(self, n: int = 1, timeout: float = 5.0) -> int:
        return await asyncio.to_thread(self.wait_disconnects, n, timeout)

    def _note_disconnect(self, req: RecordedRequest | None) -> None:
        with self._cond:
            if req is not None:
                req.disconnected = True
            self.disconnects += 1
            self.disconnect_event.set()
            self._cond.notify_all()

    def _pick(self, req: RecordedRequest) -> Behaviour | None:
        if self._model_script:
            model = req.model
            if model is not None and model in self._model_script:
                return self._model_script[model]
        try:
            return self._script.popleft()
        except IndexError:
            return None

    # ---- HTTP/1.1 plumbing
    async def _fill(self, conn: _Conn) -> bool:
        data = await conn.reader.read(65536)
        if not data:
            return False
        conn.buf += data
        return True

    async def _read_request(self, conn: _Conn):
        buf = conn.buf
        while True:
            i = buf.find(b"\r\n\r\n")
            if i >= 0:
                break
            if len(buf) > (1 << 20):
                raise ConnectionError("header too large")
            if not await self._fill(conn):
                return None
        head = bytes(buf[:i]).decode("latin-1")
        del buf[:i + 4]
        t = time.monotonic()
        lines = head.split("\r\n")
        while lines and not lines[0]:       # tolerate stray CRLF between requests
            lines.pop(0)
        method, target, version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            k = k.strip().lower()
            v = v.strip()
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        if headers.get("expect", "").lower() == "100-continue":
            conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = bytearray()
            while True:
                while (j := buf.find(b"\r\n")) < 0:
                    if not await self._fill(conn):
                        raise ConnectionError("eof in chunked body")
                size = int(bytes(buf[:j]).split(b";", 1)[0].strip(), 16)
                del buf[:j + 2]
                if size == 0:
                    while (j := buf.find(b"\r\n")) < 0:      # trailers
                        if not await self._fill(conn):
                            raise ConnectionError("eof in trailers")
                    while j != 0:
                        del buf[:j + 2]
                        while (j := buf.find(b"\r\n")) < 0:
                            if not await self._fill(conn):
                                raise ConnectionError("eof in trailers")
                    del buf[:2]
                    break
                while len(buf) < size + 2:
                    if not await self._fill(conn):
                        raise ConnectionError("eof in chunk")
                body += buf[:size]
                del buf[:size + 2]
            body = bytes(body)
        else:
            n = int(headers.get("content-length") or 0)
            while len(buf) < n:
                if not await self._fill(conn):
                    raise ConnectionError("eof in body")
            body = bytes(buf[:n])
            del buf[:n]
        conn_hdr = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            conn.chunked = False
            conn.keep = "keep-alive" in conn_hdr
        else:
            conn.chunked = True
            conn.keep = "close" not in conn_hdr
        return method, target, version, headers, body, t

    async def _watch(self, conn: _Conn) -> None:
        """While answering, notice the client going away (EOF/RST).  Pipelined bytes
        are kept in ``conn.buf`` for the next request."""
        try:
            while await self._fill(conn):
                pass
        except (ConnectionError, OSError):
            pass
        conn.gone.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        conn = _Conn(reader, writer)
        conn.task = asyncio.current_task()
        self._conns.add(conn)
        self.connections += 1
        try:
            while True:
                r = await self._read_request(conn)
                if r is None:
                    break
                if not await self._serve(conn, *r):
                    break
                if not conn.keep:
                    break
        except (ConnectionError, OSError, ValueError, IndexError, asyncio.CancelledError):
            pass
        except Exception:            # a bug in the fake: make it loud, drop the connection
            traceback.print_exc()
            writer.transport.abort()
        finally:
            self._conns.discard(conn)
            if conn.watcher is not None:
                conn.watcher.cancel()
            if not writer.transport.is_closing():
                try:
                    writer.close()
                except Exception:
                    pass

    def _head(self, conn: _Conn, code: int, ctype: str, length: int | None,
              extra: dict | None, rid: str) -> bytes:
        parts = [f"HTTP/1.1 {code} {_REASONS.get(code, 'Status')}\r\n"
                 f"content-type: {ctype}\r\n"]
        if length is not None:
            parts.append(f"content-length: {length}\r\n")
        elif conn.chunked:
            parts.append("transfer-encoding: chunked\r\n")
        else:
            conn.keep = False
        if ctype.startswith("text/event-stream"):
            parts.append("cache-control: no-cache\r\n")
        parts.append(f"x-request-id: {rid}\r\nrequest-id: {rid}\r\n")
        if extra:
            for k, v in extra.items():
                parts.append(f"{k}: {v}\r\n")
        if not conn.keep:
            parts.append("connection: close\r\n")
        parts.append("\r\n")
        return "".join(parts).encode("latin-1")

    async def _write(self, conn: _Conn, data: bytes) -> None:
        if conn.gone.is_set():
            raise _Gone
        try:
            conn.writer.write(data)
            await conn.writer.drain()
        except (ConnectionError, OSError) as e:
            raise _Gone from e

    async def _write_event(self, conn: _Conn, ev: bytes) -> None:
        if self.split_events and len(ev) > 1:
            h = len(ev) // 2
            pieces = (ev[:h], ev[h:])
        else:
            pieces = (ev,)
        for p in pieces:
            await self._write(conn, b"%x\r\n%b\r\n" % (len(p), p) if conn.chunked else p)

    async def _pause(self, conn: _Conn, delay: float) -> None:
        """Sleep ``delay`` but wake (raising _Gone) as soon as the client goes away."""
        try:
            await asyncio.wait_for(conn.gone.wait(), delay)
        except TimeoutError:
            return
        raise _Gone

    def _kill(self, conn: _Conn, rst: bool) -> None:
        if rst:
            sock = conn.writer.get_extra_info("socket")
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except (OSError, AttributeError):
                pass
            conn.writer.transport.abort()
        else:
            try:
                conn.writer.transport.write_eof()
            except (OSError, RuntimeError):
                pass
            conn.writer.transport.close()

    async def _serve(self, conn: _Conn, method, target, version, headers, body, t) -> bool:
        """Answer one request.  Returns False when the connection must not be reused."""
        self._seq += 1
        rid = f"req_fake{self._seq:06d}"
        path = target.split("?", 1)[0]

        if self.fail_rate and self._rng.random() < self.fail_rate:
            # Chaos for soak benchmarks: a random failure before any response byte.
            self._script.appendleft(self._rng.choice(
                [status(503), status(429, retry_after=0), reset()]))
        if self.bench and path.endswith("/chat/completions") and not self._script:
            return await self._bench_chat(conn, body, rid)

        try:
            parsed = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            parsed = None
        req = RecordedRequest(method, target, headers, body, parsed, t, version)
        dialect, stream = self._dialect(path, target, parsed)
        req.dialect = dialect
        if self.record:
            with self._cond:
                self.requests.append(req)
                self._cond.notify_all()

        beh = self._pick(req) or Behaviour("ok")
        req.behaviour = beh.kind
        try:
            return await self._act(conn, req, beh, dialect, stream, rid)
        except _Gone:
            self._note_disconnect(req)
            conn.writer.transport.abort()
            return False
        finally:
            await self._stop_watch(conn)

    @staticmethod
    async def _stop_watch(conn: _Conn) -> None:
        w = conn.watcher
        if w is not None:
            conn.watcher = None
            w.cancel()
            await asyncio.wait({w})   # its pending read() must be gone before we read again

    def _start_watch(self, conn: _Conn) -> None:
        if conn.watcher is None:
            conn.gone.clear()
            conn.watcher = asyncio.ensure_future(self._watch(conn))

    async def _act(self, conn, req, beh, dialect, stream, rid) -> bool:
        kind = beh.kind
        if kind == "stall":
            self._start_watch(conn)
            await self._pause(conn, beh.seconds)
            beh = beh.then or Behaviour("ok")
            kind = beh.kind
        if kind == "reset":
            self._kill(conn, beh.rst)
            return False
        if kind == "status":
            code, ctype, payload, extra = self._error(dialect, beh.code, req, beh.body)
            extra.update({k.lower(): v for k, v in (beh.headers or {}).items()})
            await self._write(conn, self._head(conn, code, ctype, len(payload), extra, rid) + payload)
            return True
        if kind == "garbage":
            ctype = "text/event-stream; charset=utf-8" if stream else "application/json"
            await self._write(conn, self._head(conn, 200, ctype, len(GARBAGE_BODY), None, rid)
                              + GARBAGE_BODY)
            return True
        if dialect == "unknown":
            code, ctype, payload, extra = self._error(
                "openai", 404, req, None, f"Invalid URL ({req.method} {req.path_only})")
            await self._write(conn, self._head(conn, code, ctype, len(payload), extra, rid) + payload)
            return True
        if dialect == "bad_json":
            code, ctype, payload, extra = self._error(
                self._dialect(req.path_only, req.path, {})[0], 400, req, None,
                "We could not parse the JSON body of your request.")
            await self._write(conn, self._head(conn, code, ctype, len(payload), extra, rid) + payload)
            return True

        ans = self._answer(dialect, stream, req, beh)
        delay = beh.delay_s if beh.delay_s is not None else self.chunk_delay_s
        if ans.events is None:
            payload = ans.body
            if kind == "cut":
                self._start_watch(conn)
                await self._write(conn, self._head(conn, ans.status, ans.ctype, len(payload),
                                                   ans.headers, rid) + payload[:len(payload) // 2])
                self._kill(conn, beh.rst)
                return False
            if delay > 0:
                self._start_watch(conn)
                await self._pause(conn, delay)
            await self._write(conn, self._head(conn, ans.status, ans.ctype, len(payload),
                                               ans.headers, rid) + payload)
            return True

        events = ans.events
        self._start_watch(conn)
        await self._write(conn, self._head(conn, ans.status, ans.ctype, None, ans.headers, rid))
        limit = len(events) if kind != "cut" else min(beh.after_events, len(events))
        for i in range(limit):
            if delay > 0 and i:
                await self._pause(conn, delay)
            await self._write_event(conn, events[i])
        if kind == "cut":
            if delay > 0:
                await self._pause(conn, delay)
            self._kill(conn, beh.rst)
            return False
        if beh.linger_s:
            await self._pause(conn, beh.linger_s)
        if conn.chunked:
            await self._write(conn, b"0\r\n\r\n")
        else:
            self._kill(conn, False)
            return False
        return True

    # ---- dialects
    @staticmethod
    def _dialect(path: str, target: str, parsed: Any) -> tuple[str, bool]:
        if ":streamGenerateContent" in path:
            d, stream = "gemini", True
        elif ":generateContent" in path:
            d, stream = "gemini", False
        elif path.endswith("/chat/completions"):
            d, stream = "openai", bool(isinstance(parsed, dict) and parsed.get("stream"))
        elif path.endswith("/responses"):
            d, stream = "responses", bool(isinstance(parsed, dict) and parsed.get("stream"))
        elif path.endswith("/messages/count_tokens"):
            d, stream = "anthropic_count", False
        elif path.endswith("/messages"):
            d, stream = "anthropic", bool(isinstance(parsed, dict) and parsed.get("stream"))
        elif path.endswith("/api/chat"):
            d, stream = "ollama", not (isinstance(parsed, dict) and parsed.get("stream") is False)
        elif path.endswith("/api/tags"):
            return "ollama_tags", False
        elif path.endswith("/models"):
            return "models", False
        else:
            return "unknown", False
        if d != "gemini" and not isinstance(parsed, dict):
            return "bad_json", False
        return d, stream

    def _error(self, dialect: str, code: int, req: RecordedRequest, body: Any,
               message: str | None = None) -> tuple[int, str, bytes, dict]:
        extra: dict = {}
        if body is not None:
            if isinstance(body, (dict, list)):
                payload = _dumps(body).encode()
            elif isinstance(body, str):
                payload = body.encode()
            else:
                payload = bytes(body)
            return code, "application/json", payload, extra
        model = req.model or "unknown"
        if dialect.startswith("anthropic"):
            etype = {400: "invalid_request_error", 401: "authentication_error",
                     403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                     429: "rate_limit_error", 529: "overloaded_error"}.get(
                code, "api_error" if code >= 500 else "invalid_request_error")
            msg = message or {529: "Overloaded", 429: "Number of request tokens has exceeded "
                              "your per-minute rate limit (fake)."}.get(code, f"Fake error {code}")
            rid = f"req_fake{self._seq:06d}"
            obj = {"type": "error", "error": {"type": etype, "message": msg}, "request_id": rid}
            if code in (408, 409, 429) or code >= 500:
                extra["x-should-retry"] = "true"
            return code, "application/json", _dumps(obj).encode(), extra
        if dialect == "gemini":
            st = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                  404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                  503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}.get(code, "UNKNOWN")
            obj = {"error": {"code": code, "message": message or f"Fake error {code}", "status": st}}
            return code, "application/json; charset=UTF-8", json.dumps(obj, indent=2).encode(), extra
        if dialect == "ollama":
            return code, "application/json; charset=utf-8", _dumps(
                {"error": message or f"fake error {code}"}).encode(), extra
        etype, ecode = {
            400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
            403: ("invalid_request_error", "unsupported_country_region_territory"),
            404: ("invalid_request_error", "model_not_found"),
            429: ("requests", "rate_limit_exceeded"),
        }.get(code, ("server_error" if code >= 500 else "invalid_request_error", None))
        if message is None:
            message = {429: f"Rate limit reached for {model} (fake).",
                       404: f"The model `{model}` does not exist or you do not have access to it.",
                       503: "The server is overloaded or not ready yet."}.get(
                code, f"Fake error {code}")
        elif code == 404:
            ecode = None
        obj = {"error": {"message": message, "type": etype, "param": None, "code": ecode}}
        return code, "application/json; charset=utf-8", json.dumps(obj, indent=4).encode() + b"\n", extra

    def _answer(self, dialect: str, stream: bool, req: RecordedRequest, beh: Behaviour) -> _Answer:
        n = beh.chunks if beh.chunks is not None else self.chunks
        # The answer is built synchronously on the fake's one loop, so the behaviour's tool
        # choice can ride along on the instance for the duration of this call.
        self._tool_choice = (beh.tool, beh.tool_args)
        try:
            return getattr(self, "_a_" + dialect)(stream, req, n)
        finally:
            self._tool_choice = (None, None)

    def _tool(self, tools: Any, flavour: str) -> tuple[str, dict] | None:
        """(name, args) of the first declared tool, or None."""
        want, want_args = self._tool_choice
        if not tools or not isinstance(tools, list) or want is False:
            return None
        t = tools[0] if not isinstance(want, str) else next(
            (x for x in tools if isinstance(x, dict) and want in (
                x.get("name"), (x.get("function") or {}).get("name"),
                ((x.get("functionDeclarations") or x.get("function_declarations") or [{}])[0]).get("name"))), None)
        if not isinstance(t, dict):
            return None
        if flavour == "openai":
            fn = t.get("function") or {}
            name, params = fn.get("name"), fn.get("parameters")
        elif flavour == "responses":
            name, params = t.get("name"), t.get("parameters")
        elif flavour == "anthropic":
            name, params = t.get("name"), t.get("input_schema")
        else:  # gemini
            decl = (t.get("functionDeclarations") or t.get("function_declarations") or [{}])[0]
            name, params = decl.get("name"), decl.get("parameters")
        if not name:
            return None
        args = (want_args if want_args is not None else self.tool_arguments if self.tool_arguments is not None
                else _fake_args(params))
        return name, args

    # OpenAI chat completions ----------------------------------------------------
    def _a_openai(self, stream: bool, req: RecordedRequest, n: int | None) -> _Answer:
        body = req.json
        model = body.get("model") or "unknown"
        cid = f"chatcmpl-fake{self._seq:06d}"
        created = int(time.time())
        tool = self._tool(body.get("tools"), "openai") if body.get("tool_choice") != "none" else None
        rfield = self.chat_reasoning_field
        rparts = split_text(self.reasoning_text, n) if rfield else []
        cparts = [] if tool else split_text(self.reply_text, n)
        call_id = f"call_fake{self._seq:06d}"
        args_s = _dumps(tool[1]) if tool else ""
        out_tokens = len(rparts) + (len(split_text(args_s, n)) if tool else len(cparts))
        usage = {"prompt_tokens": self.input_tokens, "completion_tokens": out_tokens,
                 "total_tokens": self.input_tokens + out_tokens,
                 "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                 "completion_tokens_details": {"reasoning_tokens": len(rparts), "audio_tokens": 0,
                                               "accepted_prediction_tokens": 0,
                                               "rejected_prediction_tokens": 0}}
        finish = "tool_calls" if tool else "stop"
        if not stream:
            msg: dict = {"role": "assistant", "content": None if tool else self.reply_text,
                         "refusal": None, "annotations": []}
            if rfield:
                msg[rfield] = self.reasoning_text
            if tool:
                msg["tool_calls"] = [{"id": call_id, "type": "function",
                                      "function": {"name": tool[0], "arguments": args_s}}]
            obj = {"id": cid, "object": "chat.completion", "created": created, "model": model,
                   "choices": [{"index": 0, "message": msg, "logprobs": None,
                                "finish_reason": finish}],
                   "usage": usage, "service_tier": "default", "system_fingerprint": "fp_fake"}
            return _Answer(200, "application/json", body=json.dumps(obj, indent=2,
                                                                    ensure_ascii=False).encode())
        so = body.get("stream_options")
        include_usage = isinstance(so, dict) and bool(so.get("include_usage"))
        head = ('data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,'
                '"service_tier":"default","system_fingerprint":"fp_fake","choices":['
                % (cid, created, _dumps(model)))
        tail = ',"usage":null}\n\n' if include_usage else "}\n\n"

        def chunk(delta: dict, finish_reason=None) -> bytes:
            return (head + '{"index":0,"delta":' + _dumps(delta) + ',"logprobs":null,'
                    '"finish_reason":' + _dumps(finish_reason) + "}]" + tail).encode()

        first = {"role": "assistant", "content": None if tool else "", "refusal": None}
        ev = [chunk(first)]
        for p in rparts:
            ev.append(chunk({"content": None, rfield: p} if rfield == "reasoning_content"
                            else {rfield: p}))
        for p in cparts:
            ev.append(chunk({"content": p}))
        if tool:
            ev.append(chunk({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                             "function": {"name": tool[0], "arguments": ""}}]}))
            for p in split_text(args_s, n):
                ev.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}))
        ev.append(chunk({}, finish))
        if include_usage:
            ev.append((head + "]," + '"usage":' + _dumps(usage) + "}\n\n").encode())
        ev.append(b"data: [DONE]\n\n")
        return _Answer(200, "text/event-stream; charset=utf-8", events=ev)

    # OpenAI Responses -----------------------------------------------------------
    def _a_responses(self, stream: bool, req: RecordedRequest, n: int | None) -> _Answer:
        body = req.json
        model = body.get("model") or "unknown"
        rid = f"resp_fake{self._seq:06d}"
        rs_id, msg_id, fc_id = (f"rs_fake{self._seq:06d}", f"msg_fake{self._seq:06d}",
                                f"fc_fake{self._seq:06d}")
        created = int(time.time())
        want_reasoning = isinstance(body.get("reasoning"), dict) and bool(self.reasoning_text)
        summaries = [s for s in self.reasoning_text.split("\n\n") if s] if want_reasoning else []
        tool = self._tool(body.get("tools"), "responses") if body.get("tool_choice") != "none" else None
        args_s = _dumps(tool[1]) if tool else ""
        cparts = split_text(self.reply_text, n)
        rparts = [split_text(s, n) for s in summaries]
        n_reason = sum(len(p) for p in rparts)
        out_tokens = n_reason + len(cparts) + (len(split_text(args_s, n)) if tool else 0)
        usage = {"input_tokens": self.input_tokens, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": out_tokens,
                 "output_tokens_details": {"reasoning_tokens": n_reason},
                 "total_tokens": self.input_tokens + out_tokens}
        reasoning_item = {"id": rs_id, "type": "reasoning",
                          "summary": [{"type": "summary_text", "text": s} for s in summaries]}
        text_part = {"type": "output_text", "annotations": [], "logprobs": [],
                     "text": self.reply_text}
        msg_item = {"id": msg_id, "type": "message", "status": "completed",
                    "content": [text_part], "role": "assistant"}
        fc_item = ({"id": fc_id, "type": "function_call", "status": "completed",
                    "arguments": args_s, "call_id": f"call_fake{self._seq:06d}",
                    "name": tool[0]} if tool else None)
        output = ([reasoning_item] if want_reasoning else []) + [msg_item] + (
            [fc_item] if tool else [])

        def resp(status_: str, out: list, usage_: Any) -> dict:
            return {"id": rid, "object": "response", "created_at": created, "status": status_,
                    "background": False, "error": None, "incomplete_details": None,
                    "instructions": body.get("instructions"), "max_output_tokens": None,
                    "model": model, "output": out, "parallel_tool_calls": True,
                    "previous_response_id": None,
                    "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
                    "service_tier": "default", "store": True, "temperature": 1.0,
                    "text": {"format": {"type": "text"}, "verbosity": "medium"},
                    "tool_choice": "auto", "tools": body.get("tools") or [], "top_p": 1.0,
                    "truncation": "disabled", "usage": usage_, "user": None, "metadata": {}}

        if not stream:
            return _Answer(200, "application/json",
                           body=json.dumps(resp("completed", output, usage), indent=2,
                                           ensure_ascii=False).encode())
        ev: list[bytes] = []
        seq = 0

        def e(typ: str, **fields) -> None:
            nonlocal seq
            d = {"type": typ, **fields, "sequence_number": seq}
            seq += 1
            ev.append(("event: " + typ + "\ndata: " + _dumps(d) + "\n\n").encode())

        e("response.created", response=resp("in_progress", [], None))
        e("response.in_progress", response=resp("in_progress", [], None))
        oi = 0
        if want_reasoning:
            e("response.output_item.added", item={"id": rs_id, "type": "reasoning", "summary": []},
              output_index=oi)
            for si, (s, parts) in enumerate(zip(summaries, rparts)):
                e("response.reasoning_summary_part.added", item_id=rs_id, output_index=oi,
                  part={"type": "summary_text", "text": ""}, summary_index=si)
                for p in parts:
                    e("response.reasoning_summary_text.delta", delta=p, item_id=rs_id,
                      output_index=oi, summary_index=si)
                e("response.reasoning_summary_text.done", item_id=rs_id, output_index=oi,
                  summary_index=si, text=s)
                e("response.reasoning_summary_part.done", item_id=rs_id, output_index=oi,
                  part={"type": "summary_text", "text": s}, summary_index=si)
            e("response.output_item.done", item=reasoning_item, output_index=oi)
            oi += 1
        e("response.output_item.added", item={"id": msg_id, "type": "message",
                                              "status": "in_progress", "content": [],
                                              "role": "assistant"}, output_index=oi)
        e("response.content_part.added", content_index=0, item_id=msg_id, output_index=oi,
          part={"type": "output_text", "annotations": [], "logprobs": [], "text": ""})
        for p in cparts:
            e("response.output_text.delta", content_index=0, delta=p, item_id=msg_id,
              logprobs=[], output_index=oi)
        e("response.output_text.done", content_index=0, item_id=msg_id, logprobs=[],
          output_index=oi, text=self.reply_text)
        e("response.content_part.done", content_index=0, item_id=msg_id, output_index=oi,
          part=text_part)
        e("response.output_item.done", item=msg_item, output_index=oi)
        if tool:
            oi += 1
            e("response.output_item.added", item={**fc_item, "status": "in_progress",
                                                  "arguments": ""}, output_index=oi)
            for p in split_text(args_s, n):
                e("response.function_call_arguments.delta", delta=p, item_id=fc_id,
                  output_index=oi)
            e("response.function_call_arguments.done", arguments=args_s, item_id=fc_id,
              output_index=oi)
            e("response.output_item.done", item=fc_item, output_index=oi)
        e("response.completed", response=resp("completed", output, usage))
        return _Answer(200, "text/event-stream; charset=utf-8", events=ev)

    # Anthropic Messages ---------------------------------------------------------
    def _a_anthropic(self, stream: bool, req: RecordedRequest, n: int | None) -> _Answer:
        body = req.json
        model = body.get("model") or "unknown"
        mid = f"msg_fake{self._seq:06d}"
        th = body.get("thinking")
        thinking = (isinstance(th, dict) and th.get("type") not in (None, "disabled")
                    and bool(self.reasoning_text))
        tc = body.get("tool_choice")
        tool = (self._tool(body.get("tools"), "anthropic")
                if not (isinstance(tc, dict) and tc.get("type") == "none") else None)
        sig = f"EqFAKE{self._seq:06d}TESTONLYnotARealSignature=="
        rparts = split_text(self.reasoning_text, n) if thinking else []
        cparts = split_text(self.reply_text, n)
        args_s = _dumps(tool[1]) if tool else ""
        aparts = split_text(args_s, n) if tool else []
        out_tokens = len(rparts) + len(cparts) + len(aparts)
        tool_id = f"toolu_fake{self._seq:06d}"
        stop = "tool_use" if tool else "end_turn"
        usage_full = {"input_tokens": self.input_tokens, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0,
                      "cache_creation": {"ephemeral_5m_input_tokens": 0,
                                         "ephemeral_1h_input_tokens": 0},
                      "output_tokens": out_tokens, "service_tier": "standard"}
        if not stream:
            content: list = []
            if thinking:
                content.append({"type": "thinking", "thinking": self.reasoning_text,
                                "signature": sig})
            content.append({"type": "text", "text": self.reply_text})
            if tool:
                content.append({"type": "tool_use", "id": tool_id, "name": tool[0],
                                "input": tool[1]})
            obj = {"id": mid, "type": "message", "role": "assistant", "model": model,
                   "content": content, "stop_reason": stop, "stop_sequence": None,
                   "usage": usage_full}
            return _Answer(200, "application/json", body=_dumps(obj).encode())

        ev: list[bytes] = []

        def e(typ: str, d: dict) -> None:
            ev.append(("event: " + typ + "\ndata: " + _dumps({"type": typ, **d}) + "\n\n").encode())

        e("message_start", {"message": {"id": mid, "type": "message", "role": "assistant",
                                        "model": model, "content": [], "stop_reason": None,
                                        "stop_sequence": None,
                                        "usage": {**usage_full, "output_tokens": 1}}})
        idx = 0
        if thinking:
            e("content_block_start", {"index": idx, "content_block": {
                "type": "thinking", "thinking": "", "signature": ""}})
            ev.append(b'event: ping\ndata: {"type": "ping"}\n\n')
            for p in rparts:
                e("content_block_delta", {"index": idx, "delta": {"type": "thinking_delta",
                                                                  "thinking": p}})
            e("content_block_delta", {"index": idx, "delta": {"type": "signature_delta",
                                                              "signature": sig}})
            e("content_block_stop", {"index": idx})
            idx += 1
        e("content_block_start", {"index": idx, "content_block": {"type": "text", "text": ""}})
        if not thinking:
            ev.append(b'event: ping\ndata: {"type": "ping"}\n\n')
        for p in cparts:
            e("content_block_delta", {"index": idx, "delta": {"type": "text_delta", "text": p}})
        e("content_block_stop", {"index": idx})
        if tool:
            idx += 1
            e("content_block_start", {"index": idx, "content_block": {
                "type": "tool_use", "id": tool_id, "name": tool[0], "input": {}}})
            for p in aparts:
                e("content_block_delta", {"index": idx, "delta": {"type": "input_json_delta",
                                                                  "partial_json": p}})
            e("content_block_stop", {"index": idx})
        e("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None},
                            "usage": {"input_tokens": self.input_tokens,
                                      "cache_creation_input_tokens": 0,
                                      "cache_read_input_tokens": 0,
                                      "output_tokens": out_tokens}})
        e("message_stop", {})
        return _Answer(200, "text/event-stream; charset=utf-8", events=ev)

    def _a_anthropic_count(self, stream, req, n) -> _Answer:
        return _Answer(200, "application/json",
                       body=_dumps({"input_tokens": self.input_tokens}).encode())

    # Ollama ---------------------------------------------------------------------
    def _a_ollama(self, stream: bool, req: RecordedRequest, n: int | None) -> _Answer:
        body = req.json
        model = body.get("model") or "unknown"
        think = bool(body.get("think")) and bool(self.reasoning_text)
        tool = self._tool(body.get("tools"), "openai")
        rparts = split_text(self.reasoning_text, n) if think else []
        cparts = split_text(self.reply_text, n)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000000Z"
        final = {"done_reason": "stop", "done": True, "total_duration": 123456789,
                 "load_duration": 1234567, "prompt_eval_count": self.input_tokens,
                 "prompt_eval_duration": 2345678,
                 "eval_count": len(rparts) + len(cparts) + (1 if tool else 0),
                 "eval_duration": 98765432}
        tcalls = [{"function": {"name": tool[0], "arguments": tool[1]}}] if tool else None
        if not stream:
            msg: dict = {"role": "assistant", "content": self.reply_text}
            if think:
                msg["thinking"] = self.reasoning_text
            if tcalls:
                msg["tool_calls"] = tcalls
            obj = {"model": model, "created_at": ts, "message": msg, **final}
            return _Answer(200, "application/json; charset=utf-8", body=_dumps(obj).encode())
        ev = []
        for p in rparts:
            ev.append((_dumps({"model": model, "created_at": ts, "message": {
                "role": "assistant", "content": "", "thinking": p}, "done": False}) + "\n").encode())
        for p in cparts:
            ev.append((_dumps({"model": model, "created_at": ts, "message": {
                "role": "assistant", "content": p}, "done": False}) + "\n").encode())
        if tcalls:
            ev.append((_dumps({"model": model, "created_at": ts, "message": {
                "role": "assistant", "content": "", "tool_calls": tcalls},
                "done": False}) + "\n").encode())
        ev.append((_dumps({"model": model, "created_at": ts, "message": {
            "role": "assistant", "content": ""}, **final}) + "\n").encode())
        return _Answer(200, "application/x-ndjson", events=ev)

    # Gemini ---------------------------------------------------------------------
    def _a_gemini(self, stream: bool, req: RecordedRequest, n: int | None) -> _Answer:
        body = req.json if isinstance(req.json, dict) else {}
        model = req.model or "unknown"
        gc = body.get("generationConfig") or body.get("generation_config") or {}
        tc = gc.get("thinkingConfig") or gc.get("thinking_config") or {}
        thoughts = bool(tc.get("includeThoughts") or tc.get("include_thoughts")) and bool(
            self.reasoning_text)
        tool = self._tool(body.get("tools"), "gemini")
        rparts = split_text(self.reasoning_text, n) if thoughts else []
        cparts = split_text(self.reply_text, n)
        resp_id = f"FAKE{self._seq:06d}"
        n_th = len(rparts)

        def usage(cand: int) -> dict:
            u = {"promptTokenCount": self.input_tokens}
            if cand:
                u["candidatesTokenCount"] = cand
            u["totalTokenCount"] = self.input_tokens + cand + n_th
            u["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": self.input_tokens}]
            if n_th:
                u["thoughtsTokenCount"] = n_th
            return u

        def chunk(parts: list, cand: int, finish: bool) -> dict:
            c: dict = {"content": {"parts": parts, "role": "model"}}
            if finish:
                c["finishReason"] = "STOP"
            c["index"] = 0
            return {"candidates": [c], "usageMetadata": usage(cand), "modelVersion": model,
                    "responseId": resp_id}

        n_out = len(cparts) + (1 if tool else 0)
        if not stream:
            parts: list = []
            if thoughts:
                parts.append({"text": self.reasoning_text, "thought": True})
            parts.append({"text": self.reply_text})
            if tool:
                parts.append({"functionCall": {"name": tool[0], "args": tool[1]}})
            return _Answer(200, "application/json; charset=UTF-8",
                           body=json.dumps(chunk(parts, n_out, True), indent=2,
                                           ensure_ascii=False).encode())
        objs = [chunk([{"text": p, "thought": True}], 0, False) for p in rparts]
        for i, p in enumerate(cparts):
            objs.append(chunk([{"text": p}], i + 1, False))
        last: list = []
        if tool:
            last.append({"functionCall": {"name": tool[0], "args": tool[1]}})
        if thoughts:
            last.append({"text": "", "thoughtSignature": f"CiQFAKE{self._seq:06d}TESTONLY=="})
        objs.append(chunk(last or [{"text": ""}], n_out, True))
        if "alt=sse" in req.path:
            return _Answer(200, "text/event-stream",
                           events=[("data: " + _dumps(o) + "\r\n\r\n").encode() for o in objs])
        # Without alt=sse Gemini streams one JSON array, element by element.
        ev = []
        for i, o in enumerate(objs):
            ev.append(("[" if i == 0 else ",\r\n") .encode() + json.dumps(
                o, ensure_ascii=False).encode())
        ev.append(b"]")
        return _Answer(200, "application/json; charset=UTF-8", events=ev)

    # model lists ----------------------------------------------------------------
    def _a_models(self, stream: bool, req: RecordedRequest, n) -> _Answer:
        if "anthropic-version" in req.headers:
            data = [{"type": "model", "id": m, "display_name": m,
                     "created_at": "2025-01-01T00:00:00Z"} for m in self.models]
            obj: dict = {"data": data, "has_more": False, "first_id": self.models[0],
                         "last_id": self.models[-1]}
        elif "/v1beta/" in req.path:
            obj = {"models": [{"name": f"models/{m}", "displayName": m,
                               "supportedGenerationMethods": ["generateContent",
                                                              "streamGenerateContent"]}
                              for m in self.models]}
        else:
            obj = {"object": "list", "data": [{"id": m, "object": "model", "created": 1735689600,
                                               "owned_by": "fakeprovider"} for m in self.models]}
        return _Answer(200, "application/json", body=_dumps(obj).encode())

    def _a_ollama_tags(self, stream, req, n) -> _Answer:
        obj = {"models": [{"name": m, "model": m, "modified_at": "2025-01-01T00:00:00Z",
                           "size": 1, "digest": "0" * 64, "details": {}} for m in self.models]}
        return _Answer(200, "application/json; charset=utf-8", body=_dumps(obj).encode())

    # ---- bench mode
    async def _bench_chat(self, conn: _Conn, body: bytes, rid: str) -> bool:
        """Minimal-work /chat/completions: fixed JSON, or ``chunks`` SSE events."""
        if not _STREAM_TRUE.search(body):
            payload = self._bench_cache.get("ns")
            if payload is None:
                payload = self._bench_cache["ns"] = _dumps({
                    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1761000000,
                    "model": "bench", "choices": [{"index": 0, "message": {
                        "role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                              "total_tokens": 2}}).encode()
            await self._write(conn, self._head(conn, 200, "application/json", len(payload),
                                               None, rid) + payload)
            return True
        k = self.chunks or 10
        ev = self._bench_cache.get(("s", k))
        if ev is None:
            head = ('data: {"id":"chatcmpl-bench","object":"chat.completion.chunk",'
                    '"created":1761000000,"model":"bench","choices":[{"index":0,"delta":')
            ev = [(head + '{"role":"assistant","content":""},"finish_reason":null}]}\n\n').encode()]
            ev += [(head + '{"content":"tok%d "},"finish_reason":null}]}\n\n' % i).encode()
                   for i in range(k)]
            ev.append((head + '{},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,'
                       f'"completion_tokens":{k},"total_tokens":{k + 1}}}}}\n\n').encode())
            ev.append(b"data: [DONE]\n\n")
            ev = self._bench_cache[("s", k)] = [b"%x\r\n%b\r\n" % (len(e), e) for e in ev]
        self._start_watch(conn)
        try:
            await self._write(conn, self._head(conn, 200, "text/event-stream; charset=utf-8",
                                               None, None, rid))
            delay = self.chunk_delay_s
            for i, e in enumerate(ev):
                if delay > 0 and i:
                    await self._pause(conn, delay)
                await self._write(conn, e)
            await self._write(conn, b"0\r\n\r\n")
        except _Gone:
            self._note_disconnect(None)
            conn.writer.transport.abort()
            return False
        finally:
            await self._stop_watch(conn)
        return True


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="llmtap fake LLM provider")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--chunk-delay-ms", type=float, default=0.0,
                    help="spacing between stream events")
    ap.add_argument("--chunks", type=int, default=None,
                    help="content pieces per answer (bench default 10; else one per word)")
    ap.add_argument("--bench", action="store_true",
                    help="minimal-work /chat/completions (fixed JSON / K fixed chunks)")
    ap.add_argument("--split-events", action="store_true")
    ap.add_argument("--record", action="store_true", help="keep received requests in memory")
    ap.add_argument("--fail-rate", type=float, default=0.0,
                    help="share of requests failing at random with 503, 429 or a reset (soak tests)")
    ap.add_argument("--seed", type=int, default=0, help="seed of --fail-rate's random choices")
    a = ap.parse_args(argv)
    fp = FakeProvider(a.host, a.port, chunk_delay_s=a.chunk_delay_ms / 1000.0, chunks=a.chunks,
                      split_events=a.split_events, bench=a.bench, record=a.record)
    fp.fail_rate = a.fail_rate
    fp._rng = random.Random(a.seed)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    fp.start()
    print(f"READY {fp.url}", flush=True)
    try:
        while not stop.wait(3600):
            pass
    finally:
        fp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
