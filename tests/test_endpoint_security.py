"""The read endpoint and every reader serve SQL over llmtap's tables and nothing else.

Tried the way someone holding the token (or a page that stole it) would: file-reading table
functions, replacement scans of file names, COPY / ATTACH / INSTALL / SET, statements smuggled
into an export's filter or path. None may read a file, write one, or change a row.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import duckdb
import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llmtap.recorder.endpoint import discovery_path
from llmtap.recorder.export import ExportError
from llmtap.recorder.reader import LocalReader, Reader, ReaderError, RemoteReader, open_reader
from llmtap.recorder.record import Call
from llmtap.recorder.recorder import Recorder
from test_recorder import finish, make_call  # noqa: E402

SECRET = "PLANTED-SECRET-6f1d2c"
CALLS = 3


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A file of the user's that no reader may see, in every format DuckDB would read."""
    folder = tmp_path / "private"
    folder.mkdir()
    (folder / "secret.csv").write_text(f"name,value\nkey,{SECRET}\n")
    with duckdb.connect() as con:
        con.execute(f"COPY (SELECT '{SECRET}' AS value) TO '{folder / 'secret.parquet'}' (FORMAT parquet)")
    return folder


@pytest.fixture
def recording(tmp_path: Path) -> Iterator[tuple[Recorder, Path]]:
    db = tmp_path / "rec" / "calls.duckdb"
    rec = Recorder(db)
    rec.start()
    for _ in range(CALLS):
        rec.call_finished(Call.finished(*finish(make_call())))
    reader = open_reader(db)
    try:
        for _ in range(200):
            if reader.query("SELECT count(*) FROM calls WHERE status IS NOT NULL")[1][0][0] == CALLS:
                break
            reader.events_after(reader.latest_seq(), 0.05)
        else:
            raise AssertionError("the calls were not committed")
    finally:
        reader.close()
    try:
        yield rec, db
    finally:
        rec.close()


def attacks(planted: Path, out: Path) -> list[str]:
    csv, parquet = planted / "secret.csv", planted / "secret.parquet"
    return [
        f"SELECT * FROM read_text('{csv}')",
        f"SELECT * FROM read_blob('{csv}')",
        f"SELECT * FROM read_csv_auto('{csv}')",
        f"SELECT * FROM read_csv('{csv}')",
        f"SELECT * FROM read_parquet('{parquet}')",
        f"SELECT * FROM parquet_metadata('{parquet}')",
        f"SELECT * FROM sniff_csv('{csv}')",
        f"SELECT * FROM glob('{planted}/*')",
        f"SELECT * FROM '{csv}'",  # DuckDB's replacement scan reads a file named in FROM
        f"FROM '{parquet}'",
        f"WITH x AS (SELECT * FROM read_text('{csv}')) SELECT * FROM x",
        f"SELECT (SELECT content FROM read_text('{csv}')) AS c",
        f"SELECT id FROM calls UNION ALL SELECT content FROM read_text('{csv}')",
        f"SELECT * FROM query('SELECT * FROM read_text(''{csv}'')')",
        f"SELECT * FROM query_table('{csv}')",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM 'https://example.invalid/x.csv'",  # would autoload httpfs
        f"COPY calls TO '{out}'",
        f"COPY (SELECT * FROM calls) TO '{out}' (FORMAT csv)",
        f"EXPORT DATABASE '{out}'",
        f"ATTACH '{out}' AS other",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "PRAGMA enable_profiling",
        "CALL checkpoint()",
        "SELECT 1; DELETE FROM calls",
        "SELECT 1; DROP TABLE calls",
        "WITH x AS (SELECT 1) DELETE FROM calls",
        "DELETE FROM calls",
        "UPDATE calls SET content = 'x'",
        "SELECT getenv('HOME')",
        "SELECT * FROM calls WHERE id IN (SELECT id FROM calls) ; TRUNCATE calls",
        # SQL handed over as a string, unseen by the check, and functions that change the
        # recorder's database state
        "SELECT * FROM query('SELECT 1')",
        "SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT 1'))",
        "SELECT * FROM enable_logging()",
        "SELECT * FROM enable_profiling()",
        "SELECT * FROM checkpoint()",
        "SELECT * FROM force_checkpoint()",
        f"DESCRIBE SELECT * FROM read_text('{csv}')",
        f"SUMMARIZE SELECT * FROM read_text('{csv}')",
    ]


def assert_refused(reader: Reader, sql: str) -> None:
    try:
        columns, rows = reader.query(sql)
    except ReaderError as exc:
        assert SECRET not in str(exc)
        return
    raise AssertionError(f"served {sql!r}: {columns} {rows}")


