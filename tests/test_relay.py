"""The relay's exchange against a scripted pool.

The relay is served for real on 127.0.0.1 and asked as mitmproxy asks it (a request carrying a
plan's key); its upstream pool is a script: each request it is given takes the next step, an
answer (status, headers, body parts, or a failure inside the body) or a failure before any
answer. Asserted is what the client got, the attempts recorded, and the events the recorder
was handed, in their order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import FrozenInstanceError

import h11
import pytest

from llmtap.addons.relay import PLAN_HEADER, Cooldown, Plan, Policy, Relay, Target
from llmtap.addons.upstream import ConnectFailed, Origin, StreamReset, UpstreamTimeout
from llmtap.recorder.events import CallFinished, CallStarted, Chunk, ResponseHead
from llmtap.recorder.record import MemorySink, new_id, utcnow

REQUEST = b'{"model":"smart","messages":[]}'


class Answer:
    """One scripted upstream answer; `parts` are body chunks, or an exception raised there, or
    an asyncio.Event the body waits on (a stream that goes quiet)."""

    def __init__(self, status: int, parts: list[bytes | BaseException | asyncio.Event] | None = None, *,
                 headers: list[tuple[bytes, bytes]] | None = None, reason: bytes = b"-") -> None:
        self.status = status
        self.reason = reason
        self.parts = parts if parts is not None else [b'{"ok":true}']
        self.headers = headers if headers is not None else [(b"content-type", b"application/json")]
        self.closed = asyncio.Event()  # the relay let go of it (what stops a real upstream)

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            if isinstance(part, asyncio.Event):
                await part.wait()
            elif isinstance(part, BaseException):
                raise part
            else:
                yield part

    async def aread(self, limit: int = 1 << 20) -> bytes:
        return b"".join(p for p in self.parts if isinstance(p, bytes))

    async def aclose(self) -> None:
        self.closed.set()


class ScriptedPool:
    """The relay's pool, answering each request with the next step of `script`."""

    def __init__(self, *script: Answer | BaseException) -> None:
        self.script = list(script)
        self.requests: list[dict] = []

    async def request(self, method: str, origin: Origin, target: str, headers: list, body: bytes, *,
                      connect_timeout: float, first_byte_timeout: float, idle_timeout: float | None = None):
        self.requests.append({"origin": origin, "target": target, "body": body, "idle_timeout": idle_timeout,
                              "first_byte_timeout": first_byte_timeout})
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step

    async def aclose(self) -> None:
        pass


def target(provider: str, model: str, port: int = 9) -> Target:
    body = REQUEST.replace(b'"smart"', b'"%s"' % model.encode())
    return Target(provider, Origin("http", "127.0.0.1", port), "/v1/chat/completions",
                  [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], body, model)


def plan(*targets: Target, **policy: object) -> Plan:
    start = CallStarted(id=new_id(), started_at=utcnow(), method="POST", url="http://127.0.0.1:8081/x/chat/completions",
                        api="openai.chat", model_requested="smart", request_body=REQUEST, notes=("from routing",))
    fields: dict = {"attempts": 1, "backoff_ms": 0, "statuses": lambda s: s >= 500 or s == 429}
    fields.update(policy)
    return Plan(call=start, method="POST", targets=list(targets), policy=Policy(**fields), api_family="openai")


async def ask(relay: Relay, p: Plan, *, stop: Callable[[h11.Response], bool] | None = None
              ) -> tuple[h11.Response | None, bytes, bool]:
    """Ask the relay as mitmproxy does; (response head, body, whether the body ended properly).
    `stop` given: close the connection once the head arrived and `stop(head)` is true."""
    key = relay.add_plan(p)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    conn = h11.Connection(h11.CLIENT)
    writer.write(conn.send(h11.Request(method="GET", target="/", headers=[("host", "relay"), (PLAN_HEADER, key)])) +
                 conn.send(h11.EndOfMessage()))
    head: h11.Response | None = None
    body = b""
    try:
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return head, body, False
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                head = event
                if stop is not None and stop(head):
                    return head, body, False
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return head, body, True
            elif isinstance(event, h11.ConnectionClosed):
                return head, body, False
    finally:
        writer.close()


