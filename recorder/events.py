"""The hand-off between the proxy and the recorder: typed, frozen events.

The proxy tells the recorder what happened to a call as it happens, once each: the request
arrived (`CallStarted`), its answer's head arrived (`ResponseHead`), a piece of the answer was
forwarded to the client (`Chunk`), the exchange ended (`CallFinished`, with every upstream
`Attempt`). An event is never changed once handed over, so the recorder (in its own thread or
process) reads it without a lock, and the proxy keeps its own working state to itself. The
recorder builds its rows from these events (keeping its own per-call state, `record.Call`).

Headers are redacted before an event is made; bodies stay the raw bytes that crossed the wire.
Header mappings are plain dicts, for pickling, and are treated as read-only by both sides.

To the recorder process (see `process`) each event travels as a plain tuple of its fields
(`to_wire` / `from_wire`): a tuple pickles in a fraction of the time of the dataclass.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from llmtap.dialects.shapes import fast_init

API_OTHER = "other"  # record.API_OTHER, repeated: record imports this module


@fast_init
@dataclass(frozen=True, slots=True)
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


@fast_init
@dataclass(frozen=True, slots=True)
class CallStarted:
    """A client request arrived: everything known about the call before any upstream answered."""

    id: str  # a ULID (record.new_id)
    started_at: datetime
    method: str
    url: str  # as the client addressed it (gateway URL or intercepted https URL), secrets redacted
    api: str = API_OTHER  # the wire dialect (record.detect_api)
    client: str | None = None  # User-Agent
    model_requested: str | None = None
    stream: bool | None = None  # the request asked for a stream
    route: str | None = None  # the matching route's name, None when no rule matched
    request_headers: Mapping[str, str] = field(default_factory=dict)
    request_body: bytes = b""  # as the client sent it (decoded of its content-encoding)
    notes: tuple[str, ...] = ()  # what was wrong with the request, e.g. "request body is not JSON"
    # The credential values the call carried (client headers, cookies, query keys, and the keys
    # llmtap may send upstream), so the recorder can mask them wherever they reappear.
    secrets: tuple[str, ...] = ()
    # A session label the user gave without touching the tool (sessions.py): ("wrap", NAME) from
    # the proxy URL's user part (`llmtap wrap --session NAME`), ("path", NAME) from the gateway's
    # /s/NAME/ prefix.
    session_label: tuple[str, str] | None = None
    # The session headers the client sent (sessions.SESSION_HEADERS), as sent: the redaction
    # masks any header named *session* in `request_headers`, and 4 hex digits of a hash would
    # make different sessions one.
    session_headers: Mapping[str, str] | None = None

    @property
    def call_id(self) -> str:
        return self.id


@fast_init
@dataclass(frozen=True, slots=True)
class ResponseHead:
    """The head of the answer the client gets arrived (the relay emits it before forwarding
    any of the body): what a live view needs to read the body as it streams."""

    call_id: str
    status: int
    headers: Mapping[str, str]  # redacted, hop-by-hop headers left out
    provider: str | None  # of the attempt whose answer this is
    model_sent: str | None
    ttfb_ms: float  # when the head reached llmtap, ms after the relay took the call


@fast_init
@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of the response body, after it was forwarded to the client."""

    call_id: str
    data: bytes


