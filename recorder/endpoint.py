"""Reads for other processes while `llmtap run` holds the DuckDB file.

DuckDB lets one process open a file that is being written, and refuses even read-only
readers from elsewhere. So the recording process serves reads itself: an HTTP server on
127.0.0.1 with a token in a discovery file only the user can read (`<db>.endpoint.json`).
Each request runs on its own cursor, so a slow reader never holds up the writer.
"""

from __future__ import annotations

import functools
import hmac
import json
import os
import secrets
import select
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import duckdb

from llmtap.recorder import schema
from llmtap.recorder.values import jsonable

if TYPE_CHECKING:
    from llmtap.recorder.recorder import Recorder

MAX_ROWS = 100_000
_parser: duckdb.DuckDBPyConnection | None = None
_parser_lock = threading.Lock()


def discovery_path(db: Path) -> Path:
    return db.with_name(db.name + ".endpoint.json")


# Every DuckDB connection that runs a reader's SQL (the recorder's own, whose cursors serve the
# endpoint, and a file opened read-only) is opened with these. DuckDB itself then refuses
# read_text/read_csv/glob/COPY/ATTACH on any file and `FROM '/etc/passwd'` (a replacement scan),
# and loads or installs no extension: readers see llmtap's tables and nothing else. The
# setting is for the whole database and cannot be turned back on, which is why the recorder
# never needs file access through DuckDB: exports are written by a connection of their own.
READ_CONFIG: dict[str, Any] = {
    "enable_external_access": False,
    "autoload_known_extensions": False,
    "autoinstall_known_extensions": False,
    # A table name would otherwise be looked up among the Python variables of the caller.
    "python_enable_replacements": False,
    # Arrow hand-off to an export's writer keeps JSON columns JSON.
    "arrow_lossless_conversion": True,
}


def _parse(sql: str) -> list[Any] | str:
    global _parser
    with _parser_lock:
        if _parser is None:
            _parser = duckdb.connect(config=READ_CONFIG)  # in memory, used only to parse
        try:
            return _parser.extract_statements(sql)
        except duckdb.Error as exc:
            return str(exc)


# Table functions a reader may call: they compute, or describe llmtap's own database. Every
# other one reads files (read_csv, glob, ...; DuckDB refuses those anyway), runs SQL handed to
# it as a string and so unchecked (query, query_table, json_execute_serialized_sql), or
# changes the state of the recorder's database (enable_logging, enable_profiling, checkpoint,
# external resources).
READ_TABLE_FUNCTIONS = frozenset({
    "range", "generate_series", "unnest", "repeat", "repeat_row", "json_each", "json_tree",
    "duckdb_tables", "duckdb_columns", "duckdb_views", "duckdb_schemas", "duckdb_databases",
    "duckdb_types", "duckdb_constraints", "duckdb_indexes", "duckdb_keywords", "duckdb_functions",
    "duckdb_settings", "pragma_table_info", "pragma_show", "pragma_version", "pragma_database_size",
})


def check_read_only(sql: str) -> str | None:
    """Why `sql` is refused, or None. One read statement only: the file is the user's record.

    DuckDB's own parser decides, because a prefix check is fooled by `WITH x AS (...) DELETE`.
    What the statement may read is enforced by DuckDB too (READ_CONFIG, read_only_query).
    """
    return _why_refused(sql)


@functools.lru_cache(maxsize=1024)  # the UI sends the same few statements with new parameters
def _why_refused(sql: str) -> str | None:
    statements = _parse(sql)
    if isinstance(statements, str):
        return statements
    if len(statements) != 1:
        return "one statement only" if statements else "no statement given"
    if statements[0].type != duckdb.StatementType.SELECT:
        return "only SELECT / WITH / FROM / DESCRIBE / SHOW / SUMMARIZE queries are served"
    tree = _serialized(sql)
    if tree.get("error"):
        return (f"this query cannot be checked ({tree.get('error_message', 'DuckDB cannot serialize it')}); "
                "write it as a plain SELECT")
    called = sorted(set(_table_functions(tree)) - READ_TABLE_FUNCTIONS)
    if called:
        return (f"table function {', '.join(called)} is not served: readers query llmtap's tables "
                "(calls, attempts, ... : SHOW TABLES lists them) and DuckDB's own catalog, no files")
    return None


