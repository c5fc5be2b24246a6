"""`llmtap archive` and `llmtap run --archive-to`: Parquet by day on a folder and on S3 (a moto
server on loopback), read back as one dataset; idempotence; --delete; retention; while recording."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import httpx
import pytest

from fakeprovider import FakeProvider
from llmtap.recorder import archive as archive_mod
from llmtap.recorder import schema
from llmtap.recorder.reader import open_reader
from llmtap.recorder.record import Call
from llmtap.recorder.recorder import Recorder
from llmtap.recorder.search_index import SearchIndex
from test_cli import Lines
from test_recorder import finish, make_call

BUCKET = "llmtap-archive-test"
FINISHED = archive_mod.FINISHED


def llmtap(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmtap", *args], capture_output=True, text=True, timeout=170,
                          env={**os.environ, **(env or {})})


def build_db(db: Path, days: dict[int, int], *, in_progress: int = 0, pad: int = 0) -> list[Call]:
    """A DB written by the real recorder: `days[n]` finished calls started n days ago (each with
    two attempts), and `in_progress` calls started and not finished."""
    rec = Recorder(db, serve=False, helpers=0)
    rec.start()
    now = dt.datetime.now(dt.timezone.utc)
    open_calls = []
    try:
        for ago, n in days.items():
            for _ in range(n):
                call = make_call()
                call.started_at = now - dt.timedelta(days=ago, minutes=1)
                if pad:
                    call.request_body = json.dumps({"model": "smart", "pad": os.urandom(pad).hex()}).encode()
                rec.call_finished(Call.finished(*finish(call)))
        for _ in range(in_progress):
            call = make_call()
            rec.call_started(call.started())
            open_calls.append(call)
    finally:
        rec.close()
    return open_calls


def rows(con: duckdb.DuckDBPyConnection, sql: str) -> list[tuple]:
    return con.execute(sql).fetchall()


def local_rows(db: Path, table: str, where: str = "TRUE") -> list[tuple]:
    order = "id" if table == "calls" else "call_id, n"
    with duckdb.connect(str(db), read_only=True) as con:
        return rows(con, f"SELECT * FROM {table} WHERE {where} ORDER BY {order}")


def archived(root: Path, table: str) -> list[tuple]:
    order = "id" if table == "calls" else "call_id, n"
    return rows(duckdb.connect(), f"SELECT * EXCLUDE (date) FROM read_parquet('{root}/{table}/**/*.parquet', "
                                  f"hive_partitioning = true) ORDER BY {order}")


def files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet"))


def test_a_folder_archive_holds_every_finished_call_exactly_by_day_and_a_second_run_adds_nothing(
        tmp_path: Path) -> None:
    db, root = tmp_path / "calls.duckdb", tmp_path / "archive"
    open_calls = build_db(db, {0: 4, 1: 3, 3: 2}, in_progress=1)
    r = llmtap("archive", "--db", str(db), "--to", str(root))
    assert r.returncode == 0, r.stderr
    assert "archived 9 calls (18 attempts" in r.stderr  # and the sessions grouping found
    # Exactly the finished rows, every column, and the attempts of exactly those calls.
    assert archived(root, "calls") == local_rows(db, "calls", FINISHED)
    assert archived(root, "attempts") == local_rows(db, "attempts")
    con = duckdb.connect()
    days = rows(con, f"SELECT date, count(*) FROM read_parquet('{root}/calls/**/*.parquet', hive_partitioning = true) "
                     "GROUP BY 1 ORDER BY 1")
    today = dt.datetime.now(dt.timezone.utc).date()
    expect = sorted([((today - dt.timedelta(days=ago)), n) for ago, n in {0: 4, 1: 3, 3: 2}.items()])
    # A call started a minute before midnight UTC n days ago lands on that day's folder.
    started = {cid: s for cid, s in rows(con, f"SELECT id, started_at FROM '{root}/calls/**/*.parquet'")}
    assert [d for d, _ in days] == sorted({s.astimezone(dt.timezone.utc).date() for s in started.values()})
    assert sum(n for _, n in days) == sum(n for _, n in expect)
    assert open_calls[0].id not in started  # in progress: not archived
    # Private: files 0600, folders 0700, whatever the umask.
    for p in [root, *root.rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p
    before = files(root)

    again = llmtap("archive", "--db", str(db), "--to", str(root))
    assert again.returncode == 0, again.stderr
    assert "archived 0 calls" in again.stderr and "9 were archived before" in again.stderr
    assert files(root) == before

    # The call in progress finishes (as a recorder taking it over writes it): the next run takes it alone.
    rec = Recorder(db, serve=False, helpers=0, close_interrupted=False)
    rec.start()
    rec.adopt([open_calls[0].id])
    rec.call_finished(Call.finished(*finish(open_calls[0])))
    rec.close()
    third = llmtap("archive", "--db", str(db), "--to", str(root))
    assert "archived 1 calls (2 attempts" in third.stderr, third.stderr
    assert archived(root, "calls") == local_rows(db, "calls")
    ids = [r[0] for r in archived(root, "calls")]
    assert len(ids) == len(set(ids)) == 10


@pytest.fixture
def s3() -> Iterator[dict[str, str]]:
    """A moto S3 server on loopback with one bucket; the AWS_* variables that reach it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing-secret").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        server.stop()


