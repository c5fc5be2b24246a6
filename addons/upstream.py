"""A lean HTTP/1.1 client for the relay's upstream attempts.

Why not `httpx.AsyncClient`: on a kept-alive loopback connection its own per-request work
costs about 0.8 ms, more than half of what mitmproxy itself adds (FACTS.md). The relay needs
only a small part of a client -- one request at a time per connection, a keep-alive pool,
connect and first-byte timeouts, and a body streamed chunk by chunk -- so it drives h11 (the
protocol layer httpx is built on) directly over asyncio streams.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import h11

Headers = list[tuple[bytes, bytes]]

_READ_SIZE = 65536


class UpstreamError(Exception):
    """No usable response arrived. `kind` is a rules.yaml `on` word: connect or timeout."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class StreamCut(Exception):
    """The upstream stopped in the middle of a response body."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


@dataclass(slots=True)
class _Conn:
    origin: Origin
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    used: int = 0
    idle_since: float = 0.0

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # already gone: nothing left to release
            pass


class Response:
    """Status and headers of an upstream answer; the body is read with `aiter_raw`."""

    def __init__(self, pool: Pool, conn: _Conn, event: h11.Response, idle_timeout: float) -> None:
        self.status: int = event.status_code
        self.reason: bytes = event.reason
        self.headers: Headers = [(k, v) for k, v in event.headers]
        self._pool = pool
        self._conn: _Conn | None = conn
        self._idle_timeout = idle_timeout
        self._done = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives (transfer-encoding removed, content-encoding intact)."""
        conn = self._conn
        if conn is None:
            return
        while True:
            event = conn.h11.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await asyncio.wait_for(conn.reader.read(_READ_SIZE), self._idle_timeout)
                except TimeoutError:
                    await self.aclose()
                    raise StreamCut(f"no data for {self._idle_timeout:g}s") from None
                except OSError as exc:
                    await self.aclose()
                    raise StreamCut(_describe(exc)) from None
                try:
                    conn.h11.receive_data(data)
                except h11.RemoteProtocolError as exc:
                    await self.aclose()
                    raise StreamCut(f"bad framing: {exc}") from None
                continue
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
                self._release()
                return
            else:  # ConnectionClosed before the end, or a protocol error
                await self.aclose()
                raise StreamCut("connection closed before the body ended")

    async def aread(self, limit: int = 1 << 20) -> bytes:
        """The whole body, at most `limit` bytes (used for error bodies before a retry)."""
        parts: list[bytes] = []
        size = 0
        try:
            async for chunk in self.aiter_raw():
                parts.append(chunk)
                size += len(chunk)
                if size >= limit:
                    break
        except StreamCut:
            pass  # an error body cut short still says what it can
        await self.aclose()
        return b"".join(parts)

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(conn)

    async def aclose(self) -> None:
        """Stop reading; an unfinished body means the connection cannot be reused."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._done:
                self._pool._release(conn)
            else:
                conn.close()


class Pool:
    """Keep-alive connections per origin. One request at a time per connection."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, max_idle_per_origin: int = 32,
                 keepalive_s: float = 60.0) -> None:
        self._ssl = ssl_context or ssl.create_default_context()
        self._idle: dict[Origin, list[_Conn]] = {}
        self._max_idle = max_idle_per_origin
        self._keepalive_s = keepalive_s

    async def request(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        *,
        connect_timeout: float,
        first_byte_timeout: float,
        idle_timeout: float | None = None,
    ) -> Response:
        """Send a request and return once the response headers arrived.

        Raises UpstreamError("connect", ...) for any transport failure before the headers and
        UpstreamError("timeout", ...) for connect or first-byte timeouts.
        """
        # A pooled connection may have been closed by the server while idle; that shows only
        # when we use it. Such a failure, with no byte received, is retried once on a new one.
        for fresh in (False, True):
            conn = None if fresh else self._take_idle(origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, connect_timeout)
            try:
                return await self._exchange(conn, method, target, headers, body,
                                            first_byte_timeout, idle_timeout or first_byte_timeout)
            except _StaleConnection as exc:
                conn.close()
                if not reused:
                    raise UpstreamError("connect", exc.detail) from None
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    async def _connect(self, origin: Origin, timeout: float) -> _Conn:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    origin.host,
                    origin.port,
                    ssl=self._ssl if origin.tls else None,
                    server_hostname=origin.host if origin.tls else None,
                    limit=_READ_SIZE * 4,
                ),
                timeout,
            )
        except TimeoutError:
            raise UpstreamError("timeout", f"connect to {origin.host}:{origin.port} took over {timeout:g}s") from None
        except ssl.SSLError as exc:
            raise UpstreamError("connect", f"TLS with {origin.host}: {exc.reason or exc}") from None
        except OSError as exc:
            raise UpstreamError("connect", f"{origin.host}:{origin.port}: {_describe(exc)}") from None
        return _Conn(origin, reader, writer)

    async def _exchange(self, conn: _Conn, method: str, target: str,
                        headers: Sequence[tuple[bytes, bytes]], body: bytes,
                        first_byte_timeout: float, idle_timeout: float) -> Response:
        h = conn.h11
        try:
            out = h.send(h11.Request(method=method, target=target, headers=list(headers)))
            if body:
                out += h.send(h11.Data(data=body))
            out += h.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise UpstreamError("connect", f"cannot send request: {exc}") from None
        conn.used += 1
        try:
            conn.writer.write(out)
            await conn.writer.drain()
        except OSError as exc:
            raise _StaleConnection(_describe(exc)) from None
        deadline = time.monotonic() + first_byte_timeout
        got_bytes = False
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamError("connect", f"invalid response: {exc}") from None
            if event is h11.NEED_DATA:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise UpstreamError("timeout", f"no response headers within {first_byte_timeout:g}s")
                try:
                    data = await asyncio.wait_for(conn.reader.read(_READ_SIZE), remaining)
                except TimeoutError:
                    raise UpstreamError("timeout", f"no response headers within {first_byte_timeout:g}s") from None
                except OSError as exc:
                    if not got_bytes:
                        raise _StaleConnection(_describe(exc)) from None
                    raise UpstreamError("connect", _describe(exc)) from None
                if not data and not got_bytes:
                    raise _StaleConnection("connection closed before any response")
                got_bytes = got_bytes or bool(data)
                h.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                return Response(self, conn, event, idle_timeout)
            raise UpstreamError("connect", "connection closed before the response headers")

    def _take_idle(self, origin: Origin) -> _Conn | None:
        conns = self._idle.get(origin)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            if now - conn.idle_since < self._keepalive_s and not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    def _release(self, conn: _Conn) -> None:
        h = conn.h11
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            try:
                h.start_next_cycle()
            except h11.LocalProtocolError:
                conn.close()
                return
            conns = self._idle.setdefault(conn.origin, [])
            if len(conns) < self._max_idle:
                conn.idle_since = time.monotonic()
                conns.append(conn)
                return
        conn.close()

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


class _StaleConnection(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _describe(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.lower() if isinstance(text, str) else str(text)
