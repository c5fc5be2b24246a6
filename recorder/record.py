"""The hand-off between the proxy and the recorder, and what both sides share.

The proxy hands the recorder frozen events (see `events`: a call started, its response head, a
chunk, the call finished) through the `Sink` protocol, and never changes one once handed over.
Everything expensive -- decoding, extraction of reasoning/content/tool calls/usage, DuckDB --
happens on the recorder's side, off the proxy's event loop, where each call's events are gathered
into a `Call`: the recorder's own working state for a `calls` row.
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
from llmtap.recorder.events import Adopt, Attempt, CallFinished, CallStarted, Chunk, Event, ResponseHead

__all__ = ["Adopt", "Attempt", "Call", "CallFinished", "CallStarted", "Chunk", "ResponseHead", "Sink", "QueuedSink"]

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


CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # the ULID alphabet (scripts/make_big_db.py spells ids in it too)
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
        out.append(CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(slots=True)
class Call:
    """One client request and what the client got back: a row of the `calls` table, as the
    recorder gathers it from the call's events (`of_start`, `head`, `of_finish`).

    The recorder's own: the proxy never sees one. Headers arrive redacted; bodies stay raw
    bytes (exactly what crossed the wire to/from the client; `response_body` is decoded by the
    recorder, which also runs the extraction that fills the fields marked 'recorder').
    Tests and benchmarks that make a record by hand fill one and hand over its `started()`
    and `finished()` events.
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
    client_left: bool = False  # events.CallFinished.client_left
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
    # A session label the user gave without touching the tool (sessions.py): ("wrap", NAME) from
    # the proxy URL's user part (`llmtap wrap --session NAME`), ("path", NAME) from the gateway's
    # /s/NAME/ prefix.
    session_label: tuple[str, str] | None = None
    # The session headers the client sent (sessions.SESSION_HEADERS), as sent: the redaction
    # masks any header named *session* in `request_headers`, and 4 hex digits of a hash would
    # make different sessions one.
    session_headers: dict[str, str] | None = None

    @classmethod
    def of_start(cls, e: CallStarted) -> Call:
        return cls(id=e.id, started_at=e.started_at, method=e.method, url=e.url, api=e.api, client=e.client,
                   model_requested=e.model_requested, stream=e.stream, route=e.route,
                   request_headers=dict(e.request_headers), request_body=e.request_body, notes=list(e.notes),
                   secrets=e.secrets, session_label=e.session_label,
                   session_headers=dict(e.session_headers) if e.session_headers else None)

    def head(self, e: ResponseHead) -> None:
        """What a live extraction of the body needs, before the call finishes."""
        self.status, self.response_headers = e.status, dict(e.headers)
        self.provider, self.model_sent = e.provider, e.model_sent

    @classmethod
    def of_finish(cls, e: CallFinished) -> Call:
        call = cls.of_start(e.start)
        call.status, call.provider, call.model_sent = e.status, e.provider, e.model_sent
        call.response_headers, call.response_body = dict(e.response_headers), e.response_body
        call.ttfb_ms, call.duration_ms, call.attempts = e.ttfb_ms, e.duration_ms, e.attempts
        call.error, call.notes, call.client_left = e.error, list(e.notes), e.client_left
        return call

    def started(self) -> CallStarted:
        """The event of this call's start, from its request fields."""
        return CallStarted(id=self.id, started_at=self.started_at, method=self.method, url=self.url, api=self.api,
                           client=self.client, model_requested=self.model_requested, stream=self.stream,
                           route=self.route, request_headers=dict(self.request_headers),
                           request_body=self.request_body, notes=tuple(self.notes), secrets=self.secrets,
                           session_label=self.session_label, session_headers=self.session_headers)

    def responded(self) -> ResponseHead:
        """The event of this call's response head, from its status and headers as they stand."""
        return ResponseHead(self.id, self.status or 0, dict(self.response_headers), self.provider, self.model_sent,
                            self.ttfb_ms or 0.0)

    def finished(self, attempts: list[Attempt] | tuple[Attempt, ...] = ()) -> CallFinished:
        """The event of this call's end, from its fields as they stand."""
        return CallFinished(start=self.started(), status=self.status, provider=self.provider,
                            model_sent=self.model_sent, response_headers=dict(self.response_headers),
                            response_body=self.response_body, ttfb_ms=self.ttfb_ms, duration_ms=self.duration_ms,
                            attempts=self.attempts, tries=tuple(attempts), error=self.error, notes=tuple(self.notes),
                            client_left=self.client_left)


