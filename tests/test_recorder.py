"""The recorder on real DuckDB files: what lands, when, and that nothing is lost or leaked."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import httpx
import pytest

from llmtap.recorder.endpoint import discovery_path
from llmtap.recorder.events import Chunk
from llmtap.recorder.reader import InProcessReader, LocalReader, ReaderError, RemoteReader, open_reader
from llmtap.recorder.record import Attempt, Call, new_id, utcnow
from llmtap.recorder.recorder import Recorder, spool_path
from llmtap.recorder.schema import migrate
from waiting import wait_until

PLANTED = "sk-live-PLANTED-123456789abcdef"
PLANTED_Q = "AIzaPLANTEDquerykey987654"

ANTHROPIC_SSE = (
    'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant",'
    '"model":"claude-sonnet-4-5","content":[],"stop_reason":null,"usage":{"input_tokens":12,"output_tokens":1}}}\n\n'
    'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}\n\n'
    'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Five folds: 2^5 "}}\n\n'
    'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"= 32."}}\n\n'
    'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    'event: content_block_start\ndata: {"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}\n\n'
    'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"32 holes."}}\n\n'
    'event: content_block_stop\ndata: {"type":"content_block_stop","index":1}\n\n'
    'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":20}}\n\n'
    'event: message_stop\ndata: {"type":"message_stop"}\n\n'
).encode()


def make_call(body: bytes = ANTHROPIC_SSE, *, status: int = 200, auth: str = "Bearer " + PLANTED,
              url: str = "http://127.0.0.1:8081/anthropic/v1/messages") -> Call:
    return Call(id=new_id(), started_at=utcnow(), method="POST", url=url, api="anthropic.messages",
                client="agent/1.0", model_requested="smart", stream=True,
                request_headers={"authorization": auth, "content-type": "application/json"},
                request_body=b'{"model":"smart","stream":true,"messages":[]}')


def finish(call: Call, body: bytes = ANTHROPIC_SSE, status: int = 200) -> tuple[Call, list[Attempt]]:
    call.status, call.model_sent, call.provider, call.attempts = status, "claude-sonnet-4-5", "anthropic", 2
    call.response_headers = {"content-type": "text/event-stream"}
    call.response_body, call.duration_ms, call.ttfb_ms = body, 120.0, 30.0
    attempts = [Attempt(call.id, 1, "primary", "https://a.test/v1/messages", "claude-x", utcnow(), 529, "Overloaded", 5.0),
                Attempt(call.id, 2, "anthropic", "https://api.anthropic.com/v1/messages", "claude-sonnet-4-5",
                        utcnow(), 200, None, 110.0, 20.0)]
    return call, attempts


def wait_event(rec: Recorder, kind: str, call_id: str, after: int = 0) -> int:
    seq = after
    for _ in range(200):
        seq, events = rec.hub.events_after(seq, 0.1)
        if any(e["kind"] == kind and e["id"] == call_id for e in events):
            return seq
    raise AssertionError(f"no {kind} event for {call_id}")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "calls.duckdb"


def row(db: Path, call_id: str) -> dict:
    with duckdb.connect(str(db), read_only=True) as con:
        cur = con.execute("SELECT * FROM calls WHERE id = ?", [call_id])
        return dict(zip([d[0] for d in cur.description], cur.fetchone()))


def test_a_finished_call_lands_with_reasoning_tokens_and_its_fallback_chain(db: Path) -> None:
    rec = Recorder(db)
    rec.start()
    call = make_call()
    rec.call_started(call.started())
    call, attempts = finish(call)
    rec.response_head(call.responded())
    for piece in (ANTHROPIC_SSE[:100], ANTHROPIC_SSE[100:101], ANTHROPIC_SSE[101:]):
        rec.call_chunk(Chunk(call.id, piece))
    rec.call_finished(call.finished(attempts))
    rec.close()
    r = row(db, call.id)
    assert r["reasoning"] == "Five folds: 2^5 = 32." and r["content"] == "32 holes."
    assert r["complete"] is True and r["finish_reason"] == "end_turn" and r["status"] == 200
    assert (r["input_tokens"], r["output_tokens"], r["model_reported"]) == (12, 20, "claude-sonnet-4-5")
    assert r["response_body"] == ANTHROPIC_SSE.decode() and r["attempts"] == 2
    with duckdb.connect(str(db), read_only=True) as con:
        chain = con.execute("SELECT n, provider, status, error FROM attempts WHERE call_id = ? ORDER BY n",
                            [call.id]).fetchall()
    assert chain == [(1, "primary", 529, "Overloaded"), (2, "anthropic", 200, None)]


def test_a_call_in_progress_is_visible_and_grows_live(db: Path) -> None:
    rec = Recorder(db)
    rec.start()
    try:
        reader = InProcessReader(rec)
        call = make_call()
        call.status, call.response_headers = 200, {"content-type": "text/event-stream"}
        rec.call_started(call.started())
        rec.response_head(call.responded())
        seq = wait_event(rec, "started", call.id)
        _, rows = reader.query("SELECT status, duration_ms, model_requested FROM calls WHERE id = ?", [call.id])
        assert rows == [(None, None, "smart")]
        rec.call_chunk(Chunk(call.id, ANTHROPIC_SSE[:600]))
        seq = wait_event(rec, "progress", call.id, seq)
        part = reader.partial(call.id)
        assert part is not None and part["reasoning"].startswith("Five folds")
        call, attempts = finish(call)
        rec.call_chunk(Chunk(call.id, ANTHROPIC_SSE[600:]))
        rec.call_finished(call.finished(attempts))
        wait_event(rec, "finished", call.id, seq)
        _, rows = reader.query("SELECT count(*), max(status), max(content) FROM calls WHERE id = ?", [call.id])
        assert rows == [(1, 200, "32 holes.")]  # the in-progress row was replaced, not duplicated
        assert reader.partial(call.id) is None
    finally:
        rec.close()


def test_graceful_close_commits_everything_queued(db: Path) -> None:
    rec = Recorder(db, flush_interval_s=10)  # nothing would be written before close
    rec.start()
    for _ in range(300):
        rec.call_finished(Call.finished(*finish(make_call())))
    rec.close()
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM calls").fetchone()[0] == 300
        assert con.execute("SELECT count(*) FROM attempts").fetchone()[0] == 600


def test_non_utf8_and_cut_bodies_are_kept_raw_with_notes(db: Path) -> None:
    rec = Recorder(db)
    rec.start()
    call = make_call()
    call.request_body = b'{"model":"smart","x":"\xff\xfe"}'
    call.notes.append("request body is not UTF-8; passed through unchanged")
    cut_body = ANTHROPIC_SSE[:400]
    call, attempts = finish(call, cut_body)
    call.error = "upstream cut the stream: reset"
    rec.call_finished(call.finished(attempts))
    rec.close()
    r = row(db, call.id)
    assert r["request_body"] is None and r["request_body_raw"] == call.request_body
    assert r["complete"] is False and r["error"] == "upstream cut the stream: reset"
    assert r["response_body"] == cut_body.decode()
    assert any("not UTF-8" in n for n in json.loads(r["notes"]))


def test_a_data_folder_llmtap_creates_is_private(tmp_path: Path) -> None:
    # Prompts and answers are in the file: other local users must not read them.
    rec = Recorder(tmp_path / "new" / "llmtap.duckdb", serve=False)
    rec.start()
    rec.close()
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700


def test_secrets_never_reach_the_file_the_spool_or_an_export(db: Path, tmp_path: Path) -> None:
    rec = Recorder(db)
    rec.start()
    call = make_call(url=f"https://generativelanguage.googleapis.com/v1beta/models/g:generateContent?key={PLANTED_Q}")
    call, attempts = finish(call)
    url = f"https://generativelanguage.googleapis.com/v1beta/models/g:generateContent?key={PLANTED_Q}"
    attempts[0] = dataclasses.replace(attempts[0], url=url, error=f"connect: refused for {url}")
    call.request_headers = {"Authorization": "Bearer " + PLANTED, "X-Goog-Api-Key": PLANTED_Q}
    rec.call_finished(call.finished(attempts))
    failing = make_call()
    original = rec._commit
    rec._commit = lambda *a: (_ for _ in ()).throw(OSError("disk full"))  # type: ignore[method-assign]
    rec.call_finished(Call.finished(*finish(failing)))
    rec.close()
    rec._commit = original  # type: ignore[method-assign]
    spooled = spool_path(db).read_bytes()
    assert b"sk-\xe2\x80\xa6" in spooled or b"sk-\\u2026" in spooled  # the fingerprint is there
    reader = LocalReader(db)
    reader.export(tmp_path / "x.parquet", "parquet")
    reader.export(tmp_path / "x.jsonl", "jsonl")
    reader.close()
    for f in (db, spool_path(db), tmp_path / "x.parquet", tmp_path / "x.jsonl"):
        data = f.read_bytes()
        assert PLANTED.encode() not in data and PLANTED_Q.encode() not in data, f


def test_records_are_spooled_when_the_db_fails_and_imported_on_next_start(db: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder(db)
    rec.start()
    rec._commit = lambda *a: (_ for _ in ()).throw(duckdb.IOException("No space left on device"))  # type: ignore[method-assign]
    calls = [finish(make_call()) for _ in range(5)]
    for c in calls:
        rec.call_finished(Call.finished(*c))
    rec.close()
    assert "cannot write to" in caplog.text and "No space left" in caplog.text
    assert len(spool_path(db).read_text().splitlines()) == 15  # 5 calls + 10 attempts
    again = Recorder(db)
    again.start()
    again.close()
    assert not spool_path(db).exists()
    with duckdb.connect(str(db), read_only=True) as con:
        ids = {r[0] for r in con.execute("SELECT id FROM calls").fetchall()}
        assert ids == {c.id for c, _ in calls}
        assert con.execute("SELECT count(*) FROM attempts").fetchone()[0] == 10


def test_calls_imported_from_the_spool_reach_the_services_like_any_commit(
        db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Metrics and traces hear of the calls that waited out a full disk, once imported."""
    rec = Recorder(db)
    rec.start()
    rec._commit = lambda *a: (_ for _ in ()).throw(duckdb.IOException("No space left on device"))  # type: ignore[method-assign]
    calls = [finish(make_call()) for _ in range(3)]
    for c in calls:
        rec.call_finished(Call.finished(*c))
    rec.close()
    assert spool_path(db).exists()

    heard: list[tuple[list[str], int]] = []

    class Listener:
        def committed(self, calls: list[dict], attempts: list[dict]) -> None:
            heard.append(([c["id"] for c in calls], len(attempts)))

        def close(self) -> None:
            pass

    from llmtap.recorder import recorder as recorder_mod
    from llmtap.recorder.services import Options

    monkeypatch.setattr(recorder_mod, "start_services", lambda options, rec: [Listener()])
    again = Recorder(db, services=Options(metrics="127.0.0.1:0"))
    again.start()
    again.close()
    assert not spool_path(db).exists()
    assert heard == [([c.id for c, _ in calls], 6)]


