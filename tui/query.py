"""SQL for the terminal UI: the filter language, the list page, one call, stats.

Headless on purpose (no Textual import) so the filter parser and the queries can be tested
and benchmarked on their own. Everything the user types ends up in query parameters, never in
the SQL text.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

PAGE_SIZE = 200

# The columns the call list shows. Bodies are deliberately absent: on a million rows the list
# query must only touch narrow columns.
LIST_COLUMNS: tuple[str, ...] = (
    "id", "started_at", "client", "api", "method", "model_requested", "model_sent", "provider",
    "status", "attempts", "stream", "complete", "ttfb_ms", "duration_ms", "input_tokens",
    "output_tokens", "reasoning_tokens", "error",
)

# Every column of `calls` the detail view knows about (schema m001). A DB from an older
# schema may lack some; they are selected as NULL.
DETAIL_COLUMNS: tuple[str, ...] = LIST_COLUMNS + (
    "url", "model_reported", "route", "request_headers", "request_body", "response_headers",
    "response_body", "reasoning", "content", "tool_calls", "finish_reason", "total_tokens",
    "notes", "request_body_raw", "response_body_raw",
)

ATTEMPT_COLUMNS: tuple[str, ...] = (
    "n", "provider", "url", "model_sent", "status", "error", "started_at", "ttfb_ms", "duration_ms",
)


class Reader(Protocol):
    """The part of llmtap.recorder.reader's readers the UI uses (see that module)."""

    kind: str

    def query(self, sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]: ...

    def events_after(self, seq: int, timeout: float) -> tuple[int, list[dict]]: ...

    def partial(self, call_id: str) -> dict | None: ...

    def export(self, out: Any, fmt: str, **kwargs: Any) -> int: ...

    def close(self) -> None: ...


class FilterError(ValueError):
    """The filter text does not parse; the message is shown under the filter bar."""


@dataclass(frozen=True)
class Filter:
    """A parsed filter: a SQL boolean expression over `calls` and its parameters."""

    text: str = ""
    clauses: tuple[str, ...] = ()
    params: tuple[Any, ...] = ()

    @property
    def where_sql(self) -> str | None:
        """The expression for reader.export's `where_sql`, None when nothing is filtered."""
        return " AND ".join(f"({c})" for c in self.clauses) if self.clauses else None


@dataclass
class Schema:
    """Which columns the open DB actually has, looked up once at start."""

    calls: frozenset[str] = field(default_factory=frozenset)
    attempts: frozenset[str] = field(default_factory=frozenset)
    has_attempts_table: bool = True

    def col(self, name: str) -> str:
        """A column reference, or NULL when this DB predates the column."""
        return name if name in self.calls else "NULL"

    def select_list(self, names: Iterable[str], table: str = "calls") -> str:
        have = self.calls if table == "calls" else self.attempts
        return ", ".join(_select_one(name, have) for name in names)


# Timestamps travel as epoch milliseconds: DuckDB's Python client needs pytz to hand out a
# TIMESTAMPTZ, and a remote reader would turn it into text anyway; an integer survives both.
_TIME_COLUMNS = frozenset({"started_at"})


def _select_one(name: str, have: frozenset[str]) -> str:
    if name not in have:
        return f"NULL AS {name}"
    if name in _TIME_COLUMNS:
        return f"epoch_ms({name}) AS {name}"
    return name


def load_schema(reader: Reader) -> Schema:
    cols, rows = reader.query(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_name IN ('calls', 'attempts') AND table_schema = 'main'"
    )
    calls = frozenset(str(r[1]) for r in rows if r[0] == "calls")
    attempts = frozenset(str(r[1]) for r in rows if r[0] == "attempts")
    return Schema(calls=calls, attempts=attempts, has_attempts_table=bool(attempts))


# -- the filter language ---------------------------------------------------------------------
FILTER_HELP = (
    "model:gpt-4o*  provider:openrouter  client:cline  api:anthropic*  status:5xx|404|>=400|live  "
    "errors  fallbacks  incomplete  live  since:2026-11-01|2h  until:…  -model:x (negate)  "
    "free text searches content and reasoning; quote phrases: \"rate limit\""
)

_FLAGS = {"errors", "fallbacks", "incomplete", "live"}
_KEYS = {"model", "provider", "client", "status", "since", "until", "api", "route", "id", "text"}
_REL = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_REL_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _glob_to_like(text: str) -> str:
    return _like_escape(text).replace("*", "%").replace("?", "_")


