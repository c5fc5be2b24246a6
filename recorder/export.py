"""Export calls to Parquet, CSV or JSON lines with DuckDB's own COPY.

Large exports go in id-ordered slices (ULIDs sort by time), each COPY'd to a part file, so
the user sees progress; the parts are then combined into one file written beside the target
and renamed into place, so a failed export never leaves a half file behind.

The database connection that reads the calls has no file access (endpoint.READ_CONFIG): the
rows stream as Arrow into a second, in-memory DuckDB that holds no record and may write only
in the export's own temporary folder. The file holds traffic: it is the user's alone (0600).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtap.recorder.times import TIME_FORMS, parse_when

if TYPE_CHECKING:  # imported where used: every `llmtap` command reads FORMATS, and DuckDB takes ~0.4 s to load
    import duckdb

FORMATS = ("parquet", "csv", "jsonl")
# The format a file's name asks for. `.json` gets JSON lines too: DuckDB writes one object per
# line, which every JSON tool that reads a stream (jq, pandas lines=True) takes.
SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
_OPTIONS = {"parquet": "FORMAT parquet, COMPRESSION zstd", "csv": "FORMAT csv, HEADER true", "jsonl": "FORMAT json"}
SLICE_ROWS = 100_000


class ExportError(Exception):
    pass


def parse_time(text: str | None, flag: str) -> str | None:
    """--since/--until: the forms the UI's since:/until: take, checked here so the error names the flag."""
    if text is None:
        return None
    try:
        return parse_when(text)
    except ValueError:
        raise ExportError(f"{flag} {text!r}: expected {TIME_FORMS}; e.g. {flag} 2h or "
                          f"{flag} 2026-11-01T08:00") from None


def format_for(out: Path, fmt: str | None) -> str:
    """The format asked for with --format, else the one `out`'s extension names."""
    if fmt is not None:
        return fmt
    suffix = Path(out).suffix.lower()
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    named = f"its extension {suffix!r}" if suffix else "no extension"
    raise ExportError(f"--out {out}: {named} names no format; end the name in "
                      f"{', '.join(SUFFIXES)}, or give --format {'|'.join(FORMATS)}")


def where_clause(since: str | None = None, until: str | None = None, model: str | None = None,
                 where_sql: str | None = None, params: list | None = None) -> tuple[str, list]:
    parts: list[str] = []
    args: list[Any] = []
    if since:
        parts.append("started_at >= CAST(? AS TIMESTAMPTZ)")
        args.append(since)
    if until:
        parts.append("started_at < CAST(? AS TIMESTAMPTZ)")
        args.append(until)
    if model:
        parts.append("(model_requested GLOB ? OR model_sent GLOB ?)")
        args += [model, model]
    if where_sql:
        # Checked by DuckDB's parser to be one condition over calls and nothing else; the
        # newline ends a trailing `--` comment before the closing parenthesis, as in the check.
        from llmtap.recorder.endpoint import check_condition  # loads DuckDB: only when filtering

        why = check_condition(where_sql)
        if why:
            raise ExportError(why)
        parts.append(f"({where_sql}\n)")
        args += list(params or [])
    return (" AND ".join(parts) or "TRUE"), args


class _Rows:
    """The Arrow stream of one query on the reading connection, for the writer to scan."""

    def __init__(self, rel: duckdb.DuckDBPyRelation) -> None:
        self.rel = rel

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        return self.rel.__arrow_c_stream__(requested_schema)