def test_a_full_queue_drops_the_oldest_and_records_how_many(db: Path) -> None:
    rec = Recorder(db, queue_limit=2)
    calls = [finish(make_call()) for _ in range(10)]
    for c in calls:  # before start: nothing drains the queue
        rec.call_finished(Call.finished(*c))
    rec.start()
    rec.close()
    with duckdb.connect(str(db), read_only=True) as con:
        kept = {r[0] for r in con.execute("SELECT id FROM calls").fetchall()}
        assert kept == {c.id for c, _ in calls[-2:]}  # the newest survive
        count, reason = con.execute("SELECT sum(count), any_value(reason) FROM dropped").fetchone()
    assert count == 8 and "writer fell behind" in reason


def test_a_call_started_and_finished_in_one_batch_is_written_once(db: Path) -> None:
    rec = Recorder(db, flush_interval_s=60)  # one batch, written at close
    rec.start()
    call = make_call()
    rec.call_started(call.started())
    call, attempts = finish(call)
    rec.response_head(call.responded())
    for i in range(0, len(ANTHROPIC_SSE), 50):
        rec.call_chunk(Chunk(call.id, ANTHROPIC_SSE[i:i + 50]))
    rec.call_finished(call.finished(attempts))
    rec.close()
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*), max(status), max(reasoning) FROM calls").fetchone() == (
            1, 200, "Five folds: 2^5 = 32.")


