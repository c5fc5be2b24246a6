"""Hostile bodies: a decompression bomb, a huge request. The record keeps a bounded part of each
body, says so in `notes`, and the recorder's memory stays bounded; the traffic is never cut."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import duckdb
import httpx
import pytest

from fakeprovider import FakeProvider, status
from llmtap.recorder.extract import decode_body, extract, make_extractor
from llmtap.recorder.reader import open_reader
from llmtap.recorder.record import DEFAULT_BODY_LIMIT
from test_cli import Lines

MiB = 1 << 20
SSE = {"content-type": "text/event-stream"}
# One OpenAI chat event, repeated: a stream that compresses about a thousand to one.
EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"aaaaaaaa"},"finish_reason":null}]}\n\n'


def gzip_of(piece: bytes, total: int, wbits: int = 31) -> bytes:
    """`piece` repeated to `total` bytes, compressed without ever holding the whole."""
    comp = zlib.compressobj(9, zlib.DEFLATED, wbits)
    block = piece * (MiB // len(piece))
    out, made = [], 0
    while made < total:
        out.append(comp.compress(block))
        made += len(block)
    out.append(comp.flush())
    return b"".join(out)


def pieces(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """As the network delivers a body."""
    for i in range(0, len(data), size):
        yield data[i:i + size]


def peak_while(fn) -> tuple[object, int]:
    """fn()'s result and the most memory Python allocated while it ran."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def read_stream(headers: dict[str, str], body: bytes, limit: int):
    ex = make_extractor("openai.chat", status=200, headers=headers, limit=limit)
    for piece in pieces(body):
        ex.feed(piece)
    return ex.finish()


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    return gzip_of(EVENT, 200 * MiB)  # about 200 KB


def test_a_gzip_bomb_is_read_to_the_limit_and_never_expanded_whole(gzip_bomb: bytes) -> None:
    assert len(gzip_bomb) < 1 * MiB
    got, peak = peak_while(lambda: read_stream({**SSE, "content-encoding": "gzip"}, gzip_bomb, 4 * MiB))
    assert peak < 40 * MiB, f"{peak >> 20} MiB held to read a {len(gzip_bomb) >> 10} KiB body"
    # What was kept was read: the content of the events in the first 4 MiB, and no more.
    events = 4 * MiB // len(EVENT)
    assert got.content == "aaaaaaaa" * events
    assert any("over 4 MiB once decoded (gzip" in n and "the rest is not stored" in n for n in got.notes), got.notes
    # The stream's end lies past what was read: not called cut, not called whole.
    assert got.complete is None
    assert not any("terminator" in n or "truncated" in n for n in got.notes), got.notes


