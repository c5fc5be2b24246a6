"""The in-process relay: upstream attempts with fallbacks, and the tee of the stream.

mitmproxy cannot fall back inside its own upstream connection (a response replaced in
`responseheaders` is corrupted, one replaced in `response` reaches the client in one piece, and
on a connection failure mitmproxy sends its own 502): once it has asked an
upstream, an error is what the client gets. So the routing addon points every LLM flow at this
relay, served on 127.0.0.1 inside the same process, and hands it a `Plan` keyed by a header.
The relay tries the plan's targets in order while nothing has reached the client, then forwards
the chosen answer chunk by chunk. It tells the recorder what happens as it happens, in frozen
events (see llmtap.recorder.events): the response head as soon as it arrived, each chunk after
it was written (so recording never delays the stream), and the finished call with its attempts.
What it works out meanwhile stays in the exchange's own state, never in an event handed over.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from llmtap.addons.upstream import Origin, Pool, Response, StreamCut, UpstreamError, UpstreamTimeout
from llmtap.dialects import registry
from llmtap.recorder.events import Attempt, CallFinished, CallStarted, Chunk, ResponseHead
from llmtap.recorder.record import DEFAULT_BODY_LIMIT, Sink, body_cut_note, utcnow
from llmtap.recorder.redact import redact_headers

log = logging.getLogger("llmtap.relay")

PLAN_HEADER = "x-llmtap-plan"
# Headers that describe one connection, not the message (RFC 9110 7.6.1); never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


@dataclass(frozen=True, slots=True)
class Policy:
    """Retry behaviour of one plan (from its route, or the defaults when none matched)."""

    attempts: int = 1
    backoff_ms: int = 200
    on_connect: bool = True
    on_timeout: bool = True
    statuses: Callable[[int], bool] = lambda status: False
    retry_after_cap_s: float = 30.0
    connect_s: float = 10.0
    first_byte_s: float = 120.0


@dataclass(slots=True)
class Target:
    """One place to send the request, with everything needed to build it."""

    provider: str | None  # None: pass-through to where the client addressed it
    origin: Origin
    target: str  # request-target (path and query) on that origin
    headers: list[tuple[bytes, bytes]]
    body: bytes
    model: str | None

    @property
    def url(self) -> str:
        default = 443 if self.origin.tls else 80
        port = "" if self.origin.port == default else f":{self.origin.port}"
        return f"{self.origin.scheme}://{self.origin.host}{port}{self.target}"


@dataclass(slots=True)
class Plan:
    call: CallStarted  # already handed to the recorder
    method: str
    targets: list[Target]
    policy: Policy
    api_family: str  # openai | anthropic | ollama | gemini | other: shapes llmtap's own errors
    created: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class _Try:
    """An attempt while it is under way; handed to the recorder as a frozen `Attempt`."""

    call_id: str
    n: int
    provider: str | None
    url: str
    model_sent: str | None
    started_at: datetime
    status: int | None = None
    error: str | None = None
    duration_ms: float | None = None
    ttfb_ms: float | None = None

    def frozen(self) -> Attempt:
        return Attempt(self.call_id, self.n, self.provider, self.url, self.model_sent, self.started_at,
                       self.status, self.error, self.duration_ms, self.ttfb_ms)


class Cooldown:
    """Skips a provider that keeps failing, so every call does not pay for it first."""

    def __init__(self, threshold: int = 3, seconds: float = 30.0) -> None:
        self.threshold = threshold
        self.seconds = seconds
        self._fails: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def cooling(self, provider: str | None) -> bool:
        if provider is None:
            return False
        until = self._until.get(provider)
        if until is None:
            return False
        if time.monotonic() >= until:
            # Half-open: the next call tries it again; one more failure re-arms at once.
            del self._until[provider]
            self._fails[provider] = self.threshold - 1
            return False
        return True

    def failure(self, provider: str | None) -> None:
        if provider is None or self.threshold <= 0:
            return
        count = self._fails.get(provider, 0) + 1
        self._fails[provider] = count
        if count >= self.threshold:
            self._until[provider] = time.monotonic() + self.seconds

    def success(self, provider: str | None) -> None:
        if provider is not None:
            self._fails.pop(provider, None)
            self._until.pop(provider, None)


class Relay:
    """HTTP/1.1 server on 127.0.0.1 whose only client is this process's mitmproxy."""

    def __init__(self, sink: Sink, *, pool: Pool | None = None, cooldown: Cooldown | None = None,
                 on_finished: Callable[[CallFinished], None] | None = None,
                 body_limit: int = DEFAULT_BODY_LIMIT, stream_idle_s: float = 300.0) -> None:
        """`body_limit`: what one exchange may hold in memory for the record (`llmtap run
        --max-body`); the stream itself is never capped. `stream_idle_s`: the least silence
        inside a streamed body that ends it as idle (a route's first_byte_s may ask for more):
        reasoning models may pause long between events once streaming."""
        self.sink = sink
        self.body_limit = body_limit
        self.stream_idle_s = stream_idle_s
        self.pool = pool or Pool()
        self.cooldown = cooldown or Cooldown()
        self.on_finished = on_finished
        self._plans: dict[str, Plan] = {}
        self._server: asyncio.Server | None = None
        self._conns: set[_RelayConnection] = set()
        self.port = 0

    # -- plans -------------------------------------------------------------------------------
    def add_plan(self, plan: Plan) -> str:
        key = secrets.token_hex(12)
        self._plans[key] = plan
        return key

    def drop_plan(self, key: str) -> Plan | None:
        """Called when mitmproxy never delivered a planned request (its own error)."""
        return self._plans.pop(key, None)

    # -- server ------------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _RelayConnection(self), host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in (conn.abort("llmtap is shutting down") for conn in list(self._conns)) if t]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.pool.aclose()

    def finished(self, event: CallFinished) -> None:
        """The one hand-off of a finished call: to the recorder, then to the line printer."""
        try:
            self.sink.call_finished(event)
        except Exception:
            log.exception("recorder refused a finished call")
        if self.on_finished is not None:
            try:
                self.on_finished(event)
            except Exception:
                log.exception("call line printer failed")