def assert_untouched(db_reader: Reader, out: Path) -> None:
    assert db_reader.query("SELECT count(*) FROM calls")[1] == [(CALLS,)]
    assert not out.exists(), f"{out} was written"


def test_the_endpoint_serves_no_file_and_no_write(recording: tuple[Recorder, Path], planted: Path,
                                                   tmp_path: Path) -> None:
    _rec, db = recording
    out = tmp_path / "leak.csv"
    reader = open_reader(db)
    assert isinstance(reader, RemoteReader)
    try:
        for sql in attacks(planted, out):
            assert_refused(reader, sql)
            assert_untouched(reader, out)
        # What the UI and `llmtap stats` send keeps working.
        assert reader.query("SELECT count(*) AS n FROM calls WHERE model_requested GLOB ?", ["sm*"]) == (["n"], [(CALLS,)])
        assert "status" in [r[0] for r in reader.query("DESCRIBE calls")[1]]
        assert reader.query("SELECT count(*) FROM range(3) JOIN unnest([1, 2]) u(x) ON true")[1] == [(6,)]
        assert reader.query("SELECT current_setting('enable_external_access')")[1] == [(False,)]
    finally:
        reader.close()


def test_a_file_at_rest_serves_no_file_either(recording: tuple[Recorder, Path], planted: Path, tmp_path: Path) -> None:
    rec, db = recording
    rec.close()
    out = tmp_path / "leak.csv"
    reader = open_reader(db)
    assert isinstance(reader, LocalReader)
    try:
        for sql in attacks(planted, out):
            assert_refused(reader, sql)
            assert_untouched(reader, out)
    finally:
        reader.close()


def test_raw_http_with_the_token_cannot_escape_either(recording: tuple[Recorder, Path], planted: Path,
                                                      tmp_path: Path) -> None:
    _rec, db = recording
    info = json.loads(discovery_path(db).read_text())
    out = tmp_path / "leak.csv"
    with httpx.Client(base_url=info["url"], headers={"authorization": f"Bearer {info['token']}"},
                      trust_env=False) as client:
        for sql in attacks(planted, out):
            r = client.post("/query", json={"sql": sql})
            assert r.status_code == 400 and SECRET not in r.text, (sql, r.text)
        # Bound parameters are values, never SQL.
        r = client.post("/query", json={"sql": "SELECT count(*) FROM calls WHERE id = ?",
                                        "params": ["x' OR 1=1; DELETE FROM calls; --"]})
        assert r.status_code == 200 and r.json()["rows"] == [[0]]
        r = client.post("/query", json={"sql": "SELECT count(*) FROM calls"})
        assert r.json()["rows"] == [[CALLS]]
    assert not out.exists()


def crafted_exports(planted: Path, leak: Path) -> list[dict]:
    csv = planted / "secret.csv"
    return [
        {"where_sql": f"TRUE); DELETE FROM calls; COPY calls TO '{leak}'; --"},
        {"where_sql": f"TRUE) ; COPY calls TO '{leak}' (FORMAT csv) ; SELECT * FROM calls WHERE (TRUE"},
        {"where_sql": "TRUE) UNION ALL SELECT * FROM calls WHERE (TRUE"},
        {"where_sql": f"TRUE) UNION ALL SELECT * REPLACE (content AS id) FROM read_text('{csv}') WHERE (TRUE"},
        {"where_sql": f"id IN (SELECT content FROM read_text('{csv}'))"},
        {"where_sql": f"id IN (SELECT * FROM '{csv}')"},
        {"where_sql": "TRUE) ORDER BY id LIMIT 1 --"},
        {"where_sql": "TRUE; DELETE FROM calls"},
        {"since": "2026-01-01'; DELETE FROM calls; --"},
        {"until": "x' ; DELETE FROM calls; --"},
        {"format": "parquet) ; DELETE FROM calls; --"},
    ]


def test_crafted_export_values_never_become_sql(recording: tuple[Recorder, Path], planted: Path,
                                                tmp_path: Path) -> None:
    _rec, db = recording
    leak = tmp_path / "leak.csv"
    out = tmp_path / "out.parquet"
    reader = open_reader(db)
    assert isinstance(reader, RemoteReader)
    try:
        for kw in crafted_exports(planted, leak):
            fmt = kw.pop("format", "parquet")
            with pytest.raises(ExportError) as err:
                reader.export(out, fmt, **kw)
            assert SECRET not in str(err.value)
            assert_untouched(reader, out)
            assert not leak.exists()
        # A glob value that looks like SQL is matched as a glob: nothing matches, nothing runs.
        assert reader.export(out, "parquet", model="x' ; DELETE FROM calls; --") == 0
        assert duckdb.sql(f"SELECT count(*) FROM '{out}'").fetchall() == [(0,)]
        # An honest filter (what the UI's `e` sends) still exports.
        assert reader.export(out, "parquet", where_sql="(status = ?) AND (model_requested GLOB ?) --",
                             params=[200, "sm*"]) == CALLS
        assert reader.query("SELECT count(*) FROM calls")[1] == [(CALLS,)]
        # A path is written exactly where it says, quotes and all, and nowhere else.
        odd = tmp_path / "o'ut.parquet' (FORMAT csv); DELETE FROM calls; --"
        assert reader.export(odd, "parquet") == CALLS
        assert duckdb.sql("SELECT count(*) FROM read_parquet(?)", params=[str(odd)]).fetchall() == [(CALLS,)]
        assert reader.query("SELECT count(*) FROM calls")[1] == [(CALLS,)]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["rec", "private", out.name, odd.name])
    finally:
        reader.close()


