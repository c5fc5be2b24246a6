"""Nothing lost when the store fails: a full disk, a read-only folder, a file another program
holds, a proxy killed mid-call. Each test runs the real `llmtap run` (proxy and recorder
process) against the fake provider, on a real file system made to fail (a small tmpfs)."""

from __future__ import annotations

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

from fakeprovider import FakeProvider, slow
from llmtap.recorder.endpoint import discovery_path
from llmtap.recorder.reader import open_reader
from llmtap.recorder.recorder import INTERRUPTED, spool_path
from test_cli import Lines
from waiting import wait_gone, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tmpfs mounts and signals as on Linux")


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextmanager
def small_disk(where: Path, size: str = "8M") -> Iterator[Path]:
    """A tmpfs of `size` at `where`, unmounted afterwards; skips when mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    r = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Write a filler file until the file system is full, then give back `leave` bytes of it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    finally:
        if leave:
            os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
        os.close(fd)
    return filler


class LlmtapRun:
    """`llmtap run` as a user starts it, gateway on a port from the OS."""

    def __init__(self, tmp_path: Path, fake: FakeProvider, db: Path, *extra: str) -> None:
        rules = tmp_path / "rules.yaml"
        rules.write_text(f"providers:\n  local: {{base_url: '{fake.url}/v1', api: openai}}\n")
        self.db = db
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmtap", "run", "-q", "--db", str(db), "--confdir", str(tmp_path / "ca"),
             "--proxy", "off", "--gateway", "127.0.0.1:0", "--rules", str(rules), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.err = Lines(self.proc.stderr)

    def ready(self) -> str:
        line = self.err.wait_for("/<provider>")
        return line[line.index("http://"):line.index("/<provider>")]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(120)
        self.err.ended.wait(10)
        return code

    def reap(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def said(self, text: str) -> int:
        return sum(text in line for line in self.err.lines)


def chat(client: httpx.Client, gateway: str, n: int, pad: int = 0) -> None:
    r = client.post(f"{gateway}/local/chat/completions",
                    json={"model": "m", "messages": [{"role": "user", "content": f"call {n} " + "x" * pad}]})
    assert r.status_code == 200, r.text


def recorded(db: Path) -> tuple[list[str], int]:
    """(request bodies of the calls in the file, sum of the `dropped` counts); no row is left in
    progress."""
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM calls WHERE status IS NULL").fetchone() == (0,)
        bodies = [r[0] for r in con.execute("SELECT request_body FROM calls ORDER BY id").fetchall()]
        dropped = con.execute("SELECT coalesce(sum(count), 0) FROM dropped").fetchone()[0]
    return bodies, int(dropped)


def test_a_full_disk_costs_no_call_and_writing_resumes_by_itself(tmp_path: Path, fake: FakeProvider) -> None:
    with small_disk(tmp_path / "disk") as disk:
        db = disk / "calls.duckdb"
        run = LlmtapRun(tmp_path, fake, db)
        try:
            gateway = run.ready()
            filler = fill(disk)
            with httpx.Client(timeout=60) as client:
                for n in range(40):
                    chat(client, gateway, n, pad=20_000)  # 800 KB in all: more than the disk had
                run.err.wait_for("cannot write to")
                filler.unlink()
                run.err.wait_for("works again")
                chat(client, gateway, 40)
            assert run.stop() == 0
        finally:
            run.reap()
        bodies, dropped = recorded(db)
        assert [f"call {n} " in body for n, body in enumerate(bodies)] == [True] * 41
        assert dropped == 0
        # Said once, with what to do; not once per batch.
        assert run.said("cannot write to") == 1 and run.said("free disk space") == 1
        assert not spool_path(db).exists()


def test_a_full_disk_and_a_full_buffer_count_every_lost_call_exactly(tmp_path: Path, fake: FakeProvider) -> None:
    with small_disk(tmp_path / "disk") as disk:
        db = disk / "calls.duckdb"
        run = LlmtapRun(tmp_path, fake, db, "--buffer-mb", "1")
        made = 60
        try:
            gateway = run.ready()
            filler = fill(disk)
            with httpx.Client(timeout=60) as client:
                for n in range(made):
                    chat(client, gateway, n, pad=50_000)  # 3 MB: three times the buffer, no room for a spool
                run.err.wait_for("records are being lost")
                filler.unlink()
                run.err.wait_for("works again")
            assert run.stop() == 0
        finally:
            run.reap()
        bodies, dropped = recorded(db)
        # How many land depends on how much space DuckDB's failed writes gave back (all may be
        # lost); that each call is either recorded or counted, exactly, does not.
        assert dropped > 0, "".join(run.err.lines)
        assert len(bodies) + dropped == made, "".join(run.err.lines)
        # The stop line says so too, not "none lost".
        assert f", {dropped:,} not recorded" in run.err.lines[-1], run.err.lines[-1]
        assert len(set(bodies)) == len(bodies)
        # Said once per episode of failure, not once per batch. The disk may let a tiny commit
        # (the drop counts) through before the filler goes, which ends one episode and starts
        # another: each says it once.
        episodes = run.said("cannot write to")
        assert 1 <= run.said("records are being lost") == episodes, "".join(run.err.lines)


def _spooled_calls(db: Path, n: int, size: int) -> list[str]:
    """`n` calls with requests of `size` bytes, all in the spool: the database refuses them."""
    from llmtap.recorder.record import Call
    from llmtap.recorder.recorder import Recorder
    from test_recorder import finish, make_call

    rec = Recorder(db, serve=False)
    rec.start()
    rec._commit = lambda *a: (_ for _ in ()).throw(duckdb.IOException("No space left on device"))  # type: ignore[method-assign]
    ids = []
    for i in range(n):
        call = make_call()
        call.request_body = json.dumps({"model": "smart", "messages": [
            {"role": "user", "content": f"call {i} " + os.urandom(size // 2).hex()}]}).encode()
        rec.call_finished(Call.finished(*finish(call)))
        ids.append(call.id)
    rec.close()
    return ids


def _in_db(db: Path) -> tuple[set[str], int, int]:
    """(call ids, attempts, sum of the drop counts) in the file."""
    with duckdb.connect(str(db), read_only=True) as con:
        ids = {r[0] for r in con.execute("SELECT id FROM calls").fetchall()}
        attempts = con.execute("SELECT count(*) FROM attempts").fetchone()[0]
        dropped = con.execute("SELECT coalesce(sum(count), 0) FROM dropped").fetchone()[0]
    return ids, int(attempts), int(dropped)


def test_a_spool_larger_than_the_space_freed_still_drains_into_the_database(tmp_path: Path) -> None:
    # After a full disk the user frees a little space, far less than the spool holds: the
    # records go in part by part, the spool shrinking as the database grows, instead of
    # waiting until there is room for the whole spool beside its copy.
    from llmtap.recorder.recorder import Recorder

    with small_disk(tmp_path / "disk", "24M") as disk:
        db = disk / "calls.duckdb"
        ids = _spooled_calls(db, 24, 200_000)
        spooled = spool_path(db).stat().st_size
        assert spooled > 8 << 20
        filler = fill(disk, leave=spooled // 4)
        rec = Recorder(db, serve=False)
        rec.start()
        rec.close()
        assert not spool_path(db).exists()
        filler.unlink()
        assert _in_db(db) == (set(ids), 2 * len(ids), 0)


def test_a_crash_between_importing_a_part_of_the_spool_and_cutting_it_off_imports_it_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmtap.recorder import recorder as recorder_mod
    from llmtap.recorder.recorder import Recorder

    db = tmp_path / "calls.duckdb"
    ids = _spooled_calls(db, 6, 20_000)
    with spool_path(db).open("a") as f:
        f.write(json.dumps({"dropped": 3, "reason": "earlier"}) + "\n")  # the last part: counted once
    monkeypatch.setattr(recorder_mod, "SPOOL_PART_BYTES", 30_000)

    def crash(fd: int, length: int) -> None:
        raise KeyboardInterrupt  # the process dies after the part's commit, before the cut

    monkeypatch.setattr(recorder_mod.os, "ftruncate", crash)
    rec = Recorder(db, serve=False)
    with pytest.raises(KeyboardInterrupt):
        rec.start()
    rec.close()
    monkeypatch.undo()
    # The next run could not write its database either, and appended to the spool.
    later = _spooled_calls(db, 2, 20_000)
    monkeypatch.setattr(recorder_mod, "SPOOL_PART_BYTES", 30_000)
    rec = Recorder(db, serve=False)
    rec.start()
    rec.close()
    assert not spool_path(db).exists()
    assert _in_db(db) == (set(ids + later), 2 * len(ids + later), 3)


def test_the_spool_never_keeps_a_cut_line_and_import_skips_a_torn_tail(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    from llmtap.recorder.record import Call
    from llmtap.recorder.recorder import Recorder
    from test_recorder import finish, make_call

    with small_disk(tmp_path / "disk") as disk:
        db = disk / "calls.duckdb"
        # A spool that a crash cut mid-line, then a full disk.
        spool_path(db).write_text('{"dropped": 2, "reason": "earlier"}\n{"call": ["01J', encoding="utf-8")
        rec = Recorder(db, serve=False, buffer_bytes=1)
        filler = fill(disk)
        rec.start()  # cannot even create the database
        assert rec.con is None
        calls = [finish(make_call()) for _ in range(3)]
        for c in calls:
            rec.call_finished(Call.finished(*c))
        rec.close()
        # The torn tail is kept as it was, and whatever could be appended is whole lines.
        torn = '{"dropped": 2, "reason": "earlier"}\n{"call": ["01J'
        text = spool_path(db).read_text()
        assert text.startswith(torn) and (text == torn or text.endswith("\n"))
        for line in text[len(torn):].splitlines()[1:]:
            json.loads(line)
        filler.unlink()
        rec = Recorder(db, serve=False)
        rec.start()
        rec.close()
        with duckdb.connect(str(db), read_only=True) as con:
            reasons = dict(con.execute("SELECT reason, count FROM dropped").fetchall())
        assert reasons.pop("earlier") == 2
        assert [n for r, n in reasons.items() if "cut lines" in r] == [1]
        # The 3 calls lost while the disk was full: counted in the table when the count fit in
        # the spool, else said at close.
        lost = [n for r, n in reasons.items() if "neither the database nor its spool" in r]
        assert lost == [3] or (lost == [] and "3 calls were not recorded" in caplog.text)
        assert not spool_path(db).exists()
        # A cut tail followed by good lines: the good lines are all imported.
        spool_path(db).write_text('{"call": ["01J', encoding="utf-8")
        rec = Recorder(db, serve=False)
        rec.start()
        rec._commit = lambda *a: (_ for _ in ()).throw(OSError("No space left on device"))  # type: ignore[method-assign]
        more = [finish(make_call()) for _ in range(2)]
        for c in more:
            rec.call_finished(Call.finished(*c))
        rec.close()
        rec = Recorder(db, serve=False)
        rec.start()
        rec.close()
        with duckdb.connect(str(db), read_only=True) as con:
            ids = {r[0] for r in con.execute("SELECT id FROM calls").fetchall()}
        assert {c.id for c, _ in more} <= ids


HOLDER = textwrap.dedent("""
    import duckdb, sys
    con = duckdb.connect(sys.argv[1])
    print("HELD", flush=True)
    sys.stdin.read()
    con.close()