def _parse_time(value: str, key: str, now: datetime) -> str:
    """ISO date/time or a relative age (`2h`, `30m`, `7d`) -> ISO string with a zone.

    An ISO string rather than a datetime is passed on because a remote reader sends
    parameters as JSON."""
    m = _REL.match(value.strip().lower())
    if m:
        delta = timedelta(**{_REL_UNITS[m.group(2)]: float(m.group(1))})
        return (now - delta).isoformat()
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise FilterError(f"{key}:{value}: expected a date like 2026-11-01, 2026-11-01T14:30 or an age like 2h") from None
    if parsed.tzinfo is None:
        parsed = parsed.astimezone()  # the user means their own local time
    return parsed.isoformat()


def _status_clause(value: str, col: str) -> tuple[str, list[Any]]:
    v = value.strip().lower()
    if v in ("live", "pending", "none"):
        return f"{col} IS NULL", []
    m = re.fullmatch(r"([1-5])xx", v)
    if m:
        lo = int(m.group(1)) * 100
        return f"{col} BETWEEN ? AND ?", [lo, lo + 99]
    m = re.fullmatch(r"(\d{3})-(\d{3})", v)
    if m:
        return f"{col} BETWEEN ? AND ?", [int(m.group(1)), int(m.group(2))]
    m = re.fullmatch(r"(>=|<=|>|<|!=|=)?(\d{3})", v)
    if m:
        return f"{col} {m.group(1) or '='} ?", [int(m.group(2))]
    raise FilterError(f"status:{value}: expected e.g. 200, 5xx, 400-499, >=400 or live")


def parse_filter(text: str, schema: Schema, now: datetime | None = None) -> Filter:
    """Parse the filter bar's text. Raises FilterError with a message fit for the user."""
    now = now or datetime.now(timezone.utc)
    try:
        tokens = shlex.split(text, posix=True)
    except ValueError as exc:  # an unclosed quote
        raise FilterError(f"{exc}: close the quote") from None
    c = schema.col
    clauses: list[str] = []
    params: list[Any] = []
    words: list[str] = []
    for token in tokens:
        negate = token.startswith("-") and len(token) > 1 and not token[1].isdigit()
        body = token[1:] if negate else token
        key, sep, value = body.partition(":")
        key = key.lower()
        clause: str
        p: list[Any]
        if sep and key in _KEYS:
            if not value:
                raise FilterError(f"{key}: needs a value, e.g. {key}:…")
            if key == "model":
                like = _glob_to_like(value)
                clause = " OR ".join(f"{c(m)} ILIKE ? ESCAPE '\\'" for m in ("model_requested", "model_sent", "model_reported"))
                p = [like] * 3
            elif key in ("provider", "api", "route"):
                clause, p = f"{c(key)} ILIKE ? ESCAPE '\\'", [_glob_to_like(value)]
            elif key == "client":
                # A User-Agent is long ("cline/3.1 node/22 …"): match anywhere in it.
                clause, p = f"{c('client')} ILIKE ? ESCAPE '\\'", [f"%{_glob_to_like(value)}%"]
            elif key == "id":
                clause, p = "id LIKE ? ESCAPE '\\'", [_like_escape(value.upper()) + "%"]
            elif key == "status":
                clause, p = _status_clause(value, c("status"))
            elif key == "since":
                clause, p = "started_at >= CAST(? AS TIMESTAMPTZ)", [_parse_time(value, key, now)]
            elif key == "until":
                clause, p = "started_at < CAST(? AS TIMESTAMPTZ)", [_parse_time(value, key, now)]
            else:  # text:
                clause, p = _text_clause(value, schema)
        elif sep and re.fullmatch(r"[a-z_]+", key) and not value.startswith("/"):
            # A typo such as `modle:x` should say so rather than silently search for it.
            known = ", ".join(sorted(_KEYS))
            raise FilterError(f"unknown filter {key}: (known: {known}); search text with a colon as text:\"a:b\"")
        elif not sep and body.lower() in _FLAGS:
            flag = body.lower()
            p = []
            if flag == "errors":
                clause = f"{c('status')} >= 400 OR {c('error')} IS NOT NULL"
            elif flag == "fallbacks":
                clause = f"{c('attempts')} > 1"
            elif flag == "incomplete":
                clause = f"{c('complete')} = false AND {c('status')} < 400"
            else:  # live
                clause = f"{c('status')} IS NULL AND {c('duration_ms')} IS NULL"
        else:
            if negate:
                clause, p = _text_clause(body, schema)
            else:
                words.append(token)
                continue
        if negate:
            # COALESCE so that NULL columns count as "does not match" and survive the NOT.
            clause = f"NOT COALESCE(({clause}), false)"
        clauses.append(clause)
        params.extend(p)
    for word in words:
        clause, p = _text_clause(word, schema)
        clauses.append(clause)
        params.extend(p)
    return Filter(text=text, clauses=tuple(clauses), params=tuple(params))


