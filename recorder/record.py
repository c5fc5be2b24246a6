"""The hand-off between the proxy and the recorder.

The proxy fills a `Call` with what it saw on the wire (headers already redacted, bodies as
raw bytes) and hands it over through the `Sink` protocol. Everything expensive -- decoding,
extraction of reasoning/content/tool calls/usage, DuckDB -- happens on the recorder's side,
off the proxy's event loop.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

from llmtap.dialects import registry

# Body limits and their notes are the framing's, shared by the proxy and the recorder.
from llmtap.dialects.framing import DEFAULT_BODY_LIMIT, body_cut_note, size_text  # noqa: F401

# Values of `Call.api`: the wire dialect of the request (column `calls.api`).
API_OPENAI_CHAT = "openai.chat"
API_OPENAI_RESPONSES = "openai.responses"
API_ANTHROPIC_MESSAGES = "anthropic.messages"
API_OLLAMA_CHAT = "ollama.chat"
API_GEMINI_GENERATE = "gemini.generate"
API_OTHER = "other"
APIS = (
    API_OPENAI_CHAT,
    API_OPENAI_RESPONSES,
    API_ANTHROPIC_MESSAGES,
    API_OLLAMA_CHAT,
    API_GEMINI_GENERATE,
    API_OTHER,
)

def detect_api(method: str, path: str) -> str:
    """The dialect of a request from its method and URL path (any gateway or base prefix): see
    llmtap.dialects.registry.detect."""
    return registry.detect(method, path).name


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ulid_lock = threading.Lock()
_ulid_last: tuple[int, int] = (0, 0)


def new_id(now_ms: int | None = None) -> str:
    """A ULID: 26 characters, sortable by creation time, monotonic within one process."""
    global _ulid_last
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    with _ulid_lock:
        last_ms, last_rand = _ulid_last
        if ms <= last_ms:
            # Same millisecond (or a clock step back): keep order by incrementing.
            ms, rand = last_ms, last_rand + 1
        else:
            rand = int.from_bytes(os.urandom(10), "big")
        _ulid_last = (ms, rand)
    value = (ms << 80) | (rand & ((1 << 80) - 1))
    out = []
    for _ in range(26):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(slots=True)
class Attempt:
    """One upstream attempt of a call: a row of the `attempts` table."""

    call_id: str
    n: int  # 1-based position in the fallback chain
    provider: str | None
    url: str
    model_sent: str | None
    started_at: datetime
    status: int | None = None  # upstream HTTP status, None when no response arrived
    error: str | None = None  # e.g. "connect: connection refused", "timeout: first byte after 60s"
    duration_ms: float | None = None
    ttfb_ms: float | None = None


@dataclass(slots=True)
class Call:
    """One client request and what the client got back: a row of the `calls` table.

    Filled in by the proxy. Headers are redacted before the Call is built; bodies stay raw
    bytes (exactly what crossed the wire to/from the client; `response_body` is decoded by the
    recorder, which also runs the extraction that fills the fields marked 'recorder').
    """

    id: str
    started_at: datetime
    method: str
    url: str  # as the client addressed it (gateway URL or intercepted https URL), secrets redacted
    api: str = API_OTHER
    client: str | None = None  # User-Agent
    status: int | None = None  # what the client got; None while in progress
    model_requested: str | None = None
    model_sent: str | None = None
    provider: str | None = None  # provider of the attempt whose answer the client got
    route: str | None = None  # the matching route's name, None when no rule matched
    attempts: int = 0
    stream: bool | None = None  # request asked for a stream
    ttfb_ms: float | None = None  # first response byte forwarded to the client
    duration_ms: float | None = None  # None while in progress
    request_headers: dict[str, str] = field(default_factory=dict)
    request_body: bytes = b""
    response_headers: dict[str, str] = field(default_factory=dict)
    response_body: bytes = b""  # as the client received it (content-encoding intact)
    error: str | None = None  # proxy-side failure, e.g. "upstream cut the stream: reset"
    notes: list[str] = field(default_factory=list)  # what went wrong, e.g. "request body is not JSON"
    # Filled in by the recorder from the bytes above:
    model_reported: str | None = None
    complete: bool | None = None
    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[dict] | None = None
    finish_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    total_tokens: int | None = None
    # The credential values the call carried (client headers, cookies, query keys, and the keys
    # llmtap sent upstream), so the recorder can mask them wherever they reappear.
    secrets: tuple[str, ...] = ()


class RecorderError(Exception):
    """The database cannot be opened at start; the message says what to do."""


class Sink(Protocol):
    """Where the proxy hands records. Every method must return at once (it runs on the
    proxy's event loop) and must never raise."""

    def call_started(self, call: Call) -> None:
        """The request arrived; `call` has request fields only."""

    def call_chunk(self, call_id: str, chunk: bytes) -> None:
        """A piece of the response body was forwarded to the client (for live views)."""

    def call_finished(self, call: Call, attempts: list[Attempt]) -> None:
        """The exchange ended (normally, by error, or by disconnect)."""


class QueuedSink:
    """The Sink side of a recorder: the proxy's calls only append to a bounded deque, which
    another thread drains.

    Over the bound the oldest records go (the newest tell the user most about what is
    happening now), and the finished calls among them are counted in `dropped_total`, for the
    `dropped` table. A lost start only costs the in-progress row; the call still lands. Chunks
    only feed live views (the finished call carries its whole body), so when the drainer is
    behind they are the first to go: they may fill only half the queue, leaving the other half
    to starts and ends.
    """

    def __init__(self, queue_limit: int) -> None:
        self.queue_limit = queue_limit
        self._queue: deque[tuple] = deque()
        # Written by the feeding thread only, so no increment is lost without a lock.
        self.dropped_total = 0

    def call_started(self, call: Call) -> None:
        self._put(("started", call))

    def call_chunk(self, call_id: str, chunk: bytes) -> None:
        q = self._queue
        if len(q) < self.queue_limit // 2:
            q.append(("chunk", call_id, chunk))
            if len(q) == 1:
                self._first()

    def call_finished(self, call: Call, attempts: list[Attempt]) -> None:
        self._put(("finished", call, attempts))

    def _put(self, item: tuple) -> None:
        q = self._queue
        while len(q) >= self.queue_limit:
            try:
                old = q.popleft()  # deque ops are atomic: the drainer may take items meanwhile
            except IndexError:
                break
            if old[0] == "finished":
                self.dropped_total += 1
        q.append(item)
        if len(q) == 1:
            self._first()

    def _first(self) -> None:
        """A record arrived in an empty queue (everything before it was drained)."""

    def _drain(self) -> list[tuple]:
        items = []
        q = self._queue
        while q:
            items.append(q.popleft())
        return items


def without_brief(items: list[tuple]) -> list[tuple]:
    """Queued items without the start and chunks of a call that also ends among them: no live
    view can have seen such a call, so its finished item, with the whole body, is all it needs."""
    ending = {item[1].id for item in items if item[0] == "finished"}
    if not ending:
        return items
    return [item for item in items
            if not ((item[0] == "started" and item[1].id in ending) or (item[0] == "chunk" and item[1] in ending))]


class MemorySink:
    """Keeps everything in memory; for tests and for running without a database."""

    def __init__(self) -> None:
        self.started: list[Call] = []
        self.chunks: dict[str, list[bytes]] = {}
        self.finished: list[tuple[Call, list[Attempt]]] = []
        self._cond = threading.Condition()

    def call_started(self, call: Call) -> None:
        with self._cond:
            self.started.append(call)
            self._cond.notify_all()

    def call_chunk(self, call_id: str, chunk: bytes) -> None:
        with self._cond:
            self.chunks.setdefault(call_id, []).append(chunk)

    def call_finished(self, call: Call, attempts: list[Attempt]) -> None:
        with self._cond:
            self.finished.append((call, attempts))
            self._cond.notify_all()

    def wait_finished(self, count: int, timeout: float = 10.0) -> list[tuple[Call, list[Attempt]]]:
        """Block until `count` calls have finished; raises TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.finished) >= count, timeout):
                raise TimeoutError(f"{len(self.finished)} of {count} calls finished")
            return list(self.finished)