def test_a_compressed_response_is_stored_decoded_with_a_note(db: Path) -> None:
    import gzip

    rec = Recorder(db, serve=False)
    rec.start()
    call, attempts = finish(make_call(), gzip.compress(ANTHROPIC_SSE))
    call.response_headers["content-encoding"] = "gzip"
    rec.call_finished(call.finished(attempts))
    rec.close()
    r = row(db, call.id)
    assert r["response_body"] == ANTHROPIC_SSE.decode() and r["content"] == "32 holes."
    assert any("gzip" in n for n in json.loads(r["notes"]))


def test_an_extraction_bug_never_costs_the_row(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llmtap.recorder.recorder as recorder_mod
    import llmtap.recorder.workers as workers_mod

    def broken(*a: object, **kw: object) -> None:
        raise RuntimeError("parser bug")

    monkeypatch.setattr(recorder_mod, "make_extractor", broken)
    monkeypatch.setattr(workers_mod, "extract", broken)
    rec = Recorder(db, serve=False)
    rec.start()
    call = make_call()
    rec.call_started(call.started())
    rec.call_chunk(Chunk(call.id, ANTHROPIC_SSE[:100]))
    rec.call_finished(Call.finished(*finish(call)))
    rec.close()
    r = row(db, call.id)
    assert r["status"] == 200 and r["response_body"] == ANTHROPIC_SSE.decode()
    assert any("extraction failed" in n for n in json.loads(r["notes"]))


def llmtap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmtap", *args], capture_output=True, text=True, timeout=120)


def test_a_reader_with_a_memory_bound_still_exports_what_needs_more(tmp_path: Path) -> None:
    # `llmtap tui` bounds DuckDB's cache; an export from it sorts more than that bound.
    db = tmp_path / "bounded.duckdb"
    con = duckdb.connect(str(db))
    migrate(con)
    con.execute("INSERT INTO calls (id, started_at, api, method, url, attempts, response_body) "
                "SELECT lpad(i::VARCHAR, 26, '0'), now(), 'other', 'POST', 'u', 1, repeat(md5(i::VARCHAR), 128) "
                "FROM range(6000) t(i)")
    con.close()
    reader = open_reader(db, memory_limit="8MB")
    try:
        assert reader.export(tmp_path / "all.parquet", "parquet") == 6000
        assert reader.query("SELECT current_setting('memory_limit')")[1][0][0].startswith("7.")  # bound again
    finally:
        reader.close()
    assert duckdb.sql(f"SELECT count(*) FROM '{tmp_path / 'all.parquet'}'").fetchall() == [(6000,)]


def test_a_reader_leaving_mid_poll_prints_nothing_on_the_proxy_terminal(db: Path, capfd: pytest.CaptureFixture[str]) -> None:
    rec = Recorder(db)
    rec.start()
    try:
        info = json.loads(discovery_path(db).read_text())
        host, port = info["url"].removeprefix("http://").split(":")
        before = threading.active_count()
        sock = socket.create_connection((host, int(port)))
        sock.sendall(f"GET /live?after=999999&timeout=0.3 HTTP/1.1\r\nhost: x\r\n"
                     f"authorization: Bearer {info['token']}\r\n\r\n".encode())
        # Closed with data unread: the reply then meets a reset, as when a UI quits.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        deadline = time.monotonic() + 10
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.02)  # the handler thread ends once its reply failed
        assert threading.active_count() <= before
    finally:
        rec.close()
    assert "Traceback" not in capfd.readouterr().err


