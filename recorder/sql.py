"""`llmtap sql`: read-only SQL on the record, also while `llmtap run` holds the file.

DuckDB lets one process open a file that is being written, so while the proxy records the
query goes through its read endpoint (reader.RemoteReader); otherwise the file is opened
read-only here. Either way it is one SELECT, checked by the endpoint's rules, and its rows
arrive in batches that are written out as they come: a result of millions of rows is never
held whole by the recorder process or by this one.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

from llmtap import paths
from llmtap.recorder.values import jsonable

if TYPE_CHECKING:
    from llmtap.recorder.reader import Rows
    from llmtap.recorder.reader import StreamingReader as Reader

# What a refusal adds, so the user learns what is allowed rather than only what was not.
ALLOWED = ("allowed: one read-only query (SELECT, WITH, FROM, DESCRIBE, SHOW, SUMMARIZE) over llmtap's "
           "tables and DuckDB's catalog; no writes, files, ATTACH or COPY")
TABLE_LIMIT = 1000  # rows a terminal table shows unless --limit says otherwise
CELL_CHARS = 500  # a table cell beyond this is cut (…); --json / --csv carry whole values
HISTORY_LINES = 1000


class SqlError(Exception):
    """A query refused or failed: one line for the user (exit status 2)."""


def register(sub: argparse._SubParsersAction) -> None:
    from llmtap.helpformat import HelpFormatter, add_db_argument

    p = sub.add_parser(
        "sql",
        help="run read-only SQL on the record (also while `llmtap run` records)",
        description="Run one read-only SQL query on the DuckDB file and print the rows as a table, "
        "CSV, JSON or into a Parquet file. While `llmtap run` records, the query runs inside it "
        "(DuckDB lets no other process open the file then); otherwise the file is opened read-only. "
        "Queries are SELECT / WITH / FROM / DESCRIBE / SHOW / SUMMARIZE over llmtap's tables "
        "(calls, attempts, dropped, ...: SHOW TABLES) and DuckDB's catalog; no writes, files or "
        "extensions. With no QUERY and a terminal, an interactive prompt (history kept in "
        f"{history_path()}); with no QUERY and piped input, the query is read from stdin.",
        epilog="examples:\n"
        "  llmtap sql 'SELECT model_sent, count(*) FROM calls GROUP BY 1 ORDER BY 2 DESC'\n"
        "  llmtap sql --json 'SELECT id, status, error FROM calls WHERE status >= 400' | jq '.[0]'\n"
        "  llmtap sql --csv 'FROM attempts' > attempts.csv\n"
        "  llmtap sql --parquet slow.parquet 'FROM calls WHERE duration_ms > 30000'\n"
        "  echo 'SHOW TABLES' | llmtap sql\n"
        "  llmtap sql                      # prompt: end a query with ';', .tables, .schema calls",
        formatter_class=HelpFormatter,
    )
    p.add_argument("query", nargs="?", metavar="QUERY",
                   help="the SQL; without it, a prompt (on a terminal) or stdin (piped)")
    add_db_argument(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="CSV with a header row on stdout, every row")
    out.add_argument("--json", action="store_true",
                     help="a JSON array on stdout, one object per row (column name to value; JSON "
                     "columns as JSON, blobs as {\"base64\": ...}), every row")
    out.add_argument("--parquet", type=Path, metavar="OUT",
                     help="write every row to the Parquet file OUT (readable by you only)")
    p.add_argument("--limit", type=int, metavar="N", default=None,
                   help=f"at most N rows (default: {TABLE_LIMIT} for a table, all for --csv/--json/--parquet; "
                   "rows are streamed, never held whole)")
    p.set_defaults(func=cmd_sql)


def history_path() -> Path:
    return paths.state_dir() / "sql_history"


def cmd_sql(args: argparse.Namespace) -> int:
    from llmtap.recorder.reader import ReaderError, StreamingReader, open_reader

    if args.limit is not None and args.limit < 0:
        print("llmtap sql: --limit must be 0 or more", file=sys.stderr)
        return 2
    query = args.query
    interactive = query is None and sys.stdin.isatty()
    if query is None and not interactive:
        query = sys.stdin.read()
    if not interactive and not query.strip():
        print(f"llmtap sql: no query given; {ALLOWED}", file=sys.stderr)
        return 2
    try:
        reader = cast(StreamingReader, open_reader(args.db or paths.default_db()))
    except ReaderError as exc:
        print(f"llmtap sql: {exc}", file=sys.stderr)
        return 2
    try:
        if interactive:
            return repl(reader, args)
        run_one(reader, query, args, sys.stdout)
        return 0
    except SqlError as exc:
        print(f"llmtap sql: {_shown(str(exc))}", file=sys.stderr)
        return 2
    finally:
        reader.close()


def _shown(message: str) -> str:
    """An error for the terminal: DuckDB's messages quote the query and values from the record."""
    from llmtap.recorder.redact import printable

    return printable(message)