class RecorderError(Exception):
    """The database cannot be opened at start; the message says what to do."""


class Sink(Protocol):
    """Where the proxy hands a call's events. Every method must return at once (it runs on the
    proxy's event loop) and must never raise. An event is never changed once handed over."""

    def call_started(self, event: CallStarted) -> None:
        """The request arrived."""

    def response_head(self, event: ResponseHead) -> None:
        """The head of the answer the client gets arrived; its body's chunks follow."""

    def call_chunk(self, event: Chunk) -> None:
        """A piece of the response body was forwarded to the client (for live views)."""

    def call_finished(self, event: CallFinished) -> None:
        """The exchange ended (normally, by error, or by disconnect)."""


class QueuedSink:
    """The Sink side of a recorder: the proxy's calls only append to a bounded deque, which
    another thread drains.

    Over the bound the oldest events go (the newest tell the user most about what is
    happening now), and the finished calls among them are counted in `dropped_total`, for the
    `dropped` table. A lost start or head only costs the in-progress row or its live view; the
    call still lands. Chunks only feed live views (the finished call carries its whole body),
    so when the drainer is behind they are the first to go: they may fill only half the queue,
    leaving the other half to starts, heads and ends.
    """

    def __init__(self, queue_limit: int) -> None:
        self.queue_limit = queue_limit
        self._queue: deque[Event] = deque()
        # Written by the feeding thread only, so no increment is lost without a lock.
        self.dropped_total = 0

    def call_started(self, event: CallStarted) -> None:
        self._put(event)

    def response_head(self, event: ResponseHead) -> None:
        self._put(event)

    def call_chunk(self, event: Chunk) -> None:
        q = self._queue
        if len(q) < self.queue_limit // 2:
            q.append(event)
            if len(q) == 1:
                self._first()

    def call_finished(self, event: CallFinished) -> None:
        self._put(event)

    def _put(self, item: Event) -> None:
        q = self._queue
        while len(q) >= self.queue_limit:
            try:
                old = q.popleft()  # deque ops are atomic: the drainer may take items meanwhile
            except IndexError:
                break
            if type(old) is CallFinished:
                self.dropped_total += 1
        q.append(item)
        if len(q) == 1:
            self._first()

    def _first(self) -> None:
        """An event arrived in an empty queue (everything before it was drained)."""

    def _drain(self) -> list[Event]:
        items = []
        q = self._queue
        while q:
            items.append(q.popleft())
        return items


_BRIEF = frozenset({CallStarted, ResponseHead, Chunk})


def without_brief(items: list[Event]) -> list[Event]:
    """Queued events without the start, head and chunks of a call that also ends among them: no
    live view can have seen such a call, so its finished event, with the whole body, is all it
    needs."""
    ending = {item.start.id for item in items if type(item) is CallFinished}  # type: ignore[union-attr]
    if not ending:
        return items
    brief = _BRIEF
    return [item for item in items
            if type(item) not in brief or item.call_id not in ending]  # type: ignore[union-attr]


class MemorySink:
    """Keeps every event in memory; for tests and for running without a database."""

    def __init__(self) -> None:
        self.started: list[CallStarted] = []
        self.heads: list[ResponseHead] = []
        self.chunks: dict[str, list[bytes]] = {}
        self.finished: list[tuple[CallFinished, list[Attempt]]] = []
        self.events: list[Event] = []  # all of them, in the order they came
        self._cond = threading.Condition()

    def call_started(self, event: CallStarted) -> None:
        with self._cond:
            self.started.append(event)
            self.events.append(event)
            self._cond.notify_all()

    def response_head(self, event: ResponseHead) -> None:
        with self._cond:
            self.heads.append(event)
            self.events.append(event)

    def call_chunk(self, event: Chunk) -> None:
        with self._cond:
            self.chunks.setdefault(event.call_id, []).append(event.data)
            self.events.append(event)

    def call_finished(self, event: CallFinished) -> None:
        with self._cond:
            self.finished.append((event, list(event.tries)))
            self.events.append(event)
            self._cond.notify_all()

    def wait_finished(self, count: int, timeout: float = 10.0) -> list[tuple[CallFinished, list[Attempt]]]:
        """Block until `count` calls have finished; raises TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.finished) >= count, timeout):
                raise TimeoutError(f"{len(self.finished)} of {count} calls finished")
            return list(self.finished)