class _RelayConnection(asyncio.Protocol):
    """One connection from mitmproxy: requests one at a time, each answered by an _Exchange.

    A protocol rather than asyncio streams: it costs one task per request instead of three
    (the exchange, a reader watching for the client leaving, and the wait on both), which is
    a measurable share of the relay's per-call overhead. mitmproxy sends nothing more on a
    connection until our answer ends, so its closing the connection meanwhile can only mean
    the client went away: connection_lost cancels the exchange, and with it the upstream.
    """

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.exchange: _Exchange | None = None
        self.task: asyncio.Task | None = None
        self.closed = False
        self._paused = False
        self._drain: asyncio.Future | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.relay._conns.add(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.task is None:
            self._next_request()

    def eof_received(self) -> bool:
        return False  # a half-closed mitmproxy connection is a finished one: close our side

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay._conns.discard(self)
        self._wake(ConnectionResetError("mitmproxy closed the relay connection"))
        self.abort("client disconnected", client_left=True)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake(None)

    # -- what _Exchange writes through -----------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("mitmproxy closed the relay connection")
        if self._paused:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def _wake(self, exc: Exception | None) -> None:
        waiter, self._drain = self._drain, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    # -- requests --------------------------------------------------------------------------------
    def _next_request(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > 1 << 20:
                self._refuse(431, b"request head too large")
            return
        try:
            key, length = _parse_head(bytes(self.buf[:end + 4]))
        except ValueError:
            self._refuse(400, b"bad request head")
            return
        # Admission on the head alone: any local process can connect to this port, and one
        # without a plan (an unguessable key only this process's mitmproxy knows) must not
        # make us wait for, or hold, a body of its choosing.
        plan = self.relay._plans.get(key) if key else None
        if plan is None or key is None:
            self.buf.clear()
            self._refuse(403, b"llmtap relay: no valid llmtap plan; this port serves only llmtap's own proxy")
            return
        if length:
            # mitmproxy hands the body over in the plan and sends none; a planned request
            # that declares one is not from our mitmproxy.
            self.relay._plans.pop(key, None)
            self.buf.clear()
            self._refuse(400, b"llmtap relay: unexpected request body")
            return
        del self.buf[:end + 4]
        del self.relay._plans[key]
        self.exchange = _Exchange(self.relay, plan, self)
        self.task = asyncio.get_running_loop().create_task(self._serve(self.exchange))

    async def _serve(self, exchange: _Exchange) -> None:
        try:
            keep = await exchange.run()
        except asyncio.CancelledError:
            return  # abort() recorded why
        except ConnectionError:
            keep = False  # mitmproxy went away mid-answer; connection_lost recorded it
        except Exception as exc:  # a bug of ours must not take the call down unrecorded
            log.exception("relay failed")
            exchange.finish(error=f"llmtap internal error: {exc!r}")
            keep = False
        self.task = self.exchange = None
        if not keep:
            if self.transport is not None:
                self.transport.close()
        elif self.buf:
            self._next_request()

    def abort(self, reason: str, *, client_left: bool = False) -> asyncio.Task | None:
        """Stop the exchange in flight (recording why) and drop the connection."""
        task, exchange = self.task, self.exchange
        if exchange is not None:
            exchange.disconnected(reason, client_left=client_left)
        if task is not None and not task.done():
            task.cancel()
        if self.transport is not None and not self.closed:
            self.transport.close()
        return task

    def _refuse(self, status: int, text: bytes) -> None:
        self.write(b"HTTP/1.1 %d -\r\ncontent-type: text/plain\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                   % (status, len(text), text))
        if self.transport is not None:
            self.transport.close()


class _Exchange:
    """The state of one call while the relay answers it."""

    def __init__(self, relay: Relay, plan: Plan, writer: _RelayConnection) -> None:
        self.relay = relay
        self.plan = plan
        self.call = plan.call
        self.writer = writer
        self.attempts: list[_Try] = []
        self.parts: list[bytes] = []
        self.recorded = 0
        self.t0 = time.monotonic()
        self.sent_head = False
        self.done = False
        # What the client got, as it becomes known; handed over in the head and finished events.
        self.status: int | None = None
        self.provider: str | None = None
        self.model_sent: str | None = None
        self.response_headers: dict[str, str] = {}
        self.ttfb_ms: float | None = None
        self.notes: list[str] = []  # what the answer adds to the request's notes

    # Every path out of run() ends in finish(); disconnected() covers cancellation.
    async def run(self) -> bool:
        plan, policy, cooldown = self.plan, self.plan.policy, self.relay.cooldown
        last_error: tuple[Response, bytes] | None = None
        usable = [t for t in plan.targets if not cooldown.cooling(t.provider)]
        if not usable:  # everything is cooling down: trying beats refusing
            usable = list(plan.targets)
        skipped = [t for t in plan.targets if t not in usable]
        for target in skipped:
            self._attempt(target).error = "skipped: provider cooling down after repeated failures"
        total = len(usable) * policy.attempts
        tried = 0
        for target in usable:
            for i in range(policy.attempts):
                tried += 1
                is_last = tried == total
                attempt = self._attempt(target)
                t_start = time.monotonic()
                try:
                    resp = await self.relay.pool.request(
                        plan.method, target.origin, target.target, target.headers, target.body,
                        connect_timeout=policy.connect_s, first_byte_timeout=policy.first_byte_s,
                        idle_timeout=max(policy.first_byte_s, self.relay.stream_idle_s),
                    )
                except UpstreamError as exc:
                    attempt.error = str(exc)
                    attempt.duration_ms = _ms(t_start)
                    cooldown.failure(target.provider)
                    retry = policy.on_timeout if isinstance(exc, UpstreamTimeout) else policy.on_connect
                    if not retry:
                        return await self._fail(last_error)
                    if not is_last and i + 1 < policy.attempts:
                        await asyncio.sleep(policy.backoff_ms * (2**i) / 1000)
                    continue
                attempt.status = resp.status
                attempt.ttfb_ms = _ms(t_start)
                if resp.status >= 400 and policy.statuses(resp.status) and not is_last:
                    body = await resp.aread()
                    attempt.duration_ms = _ms(t_start)
                    attempt.error = _error_summary(body)
                    cooldown.failure(target.provider)
                    last_error = (resp, body)
                    if i + 1 < policy.attempts:
                        await asyncio.sleep(self._backoff(policy, i, resp))
                    continue
                if resp.status < 500 and resp.status != 429:
                    cooldown.success(target.provider)
                elif policy.statuses(resp.status):
                    cooldown.failure(target.provider)
                # The last target's error goes to the client as sent, streamed like any answer.
                gave_up = resp.status >= 400 and policy.statuses(resp.status)
                return await self._forward(target, attempt, resp, t_start, gave_up=gave_up)
        return await self._fail(last_error)

    def _attempt(self, target: Target) -> _Try:
        attempt = _Try(
            call_id=self.call.id, n=len(self.attempts) + 1, provider=target.provider,
            url=target.url, model_sent=target.model, started_at=utcnow(),
        )
        self.attempts.append(attempt)
        return attempt

    @staticmethod
    def _backoff(policy: Policy, i: int, resp: Response) -> float:
        wait = policy.backoff_ms * (2**i) / 1000
        hint = _retry_after_s(resp.header(b"retry-after"))
        if hint is not None:
            wait = max(wait, min(hint, policy.retry_after_cap_s))
        return wait

    async def _forward(self, target: Target, attempt: _Try, resp: Response, t_start: float,
                       gave_up: bool = False) -> bool:
        self.provider = target.provider
        self.model_sent = target.model
        self.status = resp.status
        headers = [(k, v) for k, v in resp.headers if k not in HOP_BY_HOP]
        has_length = any(k == b"content-length" for k, _ in headers)
        self.response_headers = redact_headers((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers)
        self._head()
        head = [b"HTTP/1.1 %d %s\r\n" % (resp.status, resp.reason or b"-")]
        head += [k + b": " + v + b"\r\n" for k, v in headers]
        if not has_length:
            head.append(b"transfer-encoding: chunked\r\n")
        head.append(b"\r\n")
        writer = self.writer
        writer.write(b"".join(head))
        self.sent_head = True
        error: str | None = None
        try:
            async for chunk in resp.aiter_raw():
                if not chunk:
                    continue
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if not has_length else chunk)
                if self.ttfb_ms is None:
                    self.ttfb_ms = _ms(self.t0)
                # Kept before the wait: bytes handed to the transport may reach a client that
                # leaves during it, and the record must not hold less than the client got.
                self._tee(chunk)
                await writer.drain()
            if not has_length:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except StreamCut as exc:  # its message says how: reset, closed early, bad framing, idle
            error = str(exc)
        finally:
            # On a client disconnect (cancellation) this is what stops the upstream at once.
            await resp.aclose()
        attempt.duration_ms = _ms(t_start)
        if error:
            attempt.error = error
        cut = error is not None
        if not cut and gave_up:
            attempt.error = _error_summary(b"".join(self.parts))
            error = self._all_failed()
        self.finish(error=error)
        # After a cut the client must see the truncation, so the connection is dropped.
        return not cut

    def _tee(self, chunk: bytes) -> None:
        # Past the limit nothing is kept, nor handed to the recorder, whose live view would
        # otherwise hold what the record does not.
        limit = self.relay.body_limit
        room = limit - self.recorded
        if len(chunk) > room:
            if room < 0:
                return  # already past it, and said so
            self.notes.append(body_cut_note("response", limit))
            self.recorded = limit + 1
            if not room:
                return
            chunk = chunk[:room]
        else:
            self.recorded += len(chunk)
        self.parts.append(chunk)
        try:
            self.relay.sink.call_chunk(Chunk(self.call.id, chunk))
        except Exception:
            log.exception("recorder refused a chunk")

    async def _fail(self, last_error: tuple[Response, bytes] | None) -> bool:
        """Every target failed: the last upstream error as sent, or llmtap's own 502."""
        if last_error is not None:
            resp, body = last_error
            self.status = resp.status
            self.provider = self.attempts[-1].provider if self.attempts else None
            headers = [(k, v) for k, v in resp.headers if k not in HOP_BY_HOP and k != b"content-length"]
            self.response_headers = redact_headers((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers)
            status, reason = resp.status, resp.reason or b"-"
        else:
            body = _own_error(self.plan.api_family, self.attempts)
            headers = [(b"content-type", b"application/json")]
            self.response_headers = {"content-type": "application/json"}
            self.status = 502
            status, reason = 502, b"Bad Gateway"
        self._head()
        head = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        head += [k + b": " + v + b"\r\n" for k, v in headers]
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        self.writer.write(b"".join(head) + body)
        self.sent_head = True
        await self.writer.drain()
        self.ttfb_ms = _ms(self.t0)
        self._tee(body)
        self.finish(error=self._all_failed())
        return True

    def _all_failed(self) -> str:
        real = [a for a in self.attempts if not (a.error or "").startswith("skipped")]
        summary = "; ".join(f"#{a.n} {a.provider or a.url}: {a.status or ''} {a.error or ''}".strip() for a in real)
        return f"all {len(real)} attempts failed: {summary}"

    def disconnected(self, reason: str, *, client_left: bool = False) -> None:
        if self.done:
            return
        for attempt in self.attempts:
            if attempt.duration_ms is None:
                attempt.duration_ms = (utcnow() - attempt.started_at).total_seconds() * 1000
                # An answer being forwarded when the client left did not fail upstream: its
                # leaving is the call's error, not the attempt's (whose errors are the upstream's).
                if not (client_left and attempt.status is not None):
                    attempt.error = attempt.error or reason
        self.finish(error=reason, status=self.status if self.sent_head else 499, client_left=client_left)

    def _head(self) -> None:
        """Tell the recorder the head of the answer the client is about to get."""
        assert self.status is not None
        try:
            self.relay.sink.response_head(ResponseHead(self.call.id, self.status, self.response_headers,
                                                       self.provider, self.model_sent, _ms(self.t0)))
        except Exception:
            log.exception("recorder refused a response head")

    def finish(self, *, error: str | None = None, status: int | None = None, client_left: bool = False) -> None:
        if self.done:
            return
        self.done = True
        start = self.call
        self.relay.finished(CallFinished(
            start=start, status=status if status is not None else self.status, provider=self.provider,
            model_sent=self.model_sent, response_headers=self.response_headers, response_body=b"".join(self.parts),
            ttfb_ms=self.ttfb_ms, duration_ms=_ms(self.t0),
            attempts=sum(1 for a in self.attempts if not (a.error or "").startswith("skipped")),
            tries=tuple(a.frozen() for a in self.attempts), error=error or None,
            notes=(*start.notes, *self.notes) if self.notes else start.notes, client_left=client_left))


def _parse_head(head: bytes) -> tuple[str | None, int]:
    key: str | None = None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == PLAN_HEADER.encode():
            key = value.strip().decode("latin-1")
        elif name == b"content-length":
            length = int(value.strip() or 0)
    return key, length


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 3)


def _retry_after_s(value: bytes | None) -> float | None:
    if not value:
        return None
    text = value.decode("latin-1").strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(text) - utcnow()).total_seconds())
    except (TypeError, ValueError):
        return None


def _error_summary(body: bytes) -> str:
    """A one-line reason from a provider's error body, for the attempts table."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body[:200].decode("utf-8", "replace")
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        return str(err.get("message") or err.get("type") or err)[:300]
    return str(err)[:300]


def _own_error(api_family: str, attempts: list[_Try]) -> bytes:
    """llmtap's 502 when no upstream answered at all, in the request's own error format so
    the client's SDK shows a readable message."""
    tried = [
        {"n": a.n, "provider": a.provider, "url": a.url, "model": a.model_sent, "error": a.error}
        for a in attempts
    ]
    lines = "; ".join(f"#{a['n']} {a['provider'] or urlsplit(str(a['url'])).netloc}: {a['error']}" for a in tried)
    message = f"llmtap: no upstream answered ({lines or 'no target to try'})"
    return error_body(api_family, 502, message, "llmtap_no_upstream", attempts=tried)


def error_body(family: str, status: int, message: str, code: str, attempts: list[dict] | None = None) -> bytes:
    """llmtap's own error in the shape the client's SDK reads for its API family (its dialect's
    error body); `attempts` (the upstream tries that failed) ride along where that shape has room."""
    return registry.for_family(family).error_body(status, message, code, attempts)