def test_another_process_reads_stats_and_exports_while_the_file_is_held(db: Path, tmp_path: Path) -> None:
    rec = Recorder(db)
    rec.start()
    try:
        for _ in range(3):
            c, a = finish(make_call())
            rec.call_finished(c.finished(a))
        failed, a = finish(make_call(), b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}', 529)
        failed.response_headers = {"content-type": "application/json"}
        rec.call_finished(failed.finished(a))
        seq = wait_event(rec, "finished", failed.id)
        assert seq
        stats = llmtap("stats", "--db", str(db), "--json")
        assert stats.returncode == 0, stats.stderr
        (entry,) = json.loads(stats.stdout)
        assert (entry["model"], entry["calls"], entry["errors"], entry["fallbacks"]) == ("claude-sonnet-4-5", 4, 1, 4)
        out = tmp_path / "calls.parquet"
        exp = llmtap("export", "--db", str(db), "--out", str(out), "--model", "smart")
        assert exp.returncode == 0 and "exported 4 calls" in exp.stderr and "running llmtap" in exp.stderr
        with duckdb.connect() as con:
            assert con.execute(f"SELECT count(*), count(reasoning) FROM '{out}'").fetchone() == (4, 3)
    finally:
        rec.close()
    assert not discovery_path(db).exists()


