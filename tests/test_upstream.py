"""The upstream client as the upstream sees it: one request sent is one attempt recorded, and
a response cut after its first byte is recorded as a cut stream, not as llmtap's own error.

The keep-alive tests go through the real proxy (mitmproxy, relay, pool) to the fake
provider; the one about an idle connection the server closed drives the pool directly,
because only there can the test hold the event loop still while the FIN arrives. Bad chunk
framing, which the fake provider never sends, comes from a raw socket server scripted here.
"""

from __future__ import annotations

import asyncio
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import httpx
import pytest

from fakeprovider import FakeProvider, cut, ok, reset
from llmtap.addons.upstream import Origin, Pool
from proxyharness import RunningProxy
from test_cli import Lines

RULES = """\
providers:
  up: {{base_url: "{url}/v1", api: openai}}
routes:
  - name: no-connect-retry
    match: {{model: "once"}}
    targets: [{{provider: up, model: m-once}}]
    retry: {{attempts: 3, backoff_ms: 1, on: [timeout, 5xx]}}
  - name: connect-retry
    match: {{model: "again"}}
    targets: [{{provider: up, model: m-again}}]
    retry: {{attempts: 2, backoff_ms: 1, on: [connect]}}
"""


@pytest.fixture
def proxy(tmp_path: Path, fake: FakeProvider, confdir: Path) -> Iterator[RunningProxy]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(url=fake.url))
    with RunningProxy(rules, confdir) as p:
        yield p


def chat(proxy: RunningProxy, model: str) -> httpx.Response:
    return httpx.post(f"{proxy.gateway_url}/up/chat/completions", timeout=20,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


# -- item: every request sent upstream is an attempt row -----------------------------------
def test_reset_on_a_reused_connection_is_one_failed_attempt_not_a_silent_resend(
        proxy: RunningProxy, fake: FakeProvider) -> None:
    # The upstream answers on a kept-alive connection, then reads the next request on that
    # same connection and resets it: it may have acted on that POST.
    fake.script(ok(), reset())
    assert chat(proxy, "once").status_code == 200
    r = chat(proxy, "once")
    assert r.status_code == 502  # the route does not retry `connect`: the client is told
    assert "reused keep-alive connection" in r.text
    finished = proxy.memory.wait_finished(2)
    attempts = [a for _, calls in finished for a in calls]
    assert len(fake.requests) == len(attempts) == 2
    assert fake.connections == 1
    call, (attempt,) = finished[1]
    assert call.status == 502 and call.attempts == 1
    assert attempt.status is None and attempt.error.startswith("connect: ")
    assert "reset" in attempt.error and "reused keep-alive connection" in attempt.error


def test_reset_on_a_reused_connection_is_retried_only_under_the_routes_connect_rule(
        proxy: RunningProxy, fake: FakeProvider) -> None:
    fake.script(ok(), reset())
    assert chat(proxy, "again").status_code == 200
    r = chat(proxy, "again")
    assert r.status_code == 200 and r.json()["model"] == "m-again"
    finished = proxy.memory.wait_finished(2)
    attempts = [a for _, calls in finished for a in calls]
    assert len(fake.requests) == len(attempts) == 3
    call, (first, second) = finished[1]
    assert call.attempts == 2 and "reused keep-alive connection" in first.error
    assert second.status == 200 and second.error is None


class RawUpstream:
    """A scripted HTTP/1.1 server on 127.0.0.1: `answer(conn_index, request_index)` returns the
    bytes to send for each request; `close_now` set closes the connection (FIN) after them."""

    def __init__(self, answer: Callable[[int, int], bytes]) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.close_now = threading.Event()
        self.closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._accept = threading.Thread(target=self._run, daemon=True)
        self._accept.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        n = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn, n), daemon=True)
            t.start()
            self._threads.append(t)
            n += 1

    def _serve(self, conn: socket.socket, index: int) -> None:
        buf = b""
        i = 0
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buf) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                buf = buf[length:]
                self.requests.append(head)
                conn.sendall(self.answer(index, i))
                i += 1
                if self.close_now.is_set():
                    return
        except OSError:
            return
        finally:
            conn.close()
            self.closed.set()

    def close(self) -> None:
        self.sock.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._accept.join(10)
        for t in self._threads:
            t.join(10)


OK_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


