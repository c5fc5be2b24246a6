"""A loopback OTLP/HTTP trace receiver for tests and benchmarks: what a collector (Jaeger,
Tempo, Langfuse) would be, decoding each POST with opentelemetry-proto.

    with OtlpReceiver() as rx:              # 127.0.0.1, a port from the OS
        ... llmtap run --otlp rx.url ...
        spans = rx.wait_spans(3)            # decoded spans, attributes as Python values
        rx.answer = (503, {"retry-after": "0"})  # refuse what comes next
        rx.delay_s = 2.0                    # answer slowly
"""

from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start: int
    end: int
    attrs: dict[str, Any]
    status_code: int
    status_message: str
    trace_state: str
    resource: dict[str, Any] = field(default_factory=dict)


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.posts: list[dict[str, Any]] = []  # {"path", "headers", "spans": n}
        self.bodies: list[bytes] = []  # every POST's body as it arrived (secrets must not be in any)
        self.answer: tuple[int, dict[str, str]] = (200, {})
        self.refuse_next = 0  # with `answer` not 200: refuse only this many posts, then take them
        self.delay_s = 0.0
        self.refused = 0
        self.count_only = False  # benchmarks: count spans, keep none
        self.received = 0
        self._cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._release = threading.Event()  # ends a delay early when the test is done
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if not receiver.count_only:
                    with receiver._cond:
                        receiver.bodies.append(body)
                if receiver.delay_s:
                    receiver._release.wait(receiver.delay_s)
                with receiver._cond:
                    code, extra = receiver.answer
                    if code != 200 and receiver.refuse_next:
                        receiver.refuse_next -= 1
                        if not receiver.refuse_next:
                            receiver.answer = (200, {})
                if code != 200:
                    with receiver._cond:
                        receiver.refused += 1
                        receiver._cond.notify_all()
                    self._reply(code, b"", extra)
                    return
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                req = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                if receiver.count_only:  # a benchmark's collector: as little work as counting
                    with receiver._cond:
                        receiver.received += sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
                    self._reply(200, b"", {})
                    return
                got: list[Span] = []
                for rs in req.resource_spans:
                    resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            got.append(Span(s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                            s.kind, s.start_time_unix_nano, s.end_time_unix_nano,
                                            {kv.key: _value(kv.value) for kv in s.attributes},
                                            s.status.code, s.status.message, s.trace_state, resource))
                with receiver._cond:
                    receiver.received += len(got)
                    if not receiver.count_only:
                        receiver.spans.extend(got)
                        receiver.posts.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                               "spans": len(got)})
                    receiver._cond.notify_all()
                self._reply(200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString(), {})

            def _reply(self, code: int, body: bytes, extra: dict[str, str]) -> None:
                try:
                    self.send_response(code)
                    self.send_header("content-type", "application/x-protobuf")
                    self.send_header("content-length", str(len(body)))
                    for k, v in extra.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

        self._handler = Handler

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> OtlpReceiver:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def wait_spans(self, n: int, timeout: float = 30.0) -> list[Span]:
        """At least `n` spans received (raises after `timeout`)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.spans) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.spans)} spans received, {n} expected: "
                                         f"{[s.name for s in self.spans]}")
                self._cond.wait(left)
            return list(self.spans)

    def wait_refused(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.refused < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.refused} posts refused, {n} expected")
                self._cond.wait(left)

    def calls(self) -> dict[str, Span]:
        """The call spans (those with children or gen_ai attributes) by llmtap.call.id."""
        with self._cond:
            return {s.attrs["llmtap.call.id"]: s for s in self.spans if "llmtap.call.id" in s.attrs}

    def children(self, span: Span) -> list[Span]:
        with self._cond:
            return sorted((s for s in self.spans if s.parent_span_id == span.span_id and s.trace_id == span.trace_id),
                          key=lambda s: s.attrs.get("llmtap.attempt.n", 0))


def main() -> int:
    """Standalone, for benchmarks: prints `READY URL`, counts spans, and on SIGTERM prints
    `RECEIVED N` and exits."""
    import signal
    import sys

    rx = OtlpReceiver()
    rx.count_only = True
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with rx:
        print(f"READY {rx.url}", flush=True)
        stop.wait()
    print(f"RECEIVED {rx.received}", flush=True)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