class LoopSink(MemorySink):
    """A MemorySink that also tells the test's event loop (the relay's) what arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.chunked = asyncio.Event()
        self.ended = asyncio.Event()

    def call_chunk(self, event: Chunk) -> None:
        super().call_chunk(event)
        self.chunked.set()

    def call_finished(self, event: CallFinished) -> None:
        super().call_finished(event)
        self.ended.set()


@pytest.fixture
async def served() -> AsyncIterator[Callable[..., Relay]]:
    relays: list[Relay] = []

    async def make(pool: ScriptedPool, **kw: object) -> Relay:
        relay = Relay(LoopSink(), pool=pool, **kw)  # type: ignore[arg-type]
        await relay.start()
        relays.append(relay)
        return relay

    yield make  # type: ignore[misc]
    for relay in relays:
        await relay.stop()


def events(relay: Relay) -> list:
    sink = relay.sink
    assert isinstance(sink, MemorySink)
    return sink.events


def finished(relay: Relay) -> CallFinished:
    (event,) = [e for e in events(relay) if isinstance(e, CallFinished)]
    return event


async def test_a_5xx_falls_back_and_the_events_say_what_the_client_got(served) -> None:
    pool = ScriptedPool(Answer(503, [b'{"error":{"message":"overloaded"}}']),
                        Answer(200, [b'{"choices":', b'[]}'], headers=[(b"content-type", b"application/json"),
                                                                      (b"x-upstream", b"backup")]))
    relay = await served(pool)
    p = plan(target("primary", "m-1"), target("backup", "m-2"))
    head, body, whole = await ask(relay, p)
    assert head is not None and head.status_code == 200 and body == b'{"choices":[]}' and whole
    assert [r["body"] for r in pool.requests] == [target("primary", "m-1").body, target("backup", "m-2").body]
    kinds = [type(e) for e in events(relay)]
    assert kinds == [ResponseHead, Chunk, Chunk, CallFinished]
    resp_head = events(relay)[0]
    assert (resp_head.call_id, resp_head.status, resp_head.provider, resp_head.model_sent) == (p.call.id, 200,
                                                                                               "backup", "m-2")
    assert resp_head.headers["x-upstream"] == "backup"
    assert b"".join(e.data for e in events(relay) if isinstance(e, Chunk)) == b'{"choices":[]}'
    end = finished(relay)
    assert end.start is p.call and (end.status, end.provider, end.model_sent, end.attempts) == (200, "backup", "m-2", 2)
    assert end.response_body == b'{"choices":[]}' and end.error is None and end.notes == ("from routing",)
    first, second = end.tries
    assert (first.n, first.provider, first.status, first.error) == (1, "primary", 503, "overloaded")
    assert (second.n, second.provider, second.status, second.error) == (2, "backup", 200, None)
    assert end.ttfb_ms is not None and end.duration_ms is not None
    with pytest.raises(FrozenInstanceError):
        end.status = 500  # type: ignore[misc]


async def test_a_connect_failure_falls_back_and_is_an_attempt(served) -> None:
    pool = ScriptedPool(ConnectFailed("127.0.0.1:9: connection refused"), Answer(200))
    relay = await served(pool)
    head, _, _ = await ask(relay, plan(target("primary", "m-1"), target("backup", "m-2")))
    assert head is not None and head.status_code == 200
    first, second = finished(relay).tries
    assert first.status is None and first.error == "connect: 127.0.0.1:9: connection refused"
    assert second.status == 200 and finished(relay).attempts == 2


async def test_a_timeout_not_in_the_routes_on_list_is_not_retried(served) -> None:
    pool = ScriptedPool(UpstreamTimeout("no response headers within 1s"), Answer(200))
    relay = await served(pool)
    head, body, _ = await ask(relay, plan(target("primary", "m-1"), target("backup", "m-2"), on_timeout=False))
    assert head is not None and head.status_code == 502 and b"llmtap: no upstream answered" in body
    assert len(pool.requests) == 1
    kinds = [type(e) for e in events(relay)]
    assert kinds == [ResponseHead, Chunk, CallFinished]
    assert events(relay)[0].status == 502 and events(relay)[0].headers == {"content-type": "application/json"}
    end = finished(relay)
    assert end.status == 502 and end.attempts == 1 and end.error is not None and "all 1 attempts failed" in end.error


async def test_when_every_target_fails_the_client_gets_the_last_upstream_error_as_sent(served) -> None:
    pool = ScriptedPool(Answer(429, [b'{"error":{"message":"slow down"}}']),
                        Answer(503, [b'{"error":{"message":"down"}}'], headers=[(b"content-type", b"application/json"),
                                                                                (b"retry-after", b"0")]))
    relay = await served(pool)
    head, body, whole = await ask(relay, plan(target("primary", "m-1"), target("backup", "m-2")))
    assert head is not None and head.status_code == 503 and body == b'{"error":{"message":"down"}}' and whole
    end = finished(relay)
    assert end.status == 503 and end.provider == "backup" and end.attempts == 2
    assert [a.error for a in end.tries] == ["slow down", "down"]
    assert end.error is not None and end.error.startswith("all 2 attempts failed")


async def test_a_stream_cut_after_the_first_byte_is_not_retried_and_the_client_sees_the_cut(served) -> None:
    cut = Answer(200, [b"data: one\n\n", StreamReset("upstream cut the stream: connection reset by peer")],
                 headers=[(b"content-type", b"text/event-stream")])
    pool = ScriptedPool(cut, Answer(200))
    relay = await served(pool)
    head, body, whole = await ask(relay, plan(target("primary", "m-1"), target("backup", "m-2")))
    assert head is not None and head.status_code == 200 and body == b"data: one\n\n" and not whole
    assert len(pool.requests) == 1 and cut.closed.is_set()  # no fallback once the client has bytes
    assert [type(e) for e in events(relay)] == [ResponseHead, Chunk, CallFinished]
    end = finished(relay)
    assert end.error == "upstream cut the stream: connection reset by peer"
    assert end.tries[0].error == end.error and end.response_body == b"data: one\n\n"


async def test_a_client_that_leaves_mid_stream_stops_the_upstream_and_is_recorded(served) -> None:
    quiet = asyncio.Event()  # never set: the upstream goes quiet after the first event
    answer = Answer(200, [b"data: one\n\n", quiet], headers=[(b"content-type", b"text/event-stream")])
    relay = await served(ScriptedPool(answer))
    sink = relay.sink
    assert isinstance(sink, LoopSink)
    key = relay.add_plan(plan(target("primary", "m-1")))
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(b"GET / HTTP/1.1\r\nhost: relay\r\n%s: %s\r\n\r\n" % (PLAN_HEADER.encode(), key.encode()))
    await asyncio.wait_for(sink.chunked.wait(), 30)
    writer.close()  # the client goes away while the upstream is quiet
    await asyncio.wait_for(sink.ended.wait(), 30)
    await asyncio.wait_for(answer.closed.wait(), 30)
    end = finished(relay)
    assert end.error == "client disconnected" and end.status == 200


async def test_bytes_a_client_read_before_leaving_are_in_the_record_even_while_the_relay_waited_on_it(served) -> None:
    # 8 MB in one piece: the relay hands it over, then waits for the client to take it; the
    # client reads a little of it and leaves during that wait.
    big = b"x" * (8 << 20)
    quiet = asyncio.Event()
    relay = await served(ScriptedPool(Answer(200, [big, quiet], headers=[(b"content-type", b"text/event-stream")])),
                         body_limit=16 << 20)
    sink = relay.sink
    assert isinstance(sink, LoopSink)
    key = relay.add_plan(plan(target("primary", "m-1")))
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(b"GET / HTTP/1.1\r\nhost: relay\r\n%s: %s\r\n\r\n" % (PLAN_HEADER.encode(), key.encode()))
    got = b""
    while got.count(b"x") < 65536:
        got += await asyncio.wait_for(reader.read(65536), 30)
    writer.close()
    await asyncio.wait_for(sink.ended.wait(), 30)
    end = finished(relay)
    assert end.error == "client disconnected" and end.client_left
    assert end.response_body == big  # not b"": the client had read part of it


async def test_a_provider_cooling_down_is_skipped_and_the_skip_recorded(served) -> None:
    pool = ScriptedPool(ConnectFailed("refused"), Answer(200), Answer(200))
    relay = await served(pool, cooldown=Cooldown(threshold=1, seconds=600))
    await ask(relay, plan(target("primary", "m-1", port=9), target("backup", "m-2", port=10)))
    sink = relay.sink
    assert isinstance(sink, MemorySink)
    sink.events.clear()
    head, _, _ = await ask(relay, plan(target("primary", "m-1", port=9), target("backup", "m-2", port=10)))
    assert head is not None and head.status_code == 200
    assert [r["origin"].port for r in pool.requests] == [9, 10, 10]  # the second call never tried primary
    end = finished(relay)
    assert end.attempts == 1 and end.provider == "backup"
    assert end.tries[0].provider == "primary" and (end.tries[0].error or "").startswith("skipped")


async def test_the_stream_idle_floor_is_the_relays_parameter(served) -> None:
    pool = ScriptedPool(Answer(200), Answer(200))
    relay = await served(pool, stream_idle_s=7.0)
    await ask(relay, plan(target("primary", "m-1"), first_byte_s=2.0))
    await ask(relay, plan(target("primary", "m-1"), first_byte_s=30.0))
    assert [r["idle_timeout"] for r in pool.requests] == [7.0, 30.0]


async def test_the_response_body_kept_for_the_record_stops_at_the_limit(served) -> None:
    big = [b"x" * 1000] * 5
    relay = await served(ScriptedPool(Answer(200, big)), body_limit=2500)
    head, body, whole = await ask(relay, plan(target("primary", "m-1")))
    assert body == b"x" * 5000 and whole  # the client gets everything
    end = finished(relay)
    assert end.response_body == b"x" * 2500
    assert sum(len(e.data) for e in events(relay) if isinstance(e, Chunk)) == 2500
    assert end.notes[0] == "from routing" and "response body over" in end.notes[1]