def _writer(folder: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that can write files in `folder` and nowhere else."""
    import duckdb

    from llmtap.recorder.endpoint import READ_CONFIG

    w = duckdb.connect(config={k: v for k, v in READ_CONFIG.items() if k != "enable_external_access"})
    w.execute("SET allowed_directories = ?", [[str(folder) + os.sep]])
    w.execute("SET enable_external_access = false")
    return w


def _quoted(p: Path) -> str:
    """`p` as a SQL string literal. COPY's target cannot be a parameter; DuckDB's '...' has no
    escapes but a doubled quote, and a path that is not plain text is refused outright."""
    text = str(p)
    if any(ord(ch) < 32 for ch in text):
        raise ExportError(f"cannot write to {text!r}: the path holds control characters")
    return "'" + text.replace("'", "''") + "'"


def export(con: duckdb.DuckDBPyConnection, out: Path, fmt: str = "parquet", *, since: str | None = None,
           until: str | None = None, model: str | None = None, where_sql: str | None = None,
           params: list | None = None, progress: Callable[[int, int], None] | None = None,
           table: str = "calls", slice_rows: int = SLICE_ROWS) -> int:
    """Write the matching rows of `table` (calls unless named) to `out`; returns the number of
    rows. `con` is a cursor of its own: the export reads in one read-only transaction on it.
    Over `slice_rows` calls they are written in slices of that many, with `progress` told after
    each."""
    import duckdb

    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r} is not known; use one of {', '.join(FORMATS)}")
    out = Path(out).expanduser().absolute()
    _quoted(out)
    if not out.parent.is_dir():
        raise ExportError(f"cannot write {out}: the folder {out.parent} does not exist")
    where, args = where_clause(since, until, model, where_sql, params)
    options = _OPTIONS[fmt]
    try:
        # One snapshot for the count and every slice; DuckDB refuses any write in it.
        con.execute("BEGIN TRANSACTION READ ONLY")
    except duckdb.Error as exc:
        raise ExportError(f"cannot read the calls: {exc}") from None
    try:
        if table != "calls":
            return _export_table(con, out, fmt, options, table, since=since, until=until, model=model,
                                 where_sql=where_sql, progress=progress, slice_rows=slice_rows)
        return _export(con, out, fmt, options, where, args, progress, slice_rows)
    finally:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            pass


def _export_table(con: duckdb.DuckDBPyConnection, out: Path, fmt: str, options: str, table: str, *,
                  since: str | None, until: str | None, model: str | None, where_sql: str | None,
                  progress: Callable[[int, int], None] | None, slice_rows: int) -> int:
    """Another table of the database (attempts, dropped, and whatever later migrations add),
    found in DuckDB's catalog rather than in a list here. --since/--until apply where it has a
    `started_at`; --model and the UI's filter are about calls."""
    cols = [r[0] for r in con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() "
        "AND schema_name = 'main' AND table_name = ? ORDER BY column_index", [table]).fetchall()]
    if not cols:
        names = [r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = 'main' AND table_name NOT LIKE '\\_%' ESCAPE '\\' ORDER BY 1").fetchall()]
        raise ExportError(f"--table {table!r}: no such table; the database has {', '.join(names)}")
    if model or where_sql:
        raise ExportError(f"--model filters calls, not {table}: leave it out, or export --table calls")
    if (since or until) and "started_at" not in cols:
        raise ExportError(f"--since/--until need a started_at column, which {table} has not")
    where, args = where_clause(since, until)
    ident = '"' + table.replace('"', '""') + '"'
    order = "id" if "id" in cols else "call_id, n" if {"call_id", "n"} <= set(cols) else None
    return _export(con, out, fmt, options, where, args, progress, slice_rows, table=ident, order=order)


def _export(con: duckdb.DuckDBPyConnection, out: Path, fmt: str, options: str, where: str, args: list,
            progress: Callable[[int, int], None] | None, slice_rows: int, *, table: str = "calls",
            order: str | None = "id") -> int:
    """Write `table`'s rows matching `where` to `out`, in `order`. Over `slice_rows` rows of a
    table with ids, in slices by id (progress after each); otherwise in one COPY."""
    import duckdb

    try:
        total = con.execute(f"SELECT count(*) FROM {table} WHERE {where}", args).fetchall()[0][0]
        tmpdir = Path(tempfile.mkdtemp(prefix=".llmtap-export-", dir=out.parent))
    except duckdb.Error as exc:
        raise ExportError(f"the export's filter is not valid: {exc}") from None
    except OSError as exc:
        raise ExportError(f"cannot write in {out.parent}: {exc.strerror or exc}") from None
    writer: duckdb.DuckDBPyConnection | None = None

    def copy(select: str, select_args: list, target: Path, copy_options: str) -> None:
        assert writer is not None
        writer.register("rows", _Rows(con.sql(select, params=select_args)))
        try:
            writer.execute(f"COPY (SELECT * FROM rows) TO {_quoted(target)} ({copy_options})")
        finally:
            writer.unregister("rows")

    try:
        writer = _writer(tmpdir)
        final_tmp = tmpdir / ("all." + fmt)
        if total <= slice_rows or order != "id":
            ordered = f" ORDER BY {order}" if order else ""
            copy(f"SELECT * FROM {table} WHERE {where}{ordered}", args, final_tmp, options)
            if progress:
                progress(total, total)
        else:
            # Slice boundaries by id (ULIDs sort by time) so each COPY is a range of its own and
            # progress is real. DuckDB's own query_progress() jumps 0 -> 100 on a COPY.
            bounds = [r[0] for r in con.execute(
                f"SELECT id FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM {table} WHERE {where}) "
                f"WHERE n % {int(slice_rows)} = 1 ORDER BY id", args).fetchall()]
            done = 0
            parts: list[Path] = []
            # Parquet parts are only read back once: lz4 is cheaper to write and read than zstd.
            # Measured on 2 cores, 100k calls: the whole export takes 1.3-1.6x one plain COPY
            # (the final re-encode is the cost of having both progress and a single file).
            part_options = "FORMAT parquet, COMPRESSION lz4_raw" if fmt == "parquet" else options
            for i, low in enumerate(bounds):
                high = bounds[i + 1] if i + 1 < len(bounds) else None
                cond = f"{where} AND id >= ?" + (" AND id < ?" if high else "")
                part = tmpdir / f"part-{i:05d}.{fmt}"
                if fmt == "csv" and i == 1:
                    part_options = "FORMAT csv, HEADER false"  # the parts are concatenated: one header
                copy(f"SELECT * FROM {table} WHERE {cond} ORDER BY id", args + [low] + ([high] if high else []),
                     part, part_options)
                parts.append(part)
                done = min(total, done + slice_rows)
                if progress:
                    progress(done, total)
            if fmt == "parquet":
                writer.execute(f"COPY (SELECT * FROM read_parquet({_quoted(tmpdir / 'part-*.parquet')})) "
                               f"TO {_quoted(final_tmp)} ({options})")
            else:
                # JSON lines (and CSV, header in the first part only) concatenate as they
                # are; re-reading them through DuckDB would re-infer the types and took 2.4x
                # as long.
                with open(final_tmp, "wb") as dst:
                    for part in parts:
                        with open(part, "rb") as src:
                            shutil.copyfileobj(src, dst, 1 << 20)
        os.chmod(final_tmp, 0o600)  # whatever the umask of the process that writes it
        final_tmp.replace(out)
    except duckdb.Error as exc:
        raise ExportError(f"export to {out} failed: {exc}") from None
    except OSError as exc:
        raise ExportError(f"export to {out} failed: {exc.strerror or exc}") from None
    finally:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    return int(total)