def test_endpoint_needs_the_token_and_serves_reads_only(db: Path) -> None:
    rec = Recorder(db)
    rec.start()
    try:
        info = json.loads(discovery_path(db).read_text())
        assert discovery_path(db).stat().st_mode & 0o077 == 0  # only the user can read the token
        assert httpx.get(info["url"] + "/health", trust_env=False).status_code == 401
        reader = open_reader(db)
        assert isinstance(reader, RemoteReader)
        with pytest.raises(ReaderError, match="only SELECT"):
            reader.query("DELETE FROM calls")
        with pytest.raises(ReaderError, match="only SELECT"):
            reader.query("WITH x AS (SELECT 1) DELETE FROM calls")
        with pytest.raises(ReaderError, match="one statement"):
            reader.query("SELECT 1; DROP TABLE calls")
        assert reader.query("SELECT 41 + 1 AS answer") == (["answer"], [(42,)])
        reader.close()
    finally:
        rec.close()


def test_reader_errors_say_what_to_do(db: Path, tmp_path: Path) -> None:
    with pytest.raises(ReaderError, match="run `llmtap run` first"):
        open_reader(tmp_path / "none.duckdb")
    duckdb.connect(str(db)).close()
    # A discovery file left by a killed proxy is ignored.
    discovery_path(db).write_text(json.dumps({"url": "http://127.0.0.1:9", "token": "x", "pid": 2**22 + 1, "db": str(db)}))
    reader = open_reader(db)
    assert isinstance(reader, LocalReader)
    reader.close()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, sys
        con = duckdb.connect({str(db)!r})
        print("HELD", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        with pytest.raises(ReaderError) as err:
            open_reader(db)
        assert "held by another program" in str(err.value) and "Conflicting lock" not in str(err.value)
        # The recorder (unlike a reader) starts regardless, and records once the holder lets go.
        rec = Recorder(db, serve=False)
        rec.start()
        assert rec.con is None
        rec.call_finished(Call.finished(*finish(make_call())))
    finally:
        holder.stdin.close()
        holder.wait(30)
    rec.close()
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM calls").fetchone() == (1,)


def test_kill_9_loses_nothing_committed_and_the_file_opens(db: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_recorder import Call, finish, make_call
        from llmtap.recorder.recorder import Recorder
        rec = Recorder(__import__("pathlib").Path({str(db)!r}), serve=False)
        rec.start()
        n = 0
        while True:
            rec.call_finished(Call.finished(*finish(make_call())))
            n += 1
            if n == 200:
                while rec.written < 200:
                    pass
                print("COMMITTED", flush=True)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "COMMITTED"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(30)
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM calls").fetchone()[0] >= 200


def test_recorder_imports_neither_mitmproxy_nor_textual() -> None:
    code = ("import sys, llmtap.recorder.recorder, llmtap.recorder.reader, llmtap.recorder.export, "
            "llmtap.recorder.stats, llmtap.recorder.commands; "
            "sys.exit(sorted(m for m in ('mitmproxy', 'textual') if m in sys.modules) != [])")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_writer_does_not_block_the_caller(db: Path) -> None:
    """Sink methods return at once even while the writer is busy committing."""
    rec = Recorder(db)
    rec.start()
    gate = threading.Event()
    original = rec._commit

    def slow_commit(*a):
        gate.wait(10)
        return original(*a)

    rec._commit = slow_commit  # type: ignore[method-assign]
    try:
        first = make_call()
        rec.call_finished(Call.finished(*finish(first)))
        for _ in range(1000):  # the writer is stuck in slow_commit; these must not wait
            rec.call_chunk(Chunk(first.id, b"x"))
        assert len(rec._queue) >= 1000
    finally:
        gate.set()
        rec.close()


def test_every_reader_returns_the_same_python_values(db: Path) -> None:
    rec = Recorder(db)
    rec.start()
    try:
        call = make_call()
        call.request_body = b"\xff\xfe not utf-8"
        rec.call_finished(Call.finished(*finish(call)))
        wait_event(rec, "finished", call.id)
        sql = "SELECT id, started_at, request_body_raw, tool_calls, duration_ms FROM calls WHERE id = ?"
        remote = open_reader(db)
        assert isinstance(remote, RemoteReader) and remote.latest_seq() == rec.hub.seq > 0
        got_remote = remote.query(sql, [call.id])
        # A datetime parameter crosses the endpoint too.
        assert remote.query("SELECT count(*) FROM calls WHERE started_at >= ?", [call.started_at])[1] == [(1,)]
        remote.close()
        got_inprocess = InProcessReader(rec).query(sql, [call.id])
    finally:
        rec.close()
    local = open_reader(db)
    assert local.kind == "local" and local.latest_seq() == 0
    got_local = local.query(sql, [call.id])
    local.close()
    assert got_remote == got_inprocess == got_local
    assert got_local[1][0][2] == b"\xff\xfe not utf-8"


def test_export_in_slices_keeps_order_and_reports_progress(db: Path, tmp_path: Path) -> None:
    rec = Recorder(db, serve=False)
    rec.start()
    ids = []
    for _ in range(30):
        c, a = finish(make_call())
        ids.append(c.id)
        rec.call_finished(c.finished(a))
    rec.close()
    reader = LocalReader(db)
    for fmt in ("parquet", "jsonl", "csv"):
        seen: list[tuple[int, int]] = []
        out = tmp_path / f"all.{fmt}"
        assert reader.export(out, fmt, progress=lambda d, t, seen=seen: seen.append((d, t)), slice_rows=7) == 30
        assert seen[-1] == (30, 30) and len(seen) == 5
        with duckdb.connect() as con:
            # One CSV header, however many parts: read_csv would take a repeated one for a row.
            src = {"parquet": f"read_parquet('{out}')", "jsonl": f"read_json_auto('{out}')",
                   "csv": f"read_csv('{out}')"}[fmt]
            assert [r[0] for r in con.execute(f"SELECT id FROM {src}").fetchall()] == sorted(ids)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".llmtap-export-")]
    reader.close()