def test_crafted_export_over_raw_http_is_refused(recording: tuple[Recorder, Path], planted: Path,
                                                 tmp_path: Path) -> None:
    _rec, db = recording
    info = json.loads(discovery_path(db).read_text())
    leak = tmp_path / "leak.csv"
    out = tmp_path / "out.parquet"
    with httpx.Client(base_url=info["url"], headers={"authorization": f"Bearer {info['token']}"},
                      trust_env=False) as client:
        for kw in crafted_exports(planted, leak):
            r = client.post("/export", json={"out": str(out), "format": "parquet", **kw})
            result = json.loads(r.text.strip().splitlines()[-1])
            assert result["ok"] is False and SECRET not in r.text, (kw, r.text)
            assert not out.exists() and not leak.exists()
        # Only where the caller's own CLI said, in full: a relative path would land wherever the
        # recording process happens to run.
        r = client.post("/export", json={"out": "out.parquet", "format": "parquet"})
        assert json.loads(r.text.strip().splitlines()[-1])["ok"] is False
        r = client.post("/query", json={"sql": "SELECT count(*) FROM calls"})
        assert r.json()["rows"] == [[CALLS]]


def test_the_uis_own_filters_still_export_through_the_endpoint(recording: tuple[Recorder, Path],
                                                                tmp_path: Path) -> None:
    from llmtap.tui import query as q

    _rec, db = recording
    reader = open_reader(db)
    assert isinstance(reader, RemoteReader)
    try:
        schema = q.load_schema(reader)
        for text, want in [("model:sma* provider:anthropic status:2xx fallbacks since:2h", CALLS),
                           ("errors", 0), ("holes", CALLS), ("-holes", 0), ("folds model:smart", CALLS)]:
            flt = q.narrow_by_index(reader, schema, q.parse_filter(text, schema))
            out = tmp_path / "ui.parquet"
            assert reader.export(out, "parquet", where_sql=flt.where_sql, params=list(flt.params)) == want, text
            assert duckdb.sql("SELECT count(*) FROM read_parquet(?)", params=[str(out)]).fetchall() == [(want,)]
    finally:
        reader.close()


def test_the_streamed_sql_endpoint_refuses_the_same_and_a_table_name_is_never_sql(
        recording: tuple[Recorder, Path], planted: Path, tmp_path: Path) -> None:
    """/sql (what `llmtap sql` reads through) and export's --table, tried with the token."""
    _rec, db = recording
    info = json.loads(discovery_path(db).read_text())
    out = tmp_path / "leak.csv"
    with httpx.Client(base_url=info["url"], headers={"authorization": f"Bearer {info['token']}"},
                      trust_env=False, timeout=60) as client:
        for sql in attacks(planted, out):
            r = client.post("/sql", json={"sql": sql})
            assert r.status_code == 400 and SECRET not in r.text, (sql, r.text)
        for limit in (-1, "1; DELETE FROM calls", 1.5):
            assert client.post("/sql", json={"sql": "SELECT 1", "limit": limit}).status_code == 400
        r = client.post("/sql", json={"sql": "SELECT count(*) FROM calls WHERE id <> ?", "params": ["x'; --"]})
        assert r.status_code == 200
        assert [json.loads(line) for line in r.text.splitlines()][1:] == [{"rows": [[CALLS]]},
                                                                         {"end": True, "rows": 1, "truncated": False}]
        for table in ["calls; DELETE FROM calls", f"read_text('{planted / 'secret.csv'}')", "calls\" --",
                      f"'{planted / 'secret.csv'}'"]:
            target = tmp_path / "t.csv"
            lines = client.post("/export", json={"out": str(target), "format": "csv", "table": table}).text
            assert '"ok": false' in lines and "no such table" in lines and SECRET not in lines, lines
            assert not target.exists()
    assert not out.exists()
    reader = open_reader(db)
    try:
        assert reader.query("SELECT count(*) FROM calls")[1] == [(CALLS,)]
    finally:
        reader.close()
