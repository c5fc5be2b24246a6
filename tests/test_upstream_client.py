"""The upstream client (addons/upstream.py) against scripted bytes.

A loopback server, started and stopped by each test, reads the request and then writes exact
byte sequences and ends the connection the way a failing upstream does: FIN, RST, silence.
Each failure must surface as its own exception type, which is what the relay and the record
tell apart (retry or not, "reset" or "closed early" or "broke the framing").
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from llmtap.addons.upstream import (
    ConnectFailed,
    NoResponse,
    Origin,
    Pool,
    StreamBadFraming,
    StreamClosedEarly,
    StreamCut,
    StreamIdle,
    StreamReset,
    UpstreamTimeout,
)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    await reader.readexactly(length)
    return head


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST, as a crashed or overloaded upstream does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@asynccontextmanager
async def upstream(script: Script) -> AsyncIterator[tuple[Origin, asyncio.Event]]:
    """A server running `script` on each connection; the event, set by the test, releases a
    script that holds its connection open (and is set on the way out, so none outlives it)."""
    release = asyncio.Event()
    handlers: list[asyncio.Task] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if not writer.transport.is_closing():
                writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Origin("http", "127.0.0.1", port), release
    finally:
        release.set()
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def request(pool: Pool, origin: Origin, *, first_byte: float = 10, idle: float = 10):
    return await pool.request("POST", origin, "/v1/chat/completions",
                              [(b"host", b"up.test"), (b"content-length", b"2")], b"{}",
                              connect_timeout=10, first_byte_timeout=first_byte, idle_timeout=idle)


async def body_until_cut(origin: Origin, *, idle: float = 10) -> tuple[list[bytes], StreamCut]:
    """The body chunks that arrived before the stream was cut, and the cut."""
    pool = Pool()
    try:
        resp = await request(pool, origin, idle=idle)
        assert resp.status == 200
        got: list[bytes] = []
        with pytest.raises(StreamCut) as cut:
            async for chunk in resp.aiter_raw():
                got.append(chunk)
        assert pool._idle.get(origin, []) == []  # a cut connection is never reused
        return got, cut.value
    finally:
        await pool.aclose()


async def test_a_whole_chunked_body_arrives_as_sent_and_the_connection_is_kept() -> None:
    connections = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            await read_request(reader)
            writer.write(HEAD + b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(EVENT), EVENT))
            await writer.drain()

    async with upstream(script) as (origin, _):
        pool = Pool()
        try:
            for _ in range(2):
                resp = await request(pool, origin)
                assert b"".join([c async for c in resp.aiter_raw()]) == EVENT
        finally:
            await pool.aclose()
    assert connections == 1


async def test_a_chunk_size_that_is_not_hex_is_bad_framing() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD + b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\nzz\r\nnot a chunk\r\n" % (len(EVENT), EVENT))
        await writer.drain()
        await asyncio.Event().wait()  # the client must stop at the bad size, not wait for more

    async with upstream(script) as (origin, _):
        got, cut = await body_until_cut(origin)
    assert b"".join(got) == EVENT
    assert isinstance(cut, StreamBadFraming) and "broke the stream's framing" in str(cut)


async def test_a_fin_inside_a_chunked_body_is_closed_early() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD + b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(EVENT), EVENT))
        await writer.drain()
        writer.close()  # FIN, no last chunk

    async with upstream(script) as (origin, _):
        got, cut = await body_until_cut(origin)
    assert b"".join(got) == EVENT
    assert isinstance(cut, StreamClosedEarly) and "closed the stream early" in str(cut)


async def test_a_fin_short_of_the_content_length_is_closed_early() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"half\":")
        await writer.drain()
        writer.close()

    async with upstream(script) as (origin, _):
        got, cut = await body_until_cut(origin)
    assert b"".join(got) == b'{"half":'
    assert isinstance(cut, StreamClosedEarly) and "expected" in str(cut)  # says how much was promised


async def test_an_rst_mid_body_is_a_reset() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD + b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(EVENT), EVENT))
        await writer.drain()
        reset(writer)

    async with upstream(script) as (origin, _):
        _, cut = await body_until_cut(origin)
    assert isinstance(cut, StreamReset) and "cut the stream" in str(cut)


async def test_silence_mid_body_past_the_idle_timeout_is_idle() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD + b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(EVENT), EVENT))
        await writer.drain()
        await asyncio.Event().wait()

    async with upstream(script) as (origin, _):
        got, cut = await body_until_cut(origin, idle=0.2)
    assert b"".join(got) == EVENT
    assert isinstance(cut, StreamIdle) and "no data for 0.2s" in str(cut)


async def test_a_head_slower_than_first_byte_timeout_is_a_timeout() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.Event().wait()

    async with upstream(script) as (origin, _):
        pool = Pool()
        try:
            with pytest.raises(UpstreamTimeout) as exc:
                await request(pool, origin, first_byte=0.2)
        finally:
            await pool.aclose()
    assert exc.value.kind == "timeout" and "no response headers within 0.2s" in str(exc.value)


async def test_a_head_that_trickles_in_is_timed_as_a_whole() -> None:
    # A byte at a time, each well within the timeout: the deadline is for the whole head.
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for byte in b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.02)
        await asyncio.Event().wait()

    async with upstream(script) as (origin, _):
        pool = Pool()
        try:
            with pytest.raises(UpstreamTimeout):
                await request(pool, origin, first_byte=0.3)
        finally:
            await pool.aclose()


async def test_a_close_before_the_head_is_no_response_and_not_a_connect_failure() -> None:
    # The request went out: the upstream may have read it, so it is not "connect" by accident.
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    async with upstream(script) as (origin, _):
        pool = Pool()
        try:
            with pytest.raises(NoResponse) as exc:
                await request(pool, origin)
        finally:
            await pool.aclose()
    assert "connection closed before the response headers" in str(exc.value)
    assert "reused" not in str(exc.value)


async def test_an_answer_that_is_not_http_is_no_response() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        await asyncio.Event().wait()

    async with upstream(script) as (origin, _):
        pool = Pool()
        try:
            with pytest.raises(NoResponse) as exc:
                await request(pool, origin)
        finally:
            await pool.aclose()
    assert "invalid response" in str(exc.value)


async def test_a_refused_connection_is_a_connect_failure() -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    pool = Pool()
    try:
        with pytest.raises(ConnectFailed) as exc:
            await request(pool, Origin("http", "127.0.0.1", port))
    finally:
        await pool.aclose()
    assert exc.value.kind == "connect" and f"127.0.0.1:{port}" in str(exc.value)