def test_cli_errors_name_the_flag_and_exit_2(db: Path, tmp_path: Path) -> None:
    rec = Recorder(db, serve=False)
    rec.start()
    rec.call_finished(Call.finished(*finish(make_call())))
    rec.close()
    bad = llmtap("export", "--db", str(db), "--out", str(tmp_path / "x.parquet"), "--since", "yesterday")
    assert bad.returncode == 2 and "--since 'yesterday': expected an age like 2h" in bad.stderr and "2026-" in bad.stderr
    nowhere = llmtap("export", "--db", str(db), "--out", str(tmp_path / "missing" / "x.parquet"))
    assert nowhere.returncode == 2 and "does not exist" in nowhere.stderr and "Traceback" not in nowhere.stderr
    missing = llmtap("stats", "--db", str(tmp_path / "none.duckdb"))
    assert missing.returncode == 2 and "run `llmtap run` first" in missing.stderr
    table = llmtap("stats", "--db", str(db))
    assert table.returncode == 0 and "claude-sonnet-4-5" in table.stdout
    jsonl = llmtap("export", "--db", str(db), "--out", str(tmp_path / "x.jsonl"))
    assert jsonl.returncode == 0 and "exported 1 calls" in jsonl.stderr
    assert json.loads((tmp_path / "x.jsonl").read_text().splitlines()[0])["status"] == 200


WIRE = Path(__file__).resolve().parent / "fixtures" / "wire"
EXTRACTED = ("status", "stream", "complete", "model_reported", "reasoning", "content", "tool_calls", "finish_reason",
             "input_tokens", "output_tokens", "reasoning_tokens", "error", "notes", "response_body", "response_body_raw",
             "prompt", "session_id", "session_link", "parent_call_id", "turn")
SHAPED = "sk-proj-" + "Zx9" * 12  # a key shape no call carried as a secret


def wire_calls(copies: int) -> list[Call]:
    """Every response of the own wire corpus (gzip, CRLF, cut streams, errors, ...), `copies` times."""
    import base64

    from llmtap.recorder.extract import detect_api

    calls = []
    for path in sorted(WIRE.glob("*.json")) * copies:
        fx = json.loads(path.read_text(encoding="utf-8"))
        req, resp = fx["request"], fx["response"]
        call = make_call()
        call.api = detect_api(req["method"], req["path"], json.dumps(req.get("body")).encode())
        body = req.get("body")
        if isinstance(body, dict) and isinstance(body.get("messages"), list):
            # A user who pasted keys: the search text (`prompt`) must be masked whoever reads it.
            body = {**body, "messages": [*body["messages"], {"role": "user", "content": f"keys {PLANTED} {SHAPED}"}]}
        call.request_body = json.dumps(body).encode()
        call.status, call.response_headers = int(resp["status"]), dict(resp["headers"])
        call.response_body = base64.b64decode(resp["body_b64"]) if "body_b64" in resp else resp["body_raw"].encode()
        calls.append(call)
    return calls