def s3_table(env: dict[str, str], prefix: str, table: str) -> list[tuple]:
    """The archive on S3 as one hive-partitioned dataset (pyarrow), queried with DuckDB."""
    import pyarrow.dataset as ds

    target = archive_mod.open_target(f"s3://{BUCKET}/{prefix}", env)
    data = ds.dataset(f"{BUCKET}/{prefix}/{table}", filesystem=target.fs, format="parquet",
                      partitioning="hive").to_table()
    con = duckdb.connect()
    con.register("data", data)
    order = "id" if table == "calls" else "call_id, n"
    return rows(con, f"SELECT * EXCLUDE (date) FROM data ORDER BY {order}")


def test_two_llmtap_files_archive_into_one_s3_prefix_and_one_folder_and_query_as_one(
        tmp_path: Path, s3: dict[str, str]) -> None:
    a, b = tmp_path / "a.duckdb", tmp_path / "b.duckdb"
    build_db(a, {0: 3, 2: 2})
    build_db(b, {0: 2, 1: 4})
    env = {k: v for k, v in s3.items() if k.startswith("AWS_")}
    folder = tmp_path / "shared-archive"
    for db in (a, b):
        for to in (f"s3://{BUCKET}/fleet", str(folder)):
            r = llmtap("archive", "--db", str(db), "--to", to, env=env)
            assert r.returncode == 0, r.stderr
            assert "testing-secret" not in r.stderr + r.stdout
    both = sorted(local_rows(a, "calls") + local_rows(b, "calls"))
    assert s3_table(env, "fleet", "calls") == both == archived(folder, "calls")
    assert s3_table(env, "fleet", "attempts") == sorted(local_rows(a, "attempts") + local_rows(b, "attempts"))
    # The whole fleet in one query: count is the sum, and no call twice.
    con = duckdb.connect()
    assert rows(con, f"SELECT count(*), count(DISTINCT id) FROM read_parquet('{folder}/calls/**/*.parquet', "
                     "hive_partitioning = true)") == [(11, 11)]
    # Each file's name starts with the instance id its DB keeps: two DBs, two prefixes, no name shared.
    names = [p.name for p in files(folder / "calls")]
    assert len({n.split("-")[0] for n in names}) == 2 and len(names) == len(set(names))
    for db in (a, b):
        r = llmtap("archive", "--db", str(db), "--to", f"s3://{BUCKET}/fleet", env=env)
        assert r.returncode == 0 and "archived 0 calls" in r.stderr, r.stderr
    assert len(s3_table(env, "fleet", "calls")) == 11