def _refusal(sql: str) -> str | None:
    from llmtap.recorder.endpoint import check_read_only
    from llmtap.recorder.redact import printable

    why = check_read_only(sql)
    if why is None:
        return None
    if why.startswith("Parser Error"):  # a typo: DuckDB's own words say where
        return _explained(why)
    if why.startswith("only SELECT"):
        word = (sql.split() or ["this"])[0].upper()
        return f"{printable(word[:20])} is not a read; {ALLOWED}"
    return f"{why.splitlines()[0]}; {ALLOWED}"


def _explained(message: str) -> str:
    """The reader's error in one line, with what is allowed when DuckDB refused file access."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip() and set(line.strip()) != {"^"}]
    first = " ".join(lines[:2]) if lines and lines[0].startswith("Parser Error") else (lines or ["the query failed"])[0]
    lowered = first.lower()
    if "external access" in lowered or "permission error" in lowered:
        return f"{first}; {ALLOWED}"
    if lowered.startswith("interrupt error"):
        return "the query was interrupted: the llmtap run serving it is stopping"
    if lowered.startswith("catalog error: table with name"):
        return f"{first} (.tables or SHOW TABLES lists llmtap's tables)"
    return first


def open_rows(reader: Reader, sql: str, limit: int | None) -> Rows:
    from llmtap.recorder.reader import ReaderError

    why = _refusal(sql)
    if why:
        raise SqlError(why)
    try:
        return reader.stream(sql, limit=limit)
    except ReaderError as exc:
        raise SqlError(_explained(str(exc))) from None


def _batches(rows: Rows) -> Iterator[list[tuple]]:
    from llmtap.recorder.reader import ReaderError

    try:
        yield from rows
    except ReaderError as exc:
        raise SqlError(_explained(str(exc))) from None
    finally:
        rows.close()


def run_one(reader: Reader, sql: str, args: argparse.Namespace, out: TextIO) -> None:
    limit = args.limit
    if limit is None and not (args.csv or args.json or args.parquet):
        limit = TABLE_LIMIT
    rows = open_rows(reader, sql, limit)
    if args.json:
        write_json(rows, out)
    elif args.csv:
        write_csv(rows, out)
    elif args.parquet:
        n = write_parquet(rows, args.parquet)
        print(f"wrote {n} row{'' if n == 1 else 's'} to {args.parquet}{_more(rows, args)}", file=sys.stderr)
    else:
        print_table(rows, out, args)
    if rows.truncated and (args.json or args.csv):
        print(f"llmtap sql: stopped at --limit {limit} rows; the query has more", file=sys.stderr)


def _more(rows: Rows, args: argparse.Namespace) -> str:
    return f" (stopped at --limit {args.limit}; the query has more)" if rows.truncated else ""


# -- values ------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """A value as JSON would carry it (what --json and --csv print)."""
    return jsonable(value, finite=True)


def _json_value(value: Any, is_json: bool) -> Any:
    if is_json and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return _plain(value)


def _safe_json(text: str) -> str:
    """JSON text with every character a terminal would act on (C1 controls, bidi overrides,
    other invisible format characters) written as its \\u escape: the same JSON value."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch in "\n" else json.dumps(ch)[1:-1] for ch in text)


def write_json(rows: Rows, out: TextIO) -> None:
    names = rows.columns
    is_json = [t == "JSON" for t in rows.types]
    out.write("[")
    first = True
    for batch in _batches(rows):
        parts = []
        for row in batch:
            obj = {n: _json_value(v, j) for n, v, j in zip(names, row, is_json)}
            parts.append(("\n" if first else ",\n") + _safe_json(json.dumps(obj, ensure_ascii=False)))
            first = False
        out.write("".join(parts))
    out.write("\n]\n" if not first else "]\n")
    out.flush()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (str, int, float, bool)):
        return value
    plain = _plain(value)
    return plain if isinstance(plain, str) else json.dumps(plain, ensure_ascii=False)


def write_csv(rows: Rows, out: TextIO) -> None:
    from llmtap.recorder.redact import terminal_text

    # On a terminal the cells are shown, so what came from the network is escaped; into a
    # pipe or a file they stay the bytes recorded.
    shown = out.isatty()
    w = csv.writer(out, lineterminator="\n")
    w.writerow([terminal_text(c) if shown else c for c in rows.columns])
    for batch in _batches(rows):
        for row in batch:
            cells = [_csv_value(v) for v in row]
            w.writerow([terminal_text(c) if shown and isinstance(c, str) else c for c in cells])
    out.flush()


