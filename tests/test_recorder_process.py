"""The recorder in a process of its own, as `llmtap run` uses it: the proxy hands records over a
pipe, and neither the proxy's death nor the recorder's costs what was handed over."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import httpx
import pytest

from fakeprovider import FakeProvider
from llmtap.recorder.endpoint import discovery_path
from llmtap.recorder.events import Chunk
from llmtap.recorder.process import RecorderProcess
from llmtap.recorder.reader import Reader, open_reader
from llmtap.recorder.record import Call
from llmtap.recorder.recorder import RecorderError
from test_cli import Lines
from test_recorder import ANTHROPIC_SSE, PLANTED, finish, make_call
from waiting import wait_gone, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipes and signals as on Linux")



def reap(proc: subprocess.Popen) -> None:
    """Kill what a failed test left running."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def wait_event(reader: Reader, kind: str, call_id: str, after: int = 0) -> int:
    seq = after
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seq, events = reader.events_after(seq, 0.5)
        if any(e["kind"] == kind and e["id"] == call_id for e in events):
            return seq
    raise AssertionError(f"no {kind} event for {call_id}")


@contextmanager
def a_call_in_progress(db: Path) -> Iterator[tuple[RecorderProcess, Call, Reader, int]]:
    """A recorder process, a reader of it, and a call whose in-progress row is committed (with
    the live event's number)."""
    rec = RecorderProcess(db)
    rec.start()
    try:
        call = make_call()
        rec.call_started(call.started())
        reader = open_reader(db)
        try:
            yield rec, call, reader, wait_event(reader, "started", call.id)
        finally:
            reader.close()
    finally:
        rec.close()


def test_a_streamed_call_reads_live_through_the_recorder_process_and_lands_whole(tmp_path: Path) -> None:
    db = tmp_path / "calls.duckdb"
    gzipped = {"content-type": "text/event-stream", "content-encoding": "gzip"}
    body = gzip.compress(ANTHROPIC_SSE)
    with a_call_in_progress(db) as (rec, call, reader, seq):
        # Only now does the response begin: the proxy sets its status and headers before it
        # forwards the first chunk. The body is gzip, which the child can read live only if
        # those reached its copy of the call, taken at the start.
        call.status, call.response_headers = 200, gzipped
        rec.response_head(call.responded())
        rec.call_chunk(Chunk(call.id, body))
        wait_event(reader, "progress", call.id, seq)
        partial = reader.partial(call.id)
        assert partial is not None and partial["reasoning"] == "Five folds: 2^5 = 32."
        call, attempts = finish(call, body)
        call.response_headers = gzipped
        rec.call_finished(call.finished(attempts))
    assert rec.proc is None
    with duckdb.connect(str(db), read_only=True) as con:
        got = con.execute("SELECT reasoning, content, complete, status, request_headers FROM calls").fetchall()
        assert [g[:4] for g in got] == [("Five folds: 2^5 = 32.", "32 holes.", True, 200)]
        assert PLANTED not in got[0][4]
        assert con.execute("SELECT count(*) FROM attempts").fetchone() == (2,)


def test_a_second_recorder_process_on_a_recorded_file_is_refused_with_the_proxy_s_message(tmp_path: Path) -> None:
    db = tmp_path / "calls.duckdb"
    first = RecorderProcess(db)
    first.start()
    try:
        second = RecorderProcess(db)
        with pytest.raises(RecorderError, match="held by another process: the `llmtap run` with pid"):
            second.start()
        assert second.proc is None
    finally:
        first.close()


def test_a_call_open_when_the_recorder_process_dies_still_lands_once(tmp_path: Path) -> None:
    db = tmp_path / "calls.duckdb"
    with a_call_in_progress(db) as (rec, call, _reader, _seq):
        assert rec.proc is not None
        os.kill(rec.proc.pid, signal.SIGKILL)
        rec.call_finished(Call.finished(*finish(call)))
    assert rec.restarts == 1
    with duckdb.connect(str(db), read_only=True) as con:
        # The new recorder process replaced the row the dead one left in progress.
        assert con.execute("SELECT status, reasoning FROM calls").fetchall() == [(200, "Five folds: 2^5 = 32.")]
        assert con.execute("SELECT count(*) FROM dropped").fetchone() == (0,)