def _serialized(sql: str) -> dict:
    with _parser_lock:
        assert _parser is not None
        try:
            return json.loads(_parser.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
        except RuntimeError as exc:
            # A Ctrl-C that lands while DuckDB executes on the main thread is taken by DuckDB's
            # bindings: the query stops with this error and the KeyboardInterrupt is gone. The
            # `llmtap sql` prompt checks every query here first; without this, a Ctrl-C at that
            # moment ended the prompt with a traceback instead of dropping the query.
            if is_interrupted(exc):
                raise KeyboardInterrupt from None
            raise


def is_interrupted(exc: BaseException) -> bool:
    """`exc` is what DuckDB's Python bindings raise for a Ctrl-C during a query on the main thread."""
    return type(exc) is RuntimeError and str(exc) == "Query interrupted"


def _table_functions(node: Any) -> Iterator[str]:
    """The names of the table functions anywhere in a serialized statement (CTEs, subqueries,
    joins, set operations, DESCRIBE / SUMMARIZE of a query)."""
    if isinstance(node, dict):
        if node.get("type") == "TABLE_FUNCTION":
            yield str((node.get("function") or {}).get("function_name", "")).lower()
        for value in node.values():
            yield from _table_functions(value)
    elif isinstance(node, list):
        for value in node:
            yield from _table_functions(value)


def check_condition(where_sql: str) -> str | None:
    """Why `where_sql` is refused as an export's filter, or None.

    It must be a boolean expression over `calls` and nothing more: spliced after WHERE, a
    value like `TRUE); DELETE FROM calls; --` or `TRUE) UNION SELECT ... --` would otherwise
    become statements or queries of its own. DuckDB's parser checks that the query built
    around it is still `SELECT * FROM calls WHERE (...)`, with nothing added.
    """
    probe = f"SELECT * FROM calls WHERE ({where_sql}\n)"
    why = check_read_only(probe)
    if why:
        return f"the export's filter is not one SQL condition ({why})"
    tree = _serialized(probe)
    node = (tree.get("statements") or [{}])[0].get("node") or {}
    table = node.get("from_table") or {}
    if (tree.get("error") or node.get("type") != "SELECT_NODE" or node.get("modifiers")
            or (node.get("cte_map") or {}).get("map") or table.get("type") != "BASE_TABLE"
            or table.get("table_name") != "calls" or node.get("group_expressions") or node.get("having")
            or node.get("qualify") or [x.get("class") for x in node.get("select_list", [])] != ["STAR"]):
        return "the export's filter is not one SQL condition over calls"
    return None


def read_only_query(cur: duckdb.DuckDBPyConnection, sql: str, params: list | None,
                    max_rows: int | None = None) -> tuple[list[str], list[str], list[tuple]]:
    """Run a reader's one SELECT on `cur` inside a read-only transaction (DuckDB refuses any
    write in it) and return column names, column types and rows (at most `max_rows`)."""
    why = check_read_only(sql)
    if why:
        raise ValueError(why)
    cur.execute("BEGIN TRANSACTION READ ONLY")
    try:
        res = cur.execute(sql, params or [])
        columns = [d[0] for d in res.description or []]
        types = [str(d[1]) for d in res.description or []]
        rows = res.fetchall() if max_rows is None else res.fetchmany(max_rows)
    finally:
        try:
            cur.execute("ROLLBACK")
        except duckdb.Error:
            pass  # the query's own error ended the transaction; that error is the one to report
    return columns, types, rows


# A streamed result goes out in batches of about this many bytes: a batch grows from one row
# while rows are small, so a result of millions of rows (or of 8 MiB bodies) is never held
# whole by the recorder process, nor by the client.
BATCH_BYTES = 1 << 20
MAX_BATCH_ROWS = 4096


def _row_bytes(row: tuple) -> int:
    return sum(len(v) if isinstance(v, (str, bytes)) else 16 for v in row) + 16


class RowStream:
    """One reader's SELECT, run on `cur` in a read-only transaction and read in batches.

    The query runs when this is made (its SQL errors raise here); iterating yields lists of
    rows of about BATCH_BYTES each, at most `limit` rows in all; `truncated` then says whether
    the result had more. `close()` ends the transaction (iterating to the end does too)."""

    def __init__(self, cur: duckdb.DuckDBPyConnection, sql: str, params: list | None = None,
                 limit: int | None = None) -> None:
        why = check_read_only(sql)
        if why:
            raise ValueError(why)
        self.cur = cur
        self.limit = limit
        self.count = 0
        self.truncated = False
        self._open = True
        cur.execute("BEGIN TRANSACTION READ ONLY")
        try:
            self._res = cur.execute(sql, params or [])
        except BaseException:
            self.close()
            raise
        self.columns = [d[0] for d in self._res.description or []]
        self.types = [str(d[1]) for d in self._res.description or []]

    def __iter__(self) -> Iterator[list[tuple]]:
        want = 1
        try:
            while self._open and (self.limit is None or self.count < self.limit):
                rows = self._res.fetchmany(want if self.limit is None else min(want, self.limit - self.count))
                if not rows:
                    return
                self.count += len(rows)
                yield rows
                per_row = max(1, sum(_row_bytes(r) for r in rows) // len(rows))
                want = max(1, min(MAX_BATCH_ROWS, want * 4, BATCH_BYTES // per_row))
            if self._open and self.limit is not None:
                self.truncated = bool(self._res.fetchmany(1))
        finally:
            self.close()

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        try:
            self.cur.execute("ROLLBACK")
        except duckdb.Error:
            pass  # the query's own error ended the transaction; that error is the one to report


class Endpoint:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.token = secrets.token_urlsafe(32)
        self.path = discovery_path(recorder.db_path)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # Cursors running a streamed query (/sql): interrupted on stop, so that a long query
        # never holds up the recorder's exit, whose connection it reads.
        self.running: set[duckdb.DuckDBPyConnection] = set()
        self.running_lock = threading.Condition()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        if isinstance(host, bytes):  # typeshed allows it (AF_UNIX); a TCP server's is a str
            host = host.decode()
        return f"http://{host}:{port}"

    def start(self) -> None:
        endpoint = self

        class Handler(_Handler):
            owner = endpoint

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="llmtap-endpoint", daemon=True)
        self._thread.start()
        info = {"url": self.url, "token": self.token, "pid": os.getpid(), "db": str(self.recorder.db_path),
                # The process the user started: `llmtap run`, whose recorder process this may be.
                "run_pid": self.recorder.run_pid}
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        os.replace(tmp, self.path)

    def stop(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
        with self.running_lock:
            for cur in self.running:
                try:
                    cur.interrupt()
                except duckdb.Error:
                    pass
            # Until their cursors are closed: the recorder's connection cannot close under them.
            self.running_lock.wait_for(lambda: not self.running, timeout=STOP_WAIT_S)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Handler(BaseHTTPRequestHandler):
    owner: Endpoint
    protocol_version = "HTTP/1.1"
    # A reply goes out as two writes (headers, then body). With Nagle's algorithm on, the body
    # waits for the ACK of the headers, which the client delays ~40 ms: every query and every
    # live update of an attached UI took 44 ms however small.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the proxy owns stderr
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionError:
            # The reader left mid-reply (a UI quit during a long poll): nothing to answer, and
            # socketserver would print a traceback onto the proxy's terminal.
            pass

    def _send(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        given = self.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.owner.token}".encode()):
            return True
        self._send(401, {"error": "missing or wrong token; read it from the endpoint file beside the DB"})
        return False

    def _json_body(self) -> dict:
        length = int(self.headers.get("content-length") or 0)
        data = json.loads(self.rfile.read(length) or b"{}")
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return data

    def do_GET(self) -> None:
        if not self._authorized():
            return
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        rec = self.owner.recorder
        try:
            if url.path == "/health":
                self._send(200, {"ok": True, "pid": os.getpid(), "db": str(rec.db_path),
                                 "schema_version": schema.SCHEMA_VERSION, "seq": rec.hub.seq,
                                 "sql_running": len(self.owner.running)})
            elif url.path == "/live":
                seq, events = rec.hub.events_after(int(q.get("after", 0)), min(float(q.get("timeout", 10)), 30.0))
                self._send(200, {"seq": seq, "events": events})
            elif url.path == "/partial":
                part = rec.hub.partial(q.get("id", ""))
                self._send(200 if part is not None else 404, part or {"error": "not in progress"})
            else:
                self._send(404, {"error": f"no such endpoint {url.path}"})
        except (ValueError, KeyError) as exc:
            self._send(400, {"error": str(exc)})

    def do_POST(self) -> None:
        if not self._authorized():
            return
        url = urlsplit(self.path)
        try:
            data = self._json_body()
        except ValueError as exc:
            self._send(400, {"error": f"bad JSON body: {exc}"})
            return
        if url.path == "/query":
            self._query(data)
        elif url.path == "/export":
            self._export(data)
        elif url.path == "/archive":
            self._archive(data)
        elif url.path == "/sql":
            self._sql(data)
        else:
            self._send(404, {"error": f"no such endpoint {url.path}"})

    def _query(self, data: dict) -> None:
        sql = str(data.get("sql", ""))
        why = check_read_only(sql)
        if why:
            self._send(400, {"error": why})
            return
        try:
            cur = self.owner.recorder.cursor()
            try:
                # Types travel with the rows so the client can turn ISO strings back into
                # datetimes: every reader returns the same Python values.
                columns, types, rows = read_only_query(cur, sql, data.get("params") or [], MAX_ROWS + 1)
            finally:
                cur.close()
        except Exception as exc:  # a user's SQL error, reported as such
            self._send(400, {"error": str(exc)})
            return
        self._send(200, {"columns": columns, "types": types, "rows": jsonable(rows[:MAX_ROWS]),
                         "truncated": len(rows) > MAX_ROWS})

    def _export(self, data: dict) -> None:
        """Streams NDJSON progress lines, then the result, so a remote export shows progress."""
        from llmtap.recorder.export import ExportError, export

        self.send_response(200)
        self.send_header("content-type", "application/x-ndjson")
        self.send_header("connection", "close")
        self.end_headers()
        self.close_connection = True

        def progress(done: int, total: int) -> None:
            self.wfile.write(json.dumps({"done": done, "total": total}).encode() + b"\n")
            self.wfile.flush()

        cur = self.owner.recorder.cursor()
        try:
            out = Path(str(data["out"]))
            if not out.is_absolute():
                # Relative to what? The CLI sends the path the user gave, made absolute there.
                raise ExportError(f"the export's target {str(out)!r} must be an absolute path")
            rows = export(cur, out, data.get("format", "parquet"), table=str(data.get("table") or "calls"),
                          since=data.get("since"),
                          until=data.get("until"), model=data.get("model"), where_sql=data.get("where_sql"),
                          params=data.get("params"), progress=progress)
            result: dict = {"ok": True, "rows": rows, "out": data["out"]}
        except (ExportError, KeyError, OSError) as exc:
            result = {"ok": False, "error": str(exc)}
        except Exception as exc:
            result = {"ok": False, "error": f"export failed: {exc}"}
        finally:
            cur.close()
        try:
            self.wfile.write(json.dumps(result).encode() + b"\n")
        except OSError:
            pass  # the client went away; the file (or its absence) tells the rest

    def _archive(self, data: dict) -> None:
        """`llmtap archive` while recording: runs here, where the file is open. NDJSON progress
        lines `{"stage", "done", "total"}`, then `{"ok", ...}`."""
        from llmtap.recorder.archive import ArchiveError, archive, open_target

        self.send_response(200)
        self.send_header("content-type", "application/x-ndjson")
        self.send_header("connection", "close")
        self.end_headers()
        self.close_connection = True

        def progress(stage: str, done: int, total: int) -> None:
            self.wfile.write(json.dumps({"stage": stage, "done": done, "total": total}).encode() + b"\n")
            self.wfile.flush()

        rec = self.owner.recorder
        try:
            # The AWS_* variables of the `llmtap archive` that asked: used for this run only.
            env = {k: str(v) for k, v in (data.get("env") or {}).items()}
            target = open_target(str(data["to"]), {**os.environ, **env} if env else None)
            result = archive(rec.cursor, target, older_than=data.get("older_than"), delete=bool(data.get("delete")),
                             keep=data.get("keep"), in_progress=rec.in_progress, progress=progress,
                             on_writer=rec.on_writer)
            reply: dict = {"ok": True, **result.as_dict()}
        except (ArchiveError, KeyError) as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:
            reply = {"ok": False, "error": f"archive failed: {exc}"}
        try:
            self.wfile.write(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass  # the client went away; the archive itself is complete or failed whole
    def _sql(self, data: dict) -> None:
        """`llmtap sql`: one SELECT, streamed as NDJSON lines -- {"columns", "types"}, then
        {"rows": [...]} per batch, then {"end": true, "rows": n, "truncated": bool}, or
        {"error": ...} if it fails on the way. A refused or failing query is a 400 before any
        line. The query runs on a cursor of its own (the writer goes on meanwhile) and is
        interrupted when the client goes away, so a Ctrl-C'd query stops costing CPU here."""
        limit = data.get("limit")
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            self._send(400, {"error": f"limit must be a whole number >= 0, not {limit!r}"})
            return
        sql = str(data.get("sql", ""))
        why = check_read_only(sql)
        if why:
            self._send(400, {"error": why})
            return
        try:
            cur = self.owner.recorder.cursor()
        except Exception as exc:
            self._send(400, {"error": str(exc)})
            return
        owner = self.owner
        with owner.running_lock:
            owner.running.add(cur)
        done = threading.Event()
        watcher = threading.Thread(target=_interrupt_when_gone, args=(self.connection, cur, done),
                                   name="llmtap-sql-watch", daemon=True)
        watcher.start()
        try:
            try:
                rows = RowStream(cur, sql, data.get("params") or [], limit)
            except Exception as exc:  # the SQL's own error (or an interrupt), reported as such
                self._send(400, {"error": str(exc)})
                return
            self.send_response(200)
            self.send_header("content-type", "application/x-ndjson")
            self.send_header("connection", "close")
            self.end_headers()
            self.close_connection = True
            # A client that stops reading (a paused pager) would hold the read transaction
            # open for ever: the socket's sends give up after this long.
            self.connection.settimeout(SEND_TIMEOUT_S)
            try:
                self._line({"columns": rows.columns, "types": rows.types})
                for batch in rows:
                    self._line({"rows": jsonable(batch)})
                self._line({"end": True, "rows": rows.count, "truncated": rows.truncated})
            except OSError:
                pass  # the client went away (or stalled): nothing left to tell it
            except Exception as exc:
                try:
                    self._line({"error": str(exc)})
                except OSError:
                    pass
            finally:
                rows.close()
        finally:
            done.set()
            try:
                cur.close()
            finally:
                with owner.running_lock:
                    owner.running.discard(cur)
                    owner.running_lock.notify_all()

    def _line(self, item: dict) -> None:
        self.wfile.write(json.dumps(item).encode() + b"\n")
        self.wfile.flush()


SEND_TIMEOUT_S = 120.0
STOP_WAIT_S = 10.0


def _interrupt_when_gone(conn: socket.socket, cur: duckdb.DuckDBPyConnection, done: threading.Event) -> None:
    """Interrupt `cur`'s query once the client has closed its end (it sends nothing more after
    its request, so a readable socket means it left)."""
    while not done.is_set():
        try:
            readable, _, _ = select.select([conn], [], [], 0.5)
            if readable and not conn.recv(1, socket.MSG_PEEK):
                if not done.is_set():
                    cur.interrupt()
                return
            if readable:
                return  # it sent more than its request: not ours to read
        except (OSError, ValueError, duckdb.Error):
            return