def extracted(db: Path) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(f"SELECT {', '.join(EXTRACTED)} FROM calls ORDER BY id").fetchall()


def record_all(db: Path, calls: list[Call], **kw: object) -> Recorder:
    rec = Recorder(db, serve=False, flush_interval_s=60, **kw)  # one batch, written at close
    rec.start()
    for call in calls:
        rec.call_finished(call.finished([]))
    return rec


def test_helper_processes_extract_a_busy_batch_exactly_as_the_writer_would(tmp_path: Path) -> None:
    calls = wire_calls(3)
    rec = record_all(tmp_path / "helped.duckdb", calls, helpers=2, offload_min=8)
    rec.flush_interval_s = 0.01
    rec._wake.set()
    wait_until(lambda: rec.written >= len(calls), "the calls to be written", 60)
    pids = rec.helpers.pids()
    # They ran and are still there: nothing failed over to the writer's own thread.
    assert len(pids) == 2 and rec.helpers.running == 2
    # Ctrl-C in the terminal reaches the helpers too; only the proxy decides when they stop.
    os.kill(pids[0], signal.SIGINT)
    more = wire_calls(1)
    for call in more:
        rec.call_finished(call.finished([]))
    wait_until(lambda: rec.written >= len(calls) + len(more), "the later calls to be written", 60)
    assert rec.helpers.pids() == pids  # neither stopped, nor was replaced after failing
    rec.close()
    for pid in pids:  # stopped and reaped with the recorder
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    alone = tmp_path / "alone.duckdb"
    record_all(alone, calls + more, helpers=0).close()
    assert extracted(tmp_path / "helped.duckdb") == extracted(alone)
    assert any(r[5] for r in extracted(alone))  # the corpus has answers to compare
    prompts = [r[15] for r in extracted(alone) if r[15]]
    assert any("keys" in p for p in prompts) and not any(PLANTED in p or SHAPED in p for p in prompts)


def test_a_helper_that_dies_costs_no_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls = wire_calls(2)
    rec = record_all(tmp_path / "helped.duckdb", calls, helpers=1, offload_min=4)
    rec.flush_interval_s = 0.01
    rec._wake.set()
    wait_until(lambda: rec.written >= len(calls), "the calls to be written", 60)
    (pid,) = rec.helpers.pids()
    os.kill(pid, signal.SIGKILL)
    more = wire_calls(2)
    for call in more:
        rec.call_finished(call.finished([]))
    rec.close()
    assert "an extraction helper failed" in caplog.text
    alone = tmp_path / "alone.duckdb"
    record_all(alone, calls + more, helpers=0).close()
    assert extracted(tmp_path / "helped.duckdb") == extracted(alone)


# What m001 has always created: the tables users' SQL and every existing file rely on. The
# migration is built from recorder/columns.py; editing an m001 column there must fail here.
M001_TABLES = {
    "calls": [
        ("id", "VARCHAR", "NO", None), ("started_at", "TIMESTAMP WITH TIME ZONE", "NO", None),
        ("client", "VARCHAR", "YES", None), ("api", "VARCHAR", "NO", None), ("method", "VARCHAR", "NO", None),
        ("url", "VARCHAR", "NO", None), ("status", "INTEGER", "YES", None),
        ("model_requested", "VARCHAR", "YES", None), ("model_sent", "VARCHAR", "YES", None),
        ("model_reported", "VARCHAR", "YES", None), ("provider", "VARCHAR", "YES", None),
        ("route", "VARCHAR", "YES", None), ("attempts", "INTEGER", "NO", "0"), ("stream", "BOOLEAN", "YES", None),
        ("complete", "BOOLEAN", "YES", None), ("ttfb_ms", "DOUBLE", "YES", None),
        ("duration_ms", "DOUBLE", "YES", None), ("request_headers", "JSON", "YES", None),
        ("request_body", "VARCHAR", "YES", None), ("response_headers", "JSON", "YES", None),
        ("response_body", "VARCHAR", "YES", None), ("reasoning", "VARCHAR", "YES", None),
        ("content", "VARCHAR", "YES", None), ("tool_calls", "JSON", "YES", None),
        ("finish_reason", "VARCHAR", "YES", None), ("input_tokens", "BIGINT", "YES", None),
        ("output_tokens", "BIGINT", "YES", None), ("reasoning_tokens", "BIGINT", "YES", None),
        ("total_tokens", "BIGINT", "YES", None), ("error", "VARCHAR", "YES", None), ("notes", "JSON", "YES", None),
        ("request_body_raw", "BLOB", "YES", None), ("response_body_raw", "BLOB", "YES", None),
    ],
    "attempts": [
        ("call_id", "VARCHAR", "NO", None), ("n", "INTEGER", "NO", None), ("provider", "VARCHAR", "YES", None),
        ("url", "VARCHAR", "NO", None), ("model_sent", "VARCHAR", "YES", None), ("status", "INTEGER", "YES", None),
        ("error", "VARCHAR", "YES", None), ("started_at", "TIMESTAMP WITH TIME ZONE", "NO", None),
        ("duration_ms", "DOUBLE", "YES", None), ("ttfb_ms", "DOUBLE", "YES", None),
    ],
}