def test_a_reader_follows_a_recorder_process_started_again(tmp_path: Path) -> None:
    db = tmp_path / "calls.duckdb"
    with a_call_in_progress(db) as (rec, call, reader, seq):
        assert rec.proc is not None
        gone = reader.url
        os.kill(rec.proc.pid, signal.SIGKILL)
        wait_until(lambda: rec.restarts, "a new recorder process", 60)
        # The UI's reader carries on, on the new endpoint, and is told to reload.
        assert reader.query("SELECT count(*) FROM calls")[1] == [(1,)]
        assert reader.url != gone
        _seq, events = reader.events_after(seq, 1.0)
        assert [e["kind"] for e in events] == ["reset"]
        rec.call_finished(Call.finished(*finish(call)))


PROXY = textwrap.dedent("""
    import sys, time
    from llmtap.recorder.process import RecorderProcess
    sys.path.insert(0, sys.argv[2])
    from llmtap.recorder.record import Call
    from test_recorder import finish, make_call
    # A flush interval far longer than the test: nothing is committed but at the end of input.
    rec = RecorderProcess(sys.argv[1], flush_interval_s=600)
    rec.start()
    for _ in range(20):
        call = make_call()
        rec.call_started(call.started())
        rec.call_finished(Call.finished(*finish(call)))
    while rec.handed_over < 20:
        time.sleep(0.01)
    print(rec.proc.pid, flush=True)
    sys.stdin.read()
""")


def test_a_proxy_killed_with_sigkill_costs_nothing_it_handed_over(tmp_path: Path) -> None:
    db = tmp_path / "calls.duckdb"
    proxy = subprocess.Popen([sys.executable, "-c", PROXY, str(db), str(Path(__file__).parent)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proxy.stdout is not None
        child = int(proxy.stdout.readline())
        proxy.kill()
        proxy.wait()
        # The child sees the end of its input, commits the 20 calls and lets go of the file.
        wait_gone(child)
        with duckdb.connect(str(db), read_only=True) as con:
            assert con.execute("SELECT count(*), count(reasoning) FROM calls").fetchone() == (20, 20)
        assert not discovery_path(db).exists()
    finally:
        reap(proxy)


def test_a_recorder_process_that_dies_costs_no_call_and_is_replaced(tmp_path: Path, fake: FakeProvider) -> None:
    db = tmp_path / "calls.duckdb"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtap", "run", "-q", "--db", str(db), "--confdir", str(tmp_path / "ca"),
         "--proxy", "off", "--gateway", "127.0.0.1:0",
         "--rules", str(_rules(tmp_path, fake))],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        err = Lines(proc.stderr)
        line = err.wait_for("/<provider>")
        gateway = line[line.index("http://"):line.index("/<provider>")]
        recorder_pid = json.loads(discovery_path(db).read_text())["pid"]
        assert recorder_pid != proc.pid

        def call(n: int) -> None:
            r = client.post(f"{gateway}/local/chat/completions",
                            json={"model": "m", "messages": [{"role": "user", "content": f"call {n}"}]})
            assert r.status_code == 200

        with httpx.Client(timeout=30) as client:
            for n in range(5):
                call(n)
            os.kill(recorder_pid, signal.SIGKILL)
            for n in range(5, 10):
                call(n)  # the proxy never noticed: every call is answered
            err.wait_for("a new recorder process records into")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        assert "the recorder process stopped unexpectedly" in "".join(err.lines)
        with duckdb.connect(str(db), read_only=True) as con:
            recorded = [r[0] for r in con.execute("SELECT request_body FROM calls ORDER BY id").fetchall()]
            assert con.execute("SELECT count(*) FROM dropped").fetchone() == (0,)
        # The calls the dead process had not committed were handed to the new one.
        assert [f"call {n}" in body for n, body in enumerate(recorded)] == [True] * 10
    finally:
        reap(proc)


def _rules(tmp_path: Path, fake: FakeProvider) -> Path:
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"providers:\n  local: {{base_url: '{fake.url}/v1', api: openai}}\n")
    return rules