def test_a_gzip_bomb_in_one_piece_and_the_stored_copy_are_bounded_too(gzip_bomb: bytes) -> None:
    got, peak = peak_while(lambda: extract("openai.chat", 200, {**SSE, "content-encoding": "gzip"}, gzip_bomb, 4 * MiB))
    assert peak < 40 * MiB and got.content
    (decoded, over), peak = peak_while(lambda: decode_body(gzip_bomb, "gzip", 4 * MiB))
    assert peak < 40 * MiB
    assert over and decoded == (EVENT * (4 * MiB // len(EVENT) + 1))[:4 * MiB]


def test_a_bomb_inside_two_layers_of_coding_is_bounded() -> None:
    inner = gzip_of(EVENT, 100 * MiB)
    outer = gzip.compress(inner)
    (decoded, over), peak = peak_while(lambda: decode_body(outer, "gzip, gzip", 2 * MiB))
    assert peak < 30 * MiB and over and len(decoded) == 2 * MiB and decoded.startswith(EVENT)


def test_a_brotli_bomb_is_bounded() -> None:
    brotli = pytest.importorskip("brotli")
    comp = brotli.Compressor(quality=5)
    block = EVENT * (MiB // len(EVENT))
    body = b"".join(comp.process(block) for _ in range(100)) + comp.finish()
    got, peak = peak_while(lambda: read_stream({**SSE, "content-encoding": "br"}, body, 2 * MiB))
    assert peak < 30 * MiB, f"{peak >> 20} MiB held"
    assert got.content and len(got.content) < 2 * MiB and got.complete is None
    assert any("over 2 MiB once decoded (br" in n for n in got.notes), got.notes


def test_a_brotli_bomb_is_bounded_by_a_brotli_module_without_an_output_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    brotli = pytest.importorskip("brotli")
    import llmtap.dialects.framing as extract_mod

    monkeypatch.setattr(extract_mod, "_brotli_bounded", lambda obj: False)  # as with Brotli < 1.2
    comp = brotli.Compressor(quality=5)
    block = EVENT * (MiB // len(EVENT))
    body = b"".join(comp.process(block) for _ in range(100)) + comp.finish()
    got, peak = peak_while(lambda: read_stream({**SSE, "content-encoding": "br"}, body, 2 * MiB))
    assert peak < 40 * MiB, f"{peak >> 20} MiB held"
    assert got.content == "aaaaaaaa" * (2 * MiB // len(EVENT)) and got.complete is None
    small = brotli.compress(EVENT * 3 + b"data: [DONE]\n\n")
    got = read_stream({**SSE, "content-encoding": "br"}, small, 2 * MiB)
    assert got.content == "aaaaaaaa" * 3 and not got.notes


def test_a_zstd_bomb_is_bounded() -> None:
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        zstd = pytest.importorskip("backports.zstd")
    comp = zstd.ZstdCompressor()
    block = EVENT * (MiB // len(EVENT))
    body = b"".join(comp.compress(block) for _ in range(100)) + comp.flush()
    got, peak = peak_while(lambda: read_stream({**SSE, "content-encoding": "zstd"}, body, 2 * MiB))
    assert peak < 30 * MiB, f"{peak >> 20} MiB held"
    assert got.content and got.complete is None
    assert any("over 2 MiB once decoded (zstd" in n for n in got.notes), got.notes


def test_a_body_just_at_the_limit_is_whole_and_one_byte_more_is_not() -> None:
    body = json.dumps({"model": "m", "choices": [{"index": 0, "message": {"content": "x" * 5000},
                                                  "finish_reason": "stop"}]}).encode()
    gz = gzip.compress(body)
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    whole = extract("openai.chat", 200, headers, gz, len(body))
    assert whole.complete is True and whole.content == "x" * 5000 and not whole.notes
    assert decode_body(gz, "gzip", len(body)) == (body, False)
    short = extract("openai.chat", 200, headers, gz, len(body) - 1)
    assert short.content is None and short.complete is None
    assert any("once decoded (gzip" in n for n in short.notes) and not any("not JSON" in n for n in short.notes)
    assert decode_body(gz, "gzip", len(body) - 1) == (body[:-1], True)


# -- through a real `llmtap run` --------------------------------------------------------------------
def vm_hwm(pid: int) -> int:
    """Peak resident memory of a process, in bytes (the kernel's high-water mark)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def recorder_pid(proxy_pid: int) -> int:
    """The `python -m llmtap.recorder.process` child of an `llmtap run`."""
    for task in Path(f"/proc/{proxy_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"llmtap.recorder.process" in cmdline:
                return int(child)
    raise AssertionError(f"no recorder process under {proxy_pid}")


class LlmtapRun:
    """`llmtap run` in a process of its own, as a user starts it, gateway on a port from the OS."""

    def __init__(self, tmp_path: Path, fake: FakeProvider, *extra: str) -> None:
        rules = tmp_path / "rules.yaml"
        rules.write_text(f"providers:\n  local: {{base_url: '{fake.url}/v1', api: openai}}\n")
        self.db = tmp_path / "calls.duckdb"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmtap", "run", "--db", str(self.db), "--rules", str(rules),
             "--confdir", str(tmp_path / "ca"), "--proxy", "off", "--gateway", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err, self.out = Lines(self.proc.stderr), Lines(self.proc.stdout)
        line = self.err.wait_for("gateway")
        self.gateway = line[line.index("http://"):].split("/<provider>")[0]
        self.recorder = recorder_pid(self.proc.pid)

    def wait_recorded(self, n: int) -> None:
        """Until the recorder process has committed `n` finished calls (its live events say so)."""
        reader = open_reader(self.db)
        try:
            seq, seen, deadline = 0, 0, time.monotonic() + 120
            while seen < n:
                assert time.monotonic() < deadline, f"{seen} of {n} calls recorded"
                seq, events = reader.events_after(seq, 1.0)
                seen += sum(1 for e in events if e["kind"] == "finished")
        finally:
            reader.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def the_row(db: Path, columns: str) -> tuple:
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute(f"SELECT {columns} FROM calls").fetchall()
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_gzip_bomb_through_llmtap_run_reaches_the_client_whole_and_costs_the_recorder_little(
        tmp_path: Path, fake: FakeProvider, gzip_bomb: bytes) -> None:
    fake.script(status(200, body=gzip_bomb, headers={"content-type": "text/event-stream", "content-encoding": "gzip"}))
    run = LlmtapRun(tmp_path, fake)
    try:
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", f"{run.gateway}/local/chat/completions",
                               json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
                got = hashlib.sha256()
                for piece in r.iter_raw():
                    got.update(piece)
        assert r.status_code == 200
        assert got.hexdigest() == hashlib.sha256(gzip_bomb).hexdigest()  # every byte, as sent
        run.out.wait_for(" 200 ")
        run.proc.terminate()  # a clean stop commits the row
        assert run.proc.wait(60) == 0
    finally:
        run.stop()
    body, raw_len, content, complete, notes = the_row(
        run.db, "response_body, octet_length(response_body_raw), content, complete, notes")
    notes = json.loads(notes)
    assert any("over 8 MiB once decoded (gzip" in n and "the rest is not stored" in n for n in notes), notes
    assert len(body.encode()) == DEFAULT_BODY_LIMIT and raw_len is None
    assert content == "aaaaaaaa" * (DEFAULT_BODY_LIMIT // len(EVENT)) and complete is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_recorders_peak_memory_stays_bounded_under_a_gzip_bomb(tmp_path: Path, fake: FakeProvider,
                                                                     gzip_bomb: bytes) -> None:
    fake.script(status(200, body=gzip_bomb, headers={"content-type": "application/json", "content-encoding": "gzip"}))
    run = LlmtapRun(tmp_path, fake)
    try:
        with httpx.Client(timeout=60) as client:
            r = client.post(f"{run.gateway}/local/chat/completions",
                            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and len(r.content) >= 200 * MiB  # httpx undid the gzip
        run.wait_recorded(1)
        peak = vm_hwm(run.recorder)
    finally:
        run.stop()
    assert peak < 400 * MiB, f"the recorder process peaked at {peak >> 20} MiB"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_100_mb_request_is_forwarded_whole_and_recorded_to_the_max_body_option(tmp_path: Path,
                                                                                  fake: FakeProvider) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "q" * (100 * MiB)}]}).encode()
    run = LlmtapRun(tmp_path, fake, "--max-body", "2M")
    try:
        with httpx.Client(timeout=120) as client:
            r = client.post(f"{run.gateway}/local/chat/completions", content=body,
                            headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == fake.reply_text
        (req,) = fake.wait_requests(1)
        assert len(req.body) == len(body) and hashlib.sha256(req.body).digest() == hashlib.sha256(body).digest()
        run.wait_recorded(1)
        peak = vm_hwm(run.recorder)
        run.proc.terminate()
        assert run.proc.wait(60) == 0
    finally:
        run.stop()
    kept, notes, content = the_row(run.db, "request_body, notes, content")
    assert kept.encode() == body[:2 * MiB]
    assert "request body over 2 MiB (100 MiB): the record keeps the first 2 MiB; the upstream got all of it" \
        in json.loads(notes)
    assert content == fake.reply_text
    assert peak < 400 * MiB, f"the recorder process peaked at {peak >> 20} MiB"


def test_help_tells_the_body_limit() -> None:
    r = subprocess.run([sys.executable, "-m", "llmtap", "run", "--help"], capture_output=True, text=True, timeout=60)
    text = " ".join(r.stdout.split())  # the help is wrapped to the terminal's width
    assert "--max-body SIZE" in text and "default: 8 MiB" in text


# -- the proxy's and the recorder's own bounds -------------------------------------------------------
def test_the_proxy_keeps_and_hands_over_no_more_than_the_limit_of_a_huge_stream(
        tmp_path: Path, confdir: Path, fake: FakeProvider) -> None:
    from proxyharness import RunningProxy

    stream = EVENT * (20 * MiB // len(EVENT))
    fake.script(status(200, body=stream, headers={"content-type": "text/event-stream"}))
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"providers:\n  local: {{base_url: '{fake.url}/v1', api: openai}}\n")
    proxy = RunningProxy(rules, confdir)
    proxy.config.body_limit = 1 * MiB
    with proxy:
        with httpx.Client(timeout=60) as client:
            r = client.post(f"{proxy.gateway_url}/local/chat/completions",
                            json={"model": "m", "stream": True, "messages": []})
        assert r.content == stream  # the client got all 20 MiB
        ((call, _),) = proxy.memory.wait_finished(1)
    assert call.response_body == stream[:1 * MiB]
    # The live view is handed what the record keeps, not the whole stream.
    assert b"".join(proxy.memory.chunks[call.id]) == stream[:1 * MiB]
    assert "response body over 1 MiB: the record keeps the first 1 MiB; the client got all of it" in call.notes


def test_the_recorder_bounds_what_it_is_handed_and_reads_it_live(tmp_path: Path) -> None:
    from llmtap.recorder.recorder import Recorder
    from test_recorder import finish, make_call, row, wait_event

    db = tmp_path / "calls.duckdb"
    rec = Recorder(db, serve=False, helpers=0, body_limit=64 * 1024)
    rec.start()
    try:
        stream = EVENT * (1 * MiB // len(EVENT))  # as a proxy with a larger limit would hand it over
        call = make_call()
        call.api = "openai.chat"
        call.request_body = b"r" * (200 * 1024)
        rec.call_started(call)
        wait_event(rec, "started", call.id)
        call.status, call.response_headers = 200, dict(SSE)
        for piece in pieces(stream, 16 * 1024):
            rec.call_chunk(call.id, piece)
        later = make_call()  # queued after every chunk: once it is in, they all were read
        rec.call_started(later)
        wait_event(rec, "started", later.id)
        assert len(rec.hub.partial(call.id)["response_body"]) == 64 * 1024
        finished, attempts = finish(call, stream)
        finished.response_headers = dict(SSE)
        rec.call_finished(finished, attempts)
    finally:
        rec.close()
    r = row(db, call.id)
    assert r["response_body"].encode() == stream[:64 * 1024] and r["request_body"] == "r" * (64 * 1024)
    assert r["content"] == "aaaaaaaa" * (64 * 1024 // len(EVENT)) and r["complete"] is None
    notes = json.loads(r["notes"])
    assert "response body over 64 KiB: the record keeps the first 64 KiB; the client got all of it" in notes
    assert "request body over 64 KiB (200 KiB): the record keeps the first 64 KiB; the upstream got all of it" in notes
    assert not any("terminator" in n for n in notes), notes