def test_delete_removes_only_archived_old_calls_and_the_file_shrinks(tmp_path: Path) -> None:
    db, root = tmp_path / "calls.duckdb", tmp_path / "archive"
    open_calls = build_db(db, {10: 1500, 9: 1500, 0: 5}, in_progress=1, pad=1500)
    with duckdb.connect(str(db)) as con:  # the recorder builds the search index when idle; here, all of it
        SearchIndex(con).build_all()
        recent = {r[0] for r in rows(con, "SELECT id FROM calls WHERE started_at > now() - INTERVAL 1 DAY")}
    size = db.stat().st_size
    r = llmtap("archive", "--db", str(db), "--to", str(root), "--older-than", "2d", "--delete")
    assert r.returncode == 0, r.stderr
    assert "archived 3000 calls" in r.stderr and "removed 3000 archived calls" in r.stderr
    after = db.stat().st_size
    assert after < size / 2, (size, after)  # what is left is mostly the empty tables and the index
    left = {r[0] for r in local_rows(db, "calls")}
    assert left == recent  # the 5 recent calls and the one in progress
    assert open_calls[0].id in left
    assert len(archived(root, "calls")) == 3000
    with duckdb.connect(str(db), read_only=True) as con:
        assert rows(con, "SELECT count(*) FROM attempts WHERE call_id NOT IN (SELECT id FROM calls)") == [(0,)]
        # The search index: no chunk is left over deleted calls only, none of its words stays
        # behind, and each chunk counts the calls it still has.
        assert rows(con, "SELECT count(*) FROM _search_chunks c WHERE calls <> (SELECT count(*) FROM calls "
                         "WHERE id > c.after_id AND id <= c.last_id) OR calls = 0") == [(0,)]
        assert rows(con, "SELECT count(*) FROM _search_terms WHERE chunk NOT IN (SELECT chunk FROM _search_chunks)") \
            == [(0,)]
        assert rows(con, "SELECT count(*) FROM _migrations") == [(len(schema.MIGRATIONS),)]  # the same DB
    reader = open_reader(db)
    assert reader.query("SELECT count(*) FROM calls WHERE content ILIKE '%holes%'")[1] == [(len(recent) - 1,)]
    reader.close()


def test_an_s3_failure_midway_deletes_nothing_and_the_next_run_writes_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    db = tmp_path / "calls.duckdb"
    build_db(db, {3: 25})
    monkeypatch.setattr(archive_mod, "ROWS_PER_FILE", 10)  # three files: the server dies after the first
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    stopped = False
    try:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        target = archive_mod.open_target(f"s3://{BUCKET}/x", env)

        def progress(stage: str, done: int, total: int) -> None:
            nonlocal stopped
            if done == 10 and not stopped:
                server.stop()
                stopped = True

        con = duckdb.connect(str(db))
        try:
            with pytest.raises(archive_mod.ArchiveError, match=r"--to s3://.*nothing was deleted"):
                archive_mod.archive(con.cursor, target, delete=True, progress=progress)
            assert rows(con, "SELECT count(*) FROM calls") == [(25,)]
            assert rows(con, "SELECT count(*) FROM attempts") == [(50,)]
        finally:
            con.close()
    finally:
        if not stopped:
            server.stop()


