"""The recorder on real DuckDB files: what lands, when, and that nothing is lost or leaked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import duckdb
import httpx
import pytest

from llmtap.recorder.endpoint import discovery_path
from llmtap.recorder.reader import InProcessReader, LocalReader, ReaderError, RemoteReader, open_reader
from llmtap.recorder.record import Attempt, Call, new_id, utcnow
from llmtap.recorder.recorder import Recorder, RecorderError, spool_path

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
    rec.call_started(call)
    call, attempts = finish(call)
    for piece in (ANTHROPIC_SSE[:100], ANTHROPIC_SSE[100:101], ANTHROPIC_SSE[101:]):
        rec.call_chunk(call.id, piece)
    rec.call_finished(call, attempts)
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
        rec.call_started(call)
        seq = wait_event(rec, "started", call.id)
        _, rows = reader.query("SELECT status, duration_ms, model_requested FROM calls WHERE id = ?", [call.id])
        assert rows == [(None, None, "smart")]
        rec.call_chunk(call.id, ANTHROPIC_SSE[:600])
        seq = wait_event(rec, "progress", call.id, seq)
        part = reader.partial(call.id)
        assert part is not None and part["reasoning"].startswith("Five folds")
        call, attempts = finish(call)
        rec.call_chunk(call.id, ANTHROPIC_SSE[600:])
        rec.call_finished(call, attempts)
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
        rec.call_finished(*finish(make_call()))
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
    rec.call_finished(call, attempts)
    rec.close()
    r = row(db, call.id)
    assert r["request_body"] is None and r["request_body_raw"] == call.request_body
    assert r["complete"] is False and r["error"] == "upstream cut the stream: reset"
    assert r["response_body"] == cut_body.decode()
    assert any("not UTF-8" in n for n in json.loads(r["notes"]))


def test_secrets_never_reach_the_file_the_spool_or_an_export(db: Path, tmp_path: Path) -> None:
    rec = Recorder(db)
    rec.start()
    call = make_call(url=f"https://generativelanguage.googleapis.com/v1beta/models/g:generateContent?key={PLANTED_Q}")
    rec.call_finished(*finish(call))
    failing = make_call()
    original = rec._commit
    rec._commit = lambda *a: (_ for _ in ()).throw(OSError("disk full"))  # type: ignore[method-assign]
    rec.call_finished(*finish(failing))
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
        rec.call_finished(*c)
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


def test_a_full_queue_records_how_many_were_dropped(db: Path) -> None:
    rec = Recorder(db, queue_limit=2)
    for _ in range(10):  # before start: nothing drains the queue
        rec.call_finished(*finish(make_call()))
    rec.start()
    rec.close()
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM calls").fetchone()[0] == 4
        assert con.execute("SELECT sum(count) FROM dropped").fetchone()[0] == 6


def llmtap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmtap", *args], capture_output=True, text=True, timeout=120)


def test_another_process_reads_stats_and_exports_while_the_file_is_held(db: Path, tmp_path: Path) -> None:
    rec = Recorder(db)
    rec.start()
    try:
        for _ in range(3):
            c, a = finish(make_call())
            rec.call_finished(c, a)
        failed, a = finish(make_call(), b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}', 529)
        failed.response_headers = {"content-type": "application/json"}
        rec.call_finished(failed, a)
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
        with pytest.raises(RecorderError, match="held by another process"):
            Recorder(db, serve=False).start()
    finally:
        holder.stdin.close()
        holder.wait(30)


def test_kill_9_loses_nothing_committed_and_the_file_opens(db: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_recorder import finish, make_call
        from llmtap.recorder.recorder import Recorder
        rec = Recorder(__import__("pathlib").Path({str(db)!r}), serve=False)
        rec.start()
        n = 0
        while True:
            rec.call_finished(*finish(make_call()))
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
        rec.call_finished(*finish(first))
        for _ in range(1000):  # the writer is stuck in slow_commit; these must not wait
            rec.call_chunk(first.id, b"x")
        assert len(rec._queue) >= 1000
    finally:
        gate.set()
        rec.close()