def _cell(value: Any) -> str:
    from llmtap.recorder.redact import terminal_text

    if value is None:
        return "NULL"
    if isinstance(value, str):
        text = value
    else:
        plain = _plain(value)
        text = plain if isinstance(plain, str) else json.dumps(plain, ensure_ascii=False)
    if len(text) > CELL_CHARS:
        text = text[:CELL_CHARS] + "…"
    return terminal_text(text)


def print_table(rows: Rows, out: TextIO, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from llmtap.recorder.redact import printable

    table = Table(show_lines=False)
    for name, typ in zip(rows.columns, rows.types):
        numeric = typ.split("(")[0] in _NUMERIC
        table.add_column(Text(printable(name)), justify="right" if numeric else "left", overflow="fold")
    count = 0
    for batch in _batches(rows):
        for row in batch:
            table.add_row(*[Text(_cell(v)) for v in row])
            count += 1
    console = Console(file=out)
    if not console.is_terminal:
        console = Console(file=out, width=max(console.width, 200))  # piped: never squash the columns
    console.print(table)
    note = f"{count} row{'s' if count != 1 else ''}"
    if rows.truncated:
        shown = args.limit if args.limit is not None else TABLE_LIMIT
        note = (f"first {shown} rows shown; the query has more: --limit N for more, or --csv, --json or "
                "--parquet OUT for every row")
    console.print(Text(note, style="dim"))


_NUMERIC = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
            "UBIGINT", "UHUGEINT", "FLOAT", "DOUBLE", "DECIMAL"}


# -- Parquet, written here: the recorder's DuckDB has no file access ---------------------------
_SIMPLE = {"BOOLEAN", "VARCHAR", "DATE", "TIME", "TIMESTAMP", "TIMESTAMP WITH TIME ZONE", "UUID", *_NUMERIC}