def test_a_bad_target_is_refused_naming_the_flag_and_nothing_is_deleted(tmp_path: Path, s3: dict[str, str]) -> None:
    db = tmp_path / "calls.duckdb"
    build_db(db, {5: 3})
    env = {k: v for k, v in s3.items() if k.startswith("AWS_")}
    missing = llmtap("archive", "--db", str(db), "--to", "s3://no-such-bucket-here/x", "--delete", env=env)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    unreachable = llmtap("archive", "--db", str(db), "--to", f"s3://{BUCKET}/x", "--delete",
                         env={**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{dead}"})
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unwritable = llmtap("archive", "--db", str(db), "--to", str(blocker / "archive"), "--delete")
    for r, said in ((missing, "does not exist"), (unreachable, "cannot reach S3"), (unwritable, "cannot write there")):
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("llmtap archive: --to ") and said in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "testing-secret" not in r.stderr
    assert len(local_rows(db, "calls")) == 3


def start_run(tmp_path: Path, fake: FakeProvider, db: Path, *args: str) -> tuple[subprocess.Popen, Lines, str]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"providers:\n  local: {{base_url: '{fake.url}/v1', api: openai}}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtap", "run", "-q", "--db", str(db), "--rules", str(rules),
         "--confdir", str(tmp_path / "ca"), "--proxy", "off", "--gateway", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = Lines(proc.stderr)
    gateway = re.search(r"(http://\S+)/<provider>", err.wait_for("gateway")).group(1)
    return proc, err, gateway


def send(gateway: str, n: int) -> None:
    with httpx.Client(timeout=30) as client:
        for _ in range(n):
            r = client.post(f"{gateway}/local/chat/completions",
                            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200


def committed(db: Path) -> int:
    reader = open_reader(db)
    try:
        return int(reader.query(f"SELECT count(*) FROM calls WHERE {FINISHED}")[1][0][0])
    finally:
        reader.close()


def wait_until(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_archive_runs_inside_a_recording_llmtap_run_and_delete_keeps_the_new_calls(
        tmp_path: Path, fake: FakeProvider) -> None:
    db, root = tmp_path / "calls.duckdb", tmp_path / "archive"
    proc, err, gateway = start_run(tmp_path, fake, db)
    try:
        send(gateway, 4)
        wait_until(lambda: committed(db) == 4, "4 calls committed")
        r = llmtap("archive", "--db", str(db), "--to", str(root), "--delete")
        assert r.returncode == 0, r.stderr
        assert "archived 4 calls" in r.stderr and "inside the running llmtap" in r.stderr
        assert "removed 4 archived calls" in r.stderr and "shrinks when" in r.stderr
        assert committed(db) == 0
        send(gateway, 3)  # recording goes on
        wait_until(lambda: committed(db) == 3, "3 more calls committed")
        r = llmtap("archive", "--db", str(db), "--to", str(root))
        assert r.returncode == 0 and "archived 3 calls" in r.stderr, r.stderr
        assert committed(db) == 3  # without --delete they stay
    finally:
        stop(proc)
    assert proc.returncode == 0, "".join(err.lines)
    ids = [r[0] for r in archived(root, "calls")]
    assert len(ids) == len(set(ids)) == 7
    assert len(archived(root, "attempts")) == 7
    assert archived(root, "calls")[-3:] == local_rows(db, "calls")


def test_run_archives_on_a_schedule_and_keep_removes_only_archived_calls(tmp_path: Path, fake: FakeProvider) -> None:
    db, root = tmp_path / "calls.duckdb", tmp_path / "archive"
    proc, err, gateway = start_run(tmp_path, fake, db, "--archive-to", str(root), "--archive-every", "0.2s",
                                   "--keep", "0s")
    try:
        send(gateway, 3)
        # Archived by the schedule, then removed from the DB: --keep 0s keeps nothing archived.
        wait_until(lambda: len(files(root / "calls")) > 0 and len({r[0] for r in archived(root, "calls")}) == 3,
                   "3 calls archived")
        wait_until(lambda: committed(db) == 0, "the archived calls removed")
    finally:
        stop(proc)
    assert proc.returncode == 0, "".join(err.lines)
    assert len(archived(root, "calls")) == 3 and len(archived(root, "attempts")) == 3


def test_run_refuses_keep_without_an_archive(tmp_path: Path) -> None:
    r = llmtap("run", "--db", str(tmp_path / "x.duckdb"), "--keep", "30d", "--confdir", str(tmp_path / "ca"))
    assert r.returncode == 2 and "--keep needs --archive-to" in r.stderr, r.stderr


def test_sessions_are_archived_by_day_once_their_day_is_over(tmp_path: Path) -> None:
    db, root = tmp_path / "calls.duckdb", tmp_path / "archive"
    build_db(db, {1: 1})
    with duckdb.connect(str(db)) as con:  # sessions of two days ago, and one of today
        con.execute("DELETE FROM sessions")
        con.execute("INSERT INTO sessions (id, source, started_at, ended_at, calls, errors, failed, fallbacks) VALUES "
                    "('s-old', 'new', now() - INTERVAL 2 DAY, now() - INTERVAL 2 DAY, 3, 0, false, 0), "
                    "('s-old2', 'new', now() - INTERVAL 2 DAY, now() - INTERVAL 2 DAY, 1, 0, false, 0), "
                    "('s-late', 'new', now() - INTERVAL 2 DAY, now(), 4, 0, false, 0), "
                    "('s-today', 'new', now(), now(), 1, 0, false, 0)")
    r = llmtap("archive", "--db", str(db), "--to", str(root))
    assert r.returncode == 0 and "2 sessions" in r.stderr, r.stderr
    archived_sessions = f"SELECT id, calls FROM read_parquet('{root}/sessions/**/*.parquet', hive_partitioning = true) ORDER BY id"
    # Today's may still grow, and so may one that started two days ago and went on until now: not yet.
    assert rows(duckdb.connect(), archived_sessions) == [("s-old", 3), ("s-old2", 1)]
    again = llmtap("archive", "--db", str(db), "--to", str(root))
    assert again.returncode == 0 and "archived 0 calls (0 attempts) to" in again.stderr, again.stderr
    assert len(files(root / "sessions")) == 1
    # A session archived, then resumed (a named one, days later): its day is written again, as it
    # is now, in one file; and the one that went on past midnight once its last day is over.
    with duckdb.connect(str(db)) as con:
        con.execute("UPDATE sessions SET calls = 5, last_call_id = 'c-later', ended_at = now() - INTERVAL 1 DAY "
                    "WHERE id = 's-old'")
        con.execute("UPDATE sessions SET ended_at = now() - INTERVAL 1 DAY WHERE id = 's-late'")
    third = llmtap("archive", "--db", str(db), "--to", str(root))
    assert third.returncode == 0 and "3 sessions" in third.stderr, third.stderr
    assert rows(duckdb.connect(), archived_sessions) == [("s-late", 4), ("s-old", 5), ("s-old2", 1)]
    assert len(files(root / "sessions")) == 1
    last = llmtap("archive", "--db", str(db), "--to", str(root))
    assert last.returncode == 0 and " in 0 files" in last.stderr, last.stderr  # nothing changed since: nothing written


def test_a_copy_of_the_db_rewriting_a_day_keeps_the_sessions_only_the_original_holds(tmp_path: Path) -> None:
    # A copy made after the first archive shares the archive's instance name: when it rewrites a
    # day (a session it holds changed), the sessions only the original archived since must stay.
    db, copy, root = tmp_path / "calls.duckdb", tmp_path / "copy.duckdb", tmp_path / "archive"
    build_db(db, {3: 1})
    add = ("INSERT INTO sessions (id, source, started_at, ended_at, calls, errors, failed, fallbacks) VALUES "
           "(?, 'new', now() - INTERVAL 2 DAY, now() - INTERVAL 2 DAY, 1, 0, false, 0)")
    with duckdb.connect(str(db)) as con:
        con.execute("DELETE FROM sessions")
        con.execute(add, ["s-both"])
    assert llmtap("archive", "--db", str(db), "--to", str(root)).returncode == 0
    shutil.copy(db, copy)
    with duckdb.connect(str(db)) as con:
        con.execute(add, ["s-original"])
    assert llmtap("archive", "--db", str(db), "--to", str(root)).returncode == 0
    with duckdb.connect(str(copy)) as con:
        con.execute("UPDATE sessions SET calls = 2, last_call_id = 'c-later' WHERE id = 's-both'")
    r = llmtap("archive", "--db", str(copy), "--to", str(root))
    assert r.returncode == 0, r.stderr
    archived_sessions = f"SELECT id, calls FROM read_parquet('{root}/sessions/**/*.parquet') ORDER BY id"
    assert rows(duckdb.connect(), archived_sessions) == [("s-both", 2), ("s-original", 1)]
    assert len(files(root / "sessions")) == 1


def test_run_with_an_unreachable_archive_says_so_and_goes_on_recording(
        tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "calls.duckdb"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")  # the run inherits it
    proc, err, gateway = start_run(tmp_path, fake, db, "--archive-to", f"s3://{BUCKET}/x",
                                   "--archive-every", "0.2s", "--keep", "0s")
    try:
        send(gateway, 2)
        line = err.wait_for("--archive-to s3://")
        assert "cannot reach S3" in line and "recording goes on" in line
        wait_until(lambda: committed(db) == 2, "the calls recorded all the same")
    finally:
        stop(proc)
    assert proc.returncode == 0
    assert sum("cannot reach S3" in l for l in err.lines) == 1  # said once, not every 0.2 s
    assert len(local_rows(db, "calls")) == 2  # nothing archived, so --keep removed nothing


def test_keep_removes_only_archived_calls_older_than_it(tmp_path: Path) -> None:
    db = tmp_path / "calls.duckdb"
    build_db(db, {5: 3, 0: 2})
    target = archive_mod.open_target(str(tmp_path / "archive"))
    keep = archive_mod.parse_age("2d", "--keep")
    con = duckdb.connect(str(db))
    try:
        result = archive_mod.archive(con.cursor, target, keep=keep)  # what one scheduled run does
        assert (result.calls, result.deleted) == (5, 3)
        left = rows(con, "SELECT count(*) FROM calls WHERE started_at > now() - INTERVAL 1 DAY")
        assert rows(con, "SELECT count(*) FROM calls") == left == [(2,)]
        assert rows(con, "SELECT count(*) FROM attempts") == [(4,)]
    finally:
        con.close()
    assert len(archived(tmp_path / "archive", "calls")) == 5