@fast_init
@dataclass(frozen=True, slots=True)
class CallFinished:
    """The exchange ended (normally, by error, or by the client leaving): the call's final values.

    Carries its `start` whole, so that a call whose start never reached the recorder (dropped
    under load, or never sent: llmtap's own refusals) is still recorded in full.
    """

    start: CallStarted
    status: int | None = None  # what the client got; None when it got no status at all
    provider: str | None = None  # of the attempt whose answer the client got
    model_sent: str | None = None
    response_headers: Mapping[str, str] = field(default_factory=dict)
    response_body: bytes = b""  # as the client received it (content-encoding intact), up to the limit
    ttfb_ms: float | None = None  # first response byte forwarded to the client
    duration_ms: float | None = None
    attempts: int = 0  # upstream requests made (skipped targets not counted): `calls.attempts`
    tries: tuple[Attempt, ...] = ()  # every attempt, skipped ones included: the `attempts` rows
    error: str | None = None  # proxy-side failure, e.g. "upstream cut the stream: reset"
    notes: tuple[str, ...] = ()  # the start's notes, then what the answer added
    # The client closed its connection before the upstream's body ended. With `error` set to
    # why; the recorder clears that error when the answer the client got had already ended as
    # its API ends one (SDKs hang up on `[DONE]`, which may cross before the provider's end of
    # body does).
    client_left: bool = False

    # The request's side, read through: a finished call reads like the whole call.
    @property
    def id(self) -> str:
        return self.start.id

    @property
    def call_id(self) -> str:
        return self.start.id

    @property
    def started_at(self) -> datetime:
        return self.start.started_at

    @property
    def method(self) -> str:
        return self.start.method

    @property
    def url(self) -> str:
        return self.start.url

    @property
    def api(self) -> str:
        return self.start.api

    @property
    def client(self) -> str | None:
        return self.start.client

    @property
    def model_requested(self) -> str | None:
        return self.start.model_requested

    @property
    def stream(self) -> bool | None:
        return self.start.stream

    @property
    def route(self) -> str | None:
        return self.start.route

    @property
    def request_headers(self) -> Mapping[str, str]:
        return self.start.request_headers

    @property
    def request_body(self) -> bytes:
        return self.start.request_body

    @property
    def secrets(self) -> tuple[str, ...]:
        return self.start.secrets


@dataclass(frozen=True, slots=True)
class Adopt:
    """Calls a recorder before this one (a process that died) may have written, in progress or
    finished: the finished rows handed over next replace theirs."""

    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Dropped:
    """Finished calls the proxy's queue dropped since the last such event (`dropped` table)."""

    count: int


Event = CallStarted | ResponseHead | Chunk | CallFinished | Adopt | Dropped

# -- the wire to the recorder process ----------------------------------------------------------------
_started_fields = operator.attrgetter(*CallStarted.__slots__)
_attempt_fields = operator.attrgetter(*Attempt.__slots__)
_FINISHED_OWN = tuple(f for f in CallFinished.__slots__ if f not in ("start", "tries"))
_finished_fields = operator.attrgetter(*_FINISHED_OWN)
_head_fields = operator.attrgetter(*ResponseHead.__slots__)


def _finished_wire(fin: CallFinished) -> tuple:
    return ("F", _started_fields(fin.start), _finished_fields(fin), [_attempt_fields(a) for a in fin.tries])


_ENCODE: dict[type, Callable[[Any], tuple]] = {
    Chunk: lambda e: ("C", e.call_id, e.data),
    CallFinished: _finished_wire,
    CallStarted: lambda e: ("S", _started_fields(e)),
    ResponseHead: lambda e: ("H", _head_fields(e)),
    Adopt: lambda e: ("A", tuple(e.ids)),
    Dropped: lambda e: ("D", e.count),
}


def to_wire(event: Event) -> tuple:
    """The event as a tuple of plain values, tagged by its kind."""
    try:
        encode = _ENCODE[type(event)]
    except KeyError:
        raise TypeError(f"not an event: {event!r}") from None
    return encode(event)


def from_wire(item: tuple) -> Event:
    """The event `to_wire` made `item` of."""
    tag = item[0]
    if tag == "C":
        return Chunk(item[1], item[2])
    if tag == "F":
        own: dict[str, Any] = dict(zip(_FINISHED_OWN, item[2]))
        return CallFinished(CallStarted(*item[1]), tries=tuple(Attempt(*a) for a in item[3]), **own)
    if tag == "S":
        return CallStarted(*item[1])
    if tag == "H":
        return ResponseHead(*item[1])
    if tag == "A":
        return Adopt(tuple(item[1]))
    if tag == "D":
        return Dropped(item[1])
    raise ValueError(f"not an event on the wire: tag {tag!r}")


def wire_call_id(item: tuple) -> str | None:
    """The id of the finished call a wire item carries, else None."""
    return item[1][0] if item[0] == "F" else None