def test_idle_connection_closed_by_the_server_is_not_used_even_before_the_loop_noticed() -> None:
    # Keep-alive servers close idle connections (their keep-alive timeout). The next request
    # must go on a new connection, without a failed write, because a request written into a
    # closing connection may or may not have been read: that would cost the call an attempt.
    second_conn = threading.Event()
    server: RawUpstream

    def answer(conn: int, req: int) -> bytes:
        if conn == 0:
            server.close_now.set()  # answer, then close this connection as if idle too long
        else:
            second_conn.set()
        return OK_RESPONSE

    server = RawUpstream(answer)

    async def main() -> None:
        pool = Pool()
        origin = Origin("http", "127.0.0.1", server.port)
        try:
            first = await pool.request("POST", origin, "/v1/x", [(b"host", b"x"), (b"content-length", b"2")], b"{}",
                                       connect_timeout=5, first_byte_timeout=5)
            assert await first.aread() == b"{}"
            (idle,) = pool._idle[origin]
            # Wait, with the event loop held still, until the server's FIN is on the socket:
            # the loop cannot have read it, so only a look at the socket can tell.
            assert server.closed.wait(10)
            assert select.select([idle.fd], [], [], 10)[0]
            assert not idle.reader.at_eof()
            second = await pool.request("POST", origin, "/v1/x", [(b"host", b"x"), (b"content-length", b"2")], b"{}",
                                        connect_timeout=5, first_byte_timeout=5)
            assert second.status == 200 and await second.aread() == b"{}"
        finally:
            await pool.aclose()

    try:
        asyncio.run(main())
        assert second_conn.is_set() and len(server.requests) == 2
    finally:
        server.close()


# -- item: a stream cut after its first byte is a cut stream, recorded as such -------------
_EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
BAD_CHUNKS = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
              b"%x\r\n%s\r\nzz\r\nnot a chunk size\r\n" % (len(_EVENT), _EVENT))


def test_streams_cut_after_the_first_byte_are_recorded_as_cut_without_a_traceback(
        tmp_path: Path, fake: FakeProvider) -> None:
    raw = RawUpstream(lambda conn, req: BAD_CHUNKS)
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"providers:\n  fake: {{base_url: '{fake.url}/v1', api: openai}}\n"
                     f"  raw: {{base_url: '{raw.url}/v1', api: openai}}\n")
    db = tmp_path / "calls.duckdb"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtap", "run", "--db", str(db), "--rules", str(rules),
         "--confdir", str(tmp_path / "ca"), "--proxy", "off", "--gateway", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        err, out = Lines(proc.stderr), Lines(proc.stdout)
        gateway = next(w for w in err.wait_for("gateway").split() if w.startswith("http")).split("/<provider>")[0]
        # FIN after the first event of a stream; FIN after half of a Content-Length body;
        # a chunk whose size line is not hex.
        fake.script_for_model("fin", cut(after_events=1, rst=False))
        fake.script_for_model("short", cut(rst=False))
        cases = [("fake", "fin", True), ("fake", "short", False), ("raw", "badchunk", True)]
        for provider, model, stream in cases:
            with pytest.raises(httpx.HTTPError):  # the client sees the truncation
                with httpx.Client(timeout=30) as c, c.stream(
                        "POST", f"{gateway}/{provider}/chat/completions",
                        json={"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}) as r:
                    assert r.status_code == 200
                    r.read()
            out.wait_for(f" {model}  {provider}", timeout=20) if False else None
        print("ERR", err.lines, "OUT", out.lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert err.ended.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raw.close()
    stderr = "".join(err.lines)
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    with duckdb.connect(str(db), read_only=True) as con:
        rows = dict((r[0], r[1:]) for r in con.execute(
            "SELECT c.model_requested, c.status, c.complete, c.error, a.error, c.response_body "
            "FROM calls c JOIN attempts a ON a.call_id = c.id").fetchall())
    assert rows.keys() == {"fin", "short", "badchunk"}
    for model, (status, complete, error, attempt_error, body) in rows.items():
        assert status == 200 and complete is False, (model, rows[model])
        assert error == attempt_error, model
        assert body, model  # what arrived before the cut is kept
    assert rows["fin"][2].startswith("upstream closed the stream early: ")
    assert rows["short"][2].startswith("upstream closed the stream early: ")
    assert "expected" in rows["short"][2]  # says how much was promised
    assert rows["badchunk"][2].startswith("upstream broke the stream's framing: illegal chunk header")
