"""Export calls to Parquet or JSON lines with DuckDB's own COPY.

Large exports go in id-ordered slices (ULIDs sort by time), each COPY'd to a part file, so
the user sees progress; the parts are then combined into one file written beside the target
and renamed into place, so a failed export never leaves a half file behind.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb

FORMATS = ("parquet", "jsonl")
SLICE_ROWS = 100_000


class ExportError(Exception):
    pass


def parse_time(text: str | None, flag: str) -> str | None:
    """An ISO date or date-time, checked here so the error names the flag."""
    if text is None:
        return None
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ExportError(f"{flag} {text!r} is not an ISO date; e.g. {flag} 2026-11-01 or "
                          f"{flag} 2026-11-01T08:00:00+00:00") from None
    if value.tzinfo is None:
        value = value.astimezone()  # a bare date means the user's own clock
    return value.isoformat()


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
        parts.append(f"({where_sql})")
        args += list(params or [])
    return (" AND ".join(parts) or "TRUE"), args


def _literal(value: Any) -> str:
    """COPY cannot take parameters, so values are inlined as SQL literals."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def _inline(sql: str, args: list) -> str:
    pieces = sql.split("?")
    if len(pieces) - 1 != len(args):
        raise ExportError("the filter's parameters do not match its placeholders")
    out = [pieces[0]]
    for value, piece in zip(args, pieces[1:]):
        out += [_literal(value), piece]
    return "".join(out)


def export(con: duckdb.DuckDBPyConnection, out: Path, fmt: str = "parquet", *, since: str | None = None,
           until: str | None = None, model: str | None = None, where_sql: str | None = None,
           params: list | None = None, progress: Callable[[int, int], None] | None = None) -> int:
    """Write the matching calls to `out`; returns the number of rows."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r} is not known; use one of {', '.join(FORMATS)}")
    out = Path(out).expanduser().absolute()
    if not out.parent.is_dir():
        raise ExportError(f"cannot write {out}: the folder {out.parent} does not exist")
    where, args = where_clause(since, until, model, where_sql, params)
    total = con.execute(f"SELECT count(*) FROM calls WHERE {where}", args).fetchone()[0]
    options = "FORMAT parquet, COMPRESSION zstd" if fmt == "parquet" else "FORMAT json"
    tmpdir = Path(tempfile.mkdtemp(prefix=".llmtap-export-", dir=out.parent))
    try:
        final_tmp = tmpdir / ("all." + fmt)
        if total <= SLICE_ROWS:
            sql = _inline(f"SELECT * FROM calls WHERE {where} ORDER BY id", args)
            con.execute(f"COPY ({sql}) TO '{_path(final_tmp)}' ({options})")
            if progress:
                progress(total, total)
        else:
            # Slice boundaries by id so each COPY is a range scan of its own.
            bounds = [r[0] for r in con.execute(
                f"SELECT id FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM calls WHERE {where}) "
                f"WHERE n % {SLICE_ROWS} = 1 ORDER BY id", args).fetchall()]
            done = 0
            for i, low in enumerate(bounds):
                high = bounds[i + 1] if i + 1 < len(bounds) else None
                cond = f"{where} AND id >= ?" + (" AND id < ?" if high else "")
                sql = _inline(f"SELECT * FROM calls WHERE {cond} ORDER BY id", args + [low] + ([high] if high else []))
                con.execute(f"COPY ({sql}) TO '{_path(tmpdir / f'part-{i:05d}.{fmt}')}' ({options})")
                done = min(total, done + SLICE_ROWS)
                if progress:
                    progress(done, total)
            reader = "read_parquet" if fmt == "parquet" else "read_json_auto"
            con.execute(f"COPY (SELECT * FROM {reader}('{_path(tmpdir)}/part-*.{fmt}') ORDER BY id) "
                        f"TO '{_path(final_tmp)}' ({options})")
        final_tmp.replace(out)
    except duckdb.Error as exc:
        raise ExportError(f"export to {out} failed: {exc}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return int(total)


def _path(p: Path) -> str:
    return str(p).replace("'", "''")