def _text_clause(value: str, schema: Schema) -> tuple[str, list[Any]]:
    like = f"%{_like_escape(value)}%"
    return (f"{schema.col('content')} ILIKE ? ESCAPE '\\' OR {schema.col('reasoning')} ILIKE ? ESCAPE '\\'",
            [like, like])


# -- queries --------------------------------------------------------------------------------
def page_sql(schema: Schema, flt: Filter, before_id: str | None, limit: int = PAGE_SIZE) -> tuple[str, list[Any]]:
    """Keyset pagination on the ULID id: newest first, `id < last seen` for the next page.

    OFFSET would rescan every skipped row; a key bound lets DuckDB prune by zone maps."""
    clauses = list(flt.clauses)
    params = list(flt.params)
    if before_id is not None:
        clauses.append("id < ?")
        params.append(before_id)
    where = (" WHERE " + " AND ".join(f"({c})" for c in clauses)) if clauses else ""
    sql = f"SELECT {schema.select_list(LIST_COLUMNS)} FROM calls{where} ORDER BY id DESC LIMIT {int(limit)}"
    return sql, params


def rows_by_id_sql(schema: Schema, flt: Filter, ids: Sequence[str]) -> tuple[str, list[Any]]:
    """The list columns of a few calls, only those the filter still admits."""
    marks = ", ".join("?" for _ in ids)
    clauses = [f"id IN ({marks})", *flt.clauses]
    where = " AND ".join(f"({c})" for c in clauses)
    return (f"SELECT {schema.select_list(LIST_COLUMNS)} FROM calls WHERE {where}",
            [*ids, *flt.params])


def detail_sql(schema: Schema) -> str:
    return f"SELECT {schema.select_list(DETAIL_COLUMNS)} FROM calls WHERE id = ?"


def attempts_sql(schema: Schema) -> str | None:
    if not schema.has_attempts_table:
        return None
    return f"SELECT {schema.select_list(ATTEMPT_COLUMNS, 'attempts')} FROM attempts WHERE call_id = ? ORDER BY n"


def _where(flt: Filter) -> str:
    return (" WHERE " + flt.where_sql) if flt.where_sql else ""


def stats_sql(schema: Schema, flt: Filter) -> tuple[str, list[Any]]:
    """Per model and provider; percentiles over finished calls only."""
    c = schema.col
    sql = f"""
        SELECT coalesce({c('model_sent')}, {c('model_requested')}, '-') AS model,
               coalesce({c('provider')}, '-') AS provider,
               count(*) AS calls,
               count(*) FILTER (WHERE {c('status')} >= 400 OR {c('error')} IS NOT NULL) AS errors,
               count(*) FILTER (WHERE {c('attempts')} > 1) AS fallbacks,
               sum({c('input_tokens')}) AS input_tokens,
               sum({c('output_tokens')}) AS output_tokens,
               sum({c('reasoning_tokens')}) AS reasoning_tokens,
               quantile_cont({c('ttfb_ms')}, [0.5, 0.95, 0.99]) AS ttfb,
               quantile_cont({c('duration_ms')}, [0.5, 0.95, 0.99]) AS duration
        FROM calls{_where(flt)}
        GROUP BY ALL ORDER BY calls DESC LIMIT 500
    """
    return sql, list(flt.params)


def timeline_sql(flt: Filter, hours: int) -> tuple[str, list[Any]]:
    """Calls per hour over the last `hours` hours (hour offsets from now, 0 = oldest)."""
    clauses = [f"started_at >= now() - INTERVAL {int(hours)} HOUR", *flt.clauses]
    where = " WHERE " + " AND ".join(f"({c})" for c in clauses)
    sql = (f"SELECT CAST(floor(epoch(started_at - (now() - INTERVAL {int(hours)} HOUR)) / 3600) AS INTEGER) AS h, "
           f"count(*) FROM calls{where} GROUP BY h ORDER BY h")
    return sql, list(flt.params)


def latency_histogram_sql(schema: Schema, flt: Filter) -> tuple[str, list[Any]]:
    """Duration counts in power-of-two buckets (bucket b holds [2^b, 2^(b+1)) ms)."""
    d = schema.col("duration_ms")
    clauses = [f"{d} IS NOT NULL", *flt.clauses]
    where = " WHERE " + " AND ".join(f"({c})" for c in clauses)
    sql = (f"SELECT CAST(floor(log2(greatest({d}, 1))) AS INTEGER) AS b, count(*) FROM calls{where} "
           "GROUP BY b ORDER BY b")
    return sql, list(flt.params)