def test_m001_still_makes_the_tables_it_always_made(tmp_path: Path) -> None:
    from llmtap.recorder.schema import MIGRATIONS

    con = duckdb.connect(str(tmp_path / "m001.duckdb"))
    name, step = MIGRATIONS[0]
    assert name == "m001_calls_and_attempts"
    step(con)
    for table, expected in M001_TABLES.items():
        got = con.execute("SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns "
                          "WHERE table_name = ? ORDER BY ordinal_position", [table]).fetchall()
        assert got == expected, table
    keys = con.execute("SELECT constraint_column_names FROM duckdb_constraints() "
                       "WHERE table_name = 'calls' AND constraint_type = 'PRIMARY KEY'").fetchall()
    assert keys == [(["id"],)]
    con.close()


def test_a_row_built_with_a_name_the_spec_lacks_is_refused_not_shifted() -> None:
    from llmtap.recorder.columns import CALL_COLUMNS, call_tuple

    row = {name: name for name in CALL_COLUMNS}
    assert call_tuple(row) == CALL_COLUMNS
    misspelt = dict(row)
    misspelt["reasoning_token"] = misspelt.pop("reasoning_tokens")
    with pytest.raises(KeyError, match="reasoning_token"):
        call_tuple(misspelt)
    with pytest.raises(KeyError, match="columns.py"):
        call_tuple(row | {"extra": 1})


def test_a_column_listed_before_the_migration_order_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmtap.recorder import columns, schema

    late = columns.Column("late", "VARCHAR", "m002_search_index")
    monkeypatch.setitem(schema.TABLES, "calls", (late, *columns.CALLS))
    with pytest.raises(RuntimeError, match="append new columns at the end"):
        schema._check_spec()
    monkeypatch.setitem(schema.TABLES, "calls", (*columns.CALLS, columns.Column("x", "VARCHAR", "m999")))
    with pytest.raises(RuntimeError, match="not in schema.MIGRATIONS"):
        schema._check_spec()


def test_cache_tokens_and_the_providers_usage_object_land_redacted(db: Path) -> None:
    # An upstream that echoes the client's key inside its usage object must not get it stored.
    usage = {"input_tokens": 12, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 50,
             "output_tokens": 20, "echo": PLANTED}
    body = ANTHROPIC_SSE.replace(b'"usage":{"input_tokens":12,"output_tokens":1}',
                                 json.dumps({"usage": usage}, separators=(",", ":"))[1:-1].encode())
    assert body != ANTHROPIC_SSE
    rec = Recorder(db)
    rec.start()
    call, attempts = finish(make_call(), body)
    rec.call_finished(call.finished(attempts))
    rec.close()
    r = row(db, call.id)
    assert (r["input_tokens"], r["cache_read_tokens"], r["cache_write_tokens"], r["output_tokens"]) == (1062, 1000, 50, 20)
    raw = json.loads(r["usage_raw"])
    assert raw["cache_read_input_tokens"] == 1000 and raw["output_tokens"] == 20
    assert PLANTED not in r["usage_raw"] and raw["echo"].startswith("sk-")
    with duckdb.connect(str(db), read_only=True) as con:
        assert ("m004_usage",) in con.execute("SELECT name FROM _migrations").fetchall()