def write_parquet(rows: Rows, out: Path) -> int:
    """Write the streamed rows to `out` (0600): they go as JSON lines into a private folder
    beside it, which an in-memory DuckDB allowed that folder only reads back with the query's
    own column types and writes as Parquet; renamed into place once complete."""
    import duckdb

    from llmtap.recorder.endpoint import READ_CONFIG

    out = Path(out).expanduser().absolute()
    if any(ord(ch) < 32 for ch in str(out)):
        raise SqlError(f"--parquet {str(out)!r}: the path holds control characters")
    if not out.parent.is_dir():
        raise SqlError(f"--parquet {out}: the folder {out.parent} does not exist")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".llmtap-sql-", dir=out.parent))  # 0700
    except OSError as exc:
        raise SqlError(f"--parquet {out}: cannot write in {out.parent}: {exc.strerror or exc}") from None
    try:
        spool = tmp / "rows.jsonl"
        names = [f"c{i}" for i in range(len(rows.columns))]  # any column name, even a duplicate
        blob = [t == "BLOB" for t in rows.types]
        count = 0
        fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for batch in _batches(rows):
                for row in batch:
                    f.write(json.dumps({n: (base64.b64encode(bytes(v)).decode() if b and v is not None else _plain(v))
                                        for n, v, b in zip(names, row, blob)}) + "\n")
                    count += 1
        read_types, selects = [], []
        for n, name, typ in zip(names, rows.columns, rows.types):
            quoted = '"' + name.replace('"', '""') + '"'
            if typ == "BLOB":
                read_types.append("VARCHAR")
                selects.append(f"from_base64({n}) AS {quoted}")
            elif typ == "JSON":
                read_types.append("VARCHAR")
                selects.append(f"{n}::JSON AS {quoted}")
            elif typ in _SIMPLE or typ.split("(")[0] == "DECIMAL" or "[" in typ or typ.startswith(("STRUCT", "MAP")):
                read_types.append(typ)
                selects.append(f"{n} AS {quoted}")
            else:  # INTERVAL, ENUM, UNION, ...: kept as the text they print as
                read_types.append("VARCHAR")
                selects.append(f"{n} AS {quoted}")
        columns = "{" + ", ".join(f"'{n}': '{t.replace(chr(39), chr(39) * 2)}'" for n, t in zip(names, read_types)) + "}"
        final = tmp / "out.parquet"
        w = duckdb.connect(config={k: v for k, v in READ_CONFIG.items() if k != "enable_external_access"})
        try:
            w.execute("SET allowed_directories = ?", [[str(tmp) + os.sep]])
            w.execute("SET enable_external_access = false")
            source = f"read_json({_literal(spool)}, format = 'newline_delimited', columns = {columns})"
            if not selects:
                raise SqlError("--parquet: the query returns no columns")
            w.execute(f"COPY (SELECT {', '.join(selects)} FROM {source}) TO {_literal(final)} "
                      "(FORMAT parquet, COMPRESSION zstd)")
        except duckdb.Error as exc:
            raise SqlError(f"--parquet {out}: {str(exc).splitlines()[0]}") from None
        finally:
            w.close()
        os.chmod(final, 0o600)
        final.replace(out)
        return count
    except OSError as exc:
        raise SqlError(f"--parquet {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _literal(path: Path) -> str:
    """A path as a SQL string literal (a file name cannot be a bound parameter of COPY)."""
    return "'" + str(path).replace("'", "''") + "'"


# -- the prompt --------------------------------------------------------------------------------
HELP = """\
End a query with ';' (it may span lines). Helpers:
  .tables          the tables (calls, attempts, ...)
  .schema TABLE    its columns and types
  .help            this
Ctrl-D leaves. Queries are read-only: SELECT / WITH / FROM / DESCRIBE / SHOW / SUMMARIZE."""


def _history() -> Callable[[], None]:
    """Load the prompt's history (a file of the user's alone); returns what saves it."""
    try:
        import readline
    except ImportError:  # no readline on this Python build: a prompt without history
        return lambda: None
    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        paths.tighten(path)
        readline.read_history_file(str(path))
    except OSError:
        pass
    readline.set_history_length(HISTORY_LINES)

    def save() -> None:
        try:
            readline.write_history_file(str(path))
            os.chmod(path, 0o600)
        except OSError as exc:
            print(f"llmtap sql: history not saved to {path}: {exc.strerror or exc}", file=sys.stderr)

    return save


def _remember(query: str, lines: int) -> None:
    """One history entry per query, however many lines it took to type."""
    try:
        import readline
    except ImportError:
        return
    if lines > 1:
        for _ in range(lines):
            n = readline.get_current_history_length()
            if n:
                readline.remove_history_item(n - 1)
        readline.add_history(" ".join(query.split("\n")))


def helper(text: str) -> str | None:
    """The SQL a `.` helper stands for, or None when it is not one."""
    word, _, rest = text.partition(" ")
    rest = rest.strip().rstrip(";").strip()
    if word == ".tables":
        return ("SELECT table_name AS name, estimated_size AS approx_rows, column_count AS columns FROM duckdb_tables() "
                "WHERE database_name = current_database() ORDER BY name LIKE '\\_%' ESCAPE '\\', name")
    if word == ".schema" and rest:
        return f"DESCRIBE {_ident(rest)}"
    return None


def _ident(name: str) -> str:
    return '"' + name.strip('"').replace('"', '""') + '"'


def repl(reader: Reader, args: argparse.Namespace) -> int:
    from llmtap.recorder.redact import printable

    save = _history()
    where = "through the running `llmtap run`" if reader.kind == "remote" else "the file, read-only"
    db = getattr(reader, "db", None) or args.db or paths.default_db()
    print(f"llmtap sql on {printable(str(db))} ({where}). End a query with ';'; .tables, .schema TABLE, "
          ".help; Ctrl-D leaves.", file=sys.stderr)
    buf: list[str] = []
    try:
        while True:
            running = False
            try:
                line = input("   ...> " if buf else "llmtap> ")
                # From here a Ctrl-C is caught below wherever it lands (a terminal delivers it
                # whenever it likes, also between reading the line and starting its query).
                if not buf and line.strip().startswith("."):
                    sql = helper(line.strip())
                    if sql is None:
                        if line.split()[0] != ".help":
                            print(f"unknown helper {printable(line.strip())!r} (.schema needs a table name)")
                        print(HELP)
                        continue
                else:
                    if not buf and not line.strip():
                        continue
                    buf.append(line)
                    if not line.rstrip().endswith(";"):
                        continue
                    sql = "\n".join(buf)
                    buf = []
                    _remember(sql, sum(1 for typed in sql.split("\n") if typed))  # readline keeps no empty line
                running = True
                run_one(reader, sql, args, sys.stdout)
            except EOFError:
                print()
                return 0
            except SqlError as exc:
                print(f"error: {_shown(str(exc))}", file=sys.stderr)
            except KeyboardInterrupt:  # as in a shell: Ctrl-C drops the query being typed or run
                buf = []
                print("interrupted" if running else "", file=sys.stderr if running else sys.stdout)
    finally:
        save()