""")


def test_a_file_held_by_another_program_does_not_stop_the_proxy(tmp_path: Path, fake: FakeProvider) -> None:
    db = tmp_path / "calls.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    run = None
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "HELD"
        run = LlmtapRun(tmp_path, fake, db)
        gateway = run.ready()
        assert run.said("is held by another program") == 1 and run.said("close that program") == 1
        with httpx.Client(timeout=60) as client:
            chat(client, gateway, 0)  # the client gets its answer
            holder.communicate("", timeout=60)
            run.err.wait_for("works again")
            chat(client, gateway, 1)
        assert run.stop() == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if run is not None:
            run.reap()
    bodies, dropped = recorded(db)
    assert [f"call {n}" in body for n, body in enumerate(bodies)] == [True, True] and dropped == 0


def test_a_read_only_folder_does_not_stop_the_proxy(tmp_path: Path, fake: FakeProvider) -> None:
    with small_disk(tmp_path / "disk") as disk:
        r = _mount("-o", "remount,ro", str(disk))
        if r.returncode != 0:
            pytest.skip(f"cannot remount a tmpfs read-only here: {r.stderr.strip()}")
        db = disk / "data" / "calls.duckdb"
        run = LlmtapRun(tmp_path, fake, db)
        try:
            gateway = run.ready()
            assert run.said("Read-only file system") >= 1 and run.said(f"make {disk / 'data'} writable") == 1
            with httpx.Client(timeout=60) as client:
                chat(client, gateway, 0)
                assert _mount("-o", "remount,rw", str(disk)).returncode == 0
                run.err.wait_for("works again")
            assert run.stop() == 0
        finally:
            run.reap()
        bodies, _ = recorded(db)
        assert len(bodies) == 1 and "call 0" in bodies[0]


def test_a_second_llmtap_run_on_the_same_file_is_refused(tmp_path: Path, fake: FakeProvider) -> None:
    db = tmp_path / "calls.duckdb"
    first = LlmtapRun(tmp_path, fake, db)
    try:
        first.ready()
        second = LlmtapRun(tmp_path, fake, db)
        try:
            assert second.proc.wait(120) == 2
            second.err.ended.wait(10)
            assert second.said("held by another process: the `llmtap run` with pid") == 1
        finally:
            second.reap()
        assert first.stop() == 0
    finally:
        first.reap()



def test_a_call_in_flight_when_the_proxy_is_killed_is_closed_as_interrupted(tmp_path: Path,
                                                                            fake: FakeProvider) -> None:
    db = tmp_path / "calls.duckdb"
    fake.script(slow(delay_s=30, chunks=4))  # holds the stream open after its first event
    run = LlmtapRun(tmp_path, fake, db)
    try:
        gateway = run.ready()
        recorder_pid = json.loads(discovery_path(db).read_text())["pid"]
        with httpx.Client(timeout=60) as client, client.stream(
                "POST", f"{gateway}/local/chat/completions",
                json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "long"}]}) as r:
            assert r.status_code == 200
            chunks = r.iter_raw()  # held: a dropped iterator closes the response
            next(chunks)  # the stream is flowing
            reader = open_reader(db)
            try:
                deadline = time.monotonic() + 60
                while reader.query("SELECT count(*) FROM calls WHERE status IS NULL")[1][0][0] != 1:
                    assert time.monotonic() < deadline, "the in-progress row was never committed"
                    time.sleep(0.05)
            finally:
                reader.close()
            run.proc.kill()
            run.proc.wait()
        wait_gone(recorder_pid)  # the recorder commits what it had and lets go of the file
    finally:
        run.reap()
    again = LlmtapRun(tmp_path, fake, db)
    try:
        again.ready()
        assert again.stop() == 0
    finally:
        again.reap()
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT status, complete, error, notes FROM calls").fetchall()
    assert len(rows) == 1
    status, complete, error, notes = rows[0]
    assert complete is False and error == INTERRUPTED and INTERRUPTED in json.loads(notes)


def test_a_request_head_the_relay_refuses_is_recorded_with_its_status(tmp_path: Path, fake: FakeProvider,
                                                                      confdir: Path) -> None:
    from proxyharness import RunningProxy

    rules = tmp_path / "rules.yaml"
    rules.write_text(f"providers:\n  local: {{base_url: '{fake.url}/v1', api: openai}}\n")
    with RunningProxy(rules, confdir) as p, httpx.Client(timeout=60) as client:
        r = client.post(f"{p.gateway_url}/local/chat/completions", headers={"x-big": "a" * (2 << 20)},
                        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 431
        (call, _attempts), = p.memory.wait_finished(1)
        assert [c.id for c in p.memory.started] == [call.id]  # the row that started is the one closed
        assert call.status == 431 and "request head too large" in (call.error or "")


def test_a_call_lost_on_a_full_disk_does_not_stay_in_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from llmtap.recorder.recorder import LOST, Recorder
    from test_recorder import finish, make_call

    with small_disk(tmp_path / "disk") as disk:
        db = disk / "calls.duckdb"
        rec = Recorder(db, serve=False, buffer_bytes=1)  # no memory to wait in: a failed write is a loss
        rec.start()
        try:
            call = make_call()
            rec.call_started(call.started())
            wait_until(lambda: rec.cursor().execute("SELECT count(*) FROM calls").fetchone() == (1,),
                       "the in-progress row to be committed", 60)
            filler = fill(disk)
            call, attempts = finish(call)
            call.response_body += b" " * 200_000  # more than any slack the full disk has left
            rec.call_finished(call.finished(attempts))
            wait_until(lambda: "records are being lost" in caplog.text, "the loss to be said", 60)
            filler.unlink()
        finally:
            rec.close()
        with duckdb.connect(str(db), read_only=True) as con:
            assert con.execute("SELECT complete, error FROM calls").fetchall() == [(False, LOST)]
            assert con.execute("SELECT sum(count) FROM dropped").fetchone() == (1,)


def test_llmtap_run_starts_on_a_full_disk_and_records_once_there_is_room(tmp_path: Path, fake: FakeProvider) -> None:
    with small_disk(tmp_path / "disk") as disk:
        db = disk / "calls.duckdb"
        duckdb.connect(str(db)).close()  # recorded into before; now the disk fills up
        filler = fill(disk)
        run = LlmtapRun(tmp_path, fake, db)
        try:
            gateway = run.ready()
            with httpx.Client(timeout=60) as client:
                chat(client, gateway, 0, pad=100_000)  # the client gets its answer
                run.err.wait_for(f"To fix: free disk space on the file system of {disk}")
                filler.unlink()
                run.err.wait_for("works again")
                deadline = time.monotonic() + 60
                while not discovery_path(db).exists():  # readers can attach again too
                    assert time.monotonic() < deadline, "the endpoint file was never written"
                    time.sleep(0.05)
                reader = open_reader(db)
                try:
                    assert reader.kind == "remote"
                    assert reader.query("SELECT count(*) FROM calls")[1][0][0] == 1
                finally:
                    reader.close()
            assert run.stop() == 0
        finally:
            run.reap()
        bodies, dropped = recorded(db)
        assert len(bodies) == 1 and "call 0" in bodies[0] and dropped == 0
