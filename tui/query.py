"""SQL for the terminal UI: the filter language, the list page, one call, stats.

Headless on purpose (no Textual import) so the filter parser and the queries can be tested
and benchmarked on their own. Everything the user types ends up in query parameters, never in
the SQL text.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from llmtap.recorder.columns import ATTEMPT_COLUMNS as SPEC_ATTEMPT_COLUMNS
from llmtap.recorder.columns import CALL_COLUMNS, TIME_COLUMNS
from llmtap.recorder.filters import error_condition, glob_to_like, like_escape, model_clause, since_clause, until_clause
from llmtap.recorder.redact import terminal_text
from llmtap.recorder.search_index import MAX_TERM, PIECE_STEP, split_words
from llmtap.recorder.stats import stats_rows
from llmtap.recorder.times import TIME_FORMS, parse_when

PAGE_SIZE = 200

# The columns the call list shows. Bodies are deliberately absent: on a million rows the list
# query must only touch narrow columns.
LIST_COLUMNS: tuple[str, ...] = (
    "id", "started_at", "client", "api", "method", "model_requested", "model_sent", "provider",
    "status", "attempts", "stream", "complete", "ttfb_ms", "duration_ms", "input_tokens",
    "output_tokens", "reasoning_tokens", "error", "cost_usd", "cost_source",
)

# Every column of `calls` (recorder/columns.py). A DB from an older schema may lack some;
# they are selected as NULL.
DETAIL_COLUMNS: tuple[str, ...] = LIST_COLUMNS + tuple(c for c in CALL_COLUMNS if c not in LIST_COLUMNS)

ATTEMPT_COLUMNS: tuple[str, ...] = tuple(c for c in SPEC_ATTEMPT_COLUMNS if c != "call_id")


def _safe(value: Any) -> Any:
    if isinstance(value, str):
        return terminal_text(value)
    if isinstance(value, dict):
        return {k: _safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_safe(v) for v in value)
    return value


class TerminalSafeReader:
    """A reader whose every text is safe to draw. Recorded text comes from the network, and
    Textual passes an ESC in a string through to the terminal: an upstream could otherwise
    write escape sequences (colours, cursor moves, an OSC 52 clipboard write) into the user's
    terminal through the UI. Bytes (the Raw tab's undecodable bodies) are left as they are."""

    def __init__(self, inner: Reader) -> None:
        self.inner = inner
        self.kind = inner.kind

    def query(self, sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]:
        cols, rows = self.inner.query(sql, params)
        return cols, [tuple(_safe(v) for v in row) for row in rows]

    def events_after(self, seq: int, timeout: float) -> tuple[int, list[dict]]:
        seq, events = self.inner.events_after(seq, timeout)
        return seq, [_safe(e) for e in events]

    def latest_seq(self) -> int:
        return self.inner.latest_seq()

    def partial(self, call_id: str) -> dict | None:
        return _safe(self.inner.partial(call_id))

    def export(self, out: Any, fmt: str, **kwargs: Any) -> int:
        return self.inner.export(out, fmt, **kwargs)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # anything else a reader offers (db path, follow)
        return getattr(self.inner, name)


class Reader(Protocol):
    """The part of llmtap.recorder.reader's readers the UI uses (see that module)."""

    kind: str

    def query(self, sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]: ...

    def events_after(self, seq: int, timeout: float) -> tuple[int, list[dict]]: ...

    def latest_seq(self) -> int: ...

    def partial(self, call_id: str) -> dict | None: ...

    # Any arguments (mypy reads this as `...`): each reader takes the filters its own way.
    def export(self, *args: Any, **kwargs: Any) -> int: ...

    def close(self) -> None: ...


class FilterError(ValueError):
    """The filter text does not parse; the message is shown under the filter bar."""


@dataclass(frozen=True)
class Filter:
    """A parsed filter: a SQL boolean expression over `calls` and its parameters."""

    text: str = ""
    clauses: tuple[str, ...] = ()
    params: tuple[Any, ...] = ()
    # The free text every admitted call must contain (negated text excluded): what the search
    # index can narrow by (see index_clause).
    texts: tuple[str, ...] = ()

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
    has_search_index: bool = False  # the recorder's _search_chunks / _search_terms (schema m002)

    def col(self, name: str) -> str:
        """A column reference, or NULL when this DB predates the column."""
        return name if name in self.calls else "NULL"

    def select_list(self, names: Iterable[str], table: str = "calls") -> str:
        have = self.calls if table == "calls" else self.attempts
        return ", ".join(_select_one(name, have) for name in names)


# Timestamps travel as epoch milliseconds: DuckDB's Python client needs pytz to hand out a
# TIMESTAMPTZ, and a remote reader would turn it into text anyway; an integer survives both.
_TIME_COLUMNS = TIME_COLUMNS


def _select_one(name: str, have: frozenset[str]) -> str:
    if name not in have:
        return f"NULL AS {name}"
    if name in _TIME_COLUMNS:
        return f"epoch_ms({name}) AS {name}"
    return name


def load_schema(reader: Reader) -> Schema:
    cols, rows = reader.query(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_name IN ('calls', 'attempts', '_search_chunks', '_search_terms') AND table_schema = 'main'"
    )
    calls = frozenset(str(r[1]) for r in rows if r[0] == "calls")
    attempts = frozenset(str(r[1]) for r in rows if r[0] == "attempts")
    index = {str(r[0]) for r in rows if r[0] in ("_search_chunks", "_search_terms")}
    return Schema(calls=calls, attempts=attempts, has_attempts_table=bool(attempts),
                  has_search_index=len(index) == 2 and {"content", "reasoning"} <= calls)


# -- the filter language ---------------------------------------------------------------------
FILTER_HELP = (
    "model:gpt-4o*  provider:openrouter  client:cline  api:anthropic*  status:5xx|404|>=400|live  "
    "errors  fallbacks  incomplete  live  since:2026-11-01|2h  until:…  -model:x (negate)  "
    "free text searches prompts, answers and reasoning; quote phrases: \"rate limit\""
)

_FLAGS = {"errors", "fallbacks", "incomplete", "live"}
_KEYS = {"model", "provider", "client", "status", "since", "until", "api", "route", "id", "text"}


_like_escape = like_escape
_glob_to_like = glob_to_like


def _parse_time(value: str, key: str, now: datetime) -> str:
    """since:/until: take the same forms as the command line's --since/--until."""
    try:
        return parse_when(value, now)
    except ValueError:
        raise FilterError(f"{key}:{value}: expected {TIME_FORMS}") from None


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
    narrow: list[tuple[str, list[Any]]] = []  # (clause, its parameters) on small columns
    searches: list[tuple[str, list[Any]]] = []  # those reading content, reasoning and prompt
    words: list[str] = []
    texts: list[str] = []
    for token in tokens:
        negate = token.startswith("-") and len(token) > 1 and not token[1].isdigit()
        body = token[1:] if negate else token
        key, sep, value = body.partition(":")
        key = key.lower()
        clause: str
        p: list[Any]
        searches_text = False
        if sep and key in _KEYS:
            if not value:
                raise FilterError(f"{key}: needs a value, e.g. {key}:…")
            if key == "model":
                clause, p = model_clause(value, c)
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
                clause, p = since_clause(_parse_time(value, key, now))
            elif key == "until":
                clause, p = until_clause(_parse_time(value, key, now))
            else:  # text:
                clause, p = _text_clause(value, schema)
                searches_text = True
                if not negate:
                    texts.append(value)
        elif sep and re.fullmatch(r"[a-z_]+", key) and not value.startswith("/"):
            # A typo such as `modle:x` should say so rather than silently search for it.
            known = ", ".join(sorted(_KEYS))
            raise FilterError(f"unknown filter {key}: (known: {known}); search text with a colon as text:\"a:b\"")
        elif not sep and body.lower() in _FLAGS:
            flag = body.lower()
            p = []
            if flag == "errors":
                clause = error_condition(c)
            elif flag == "fallbacks":
                clause = f"{c('attempts')} > 1"
            elif flag == "incomplete":
                clause = f"{c('complete')} = false AND {c('status')} < 400"
            else:  # live
                clause = f"{c('status')} IS NULL AND {c('duration_ms')} IS NULL"
        else:
            if negate:
                clause, p = _text_clause(body, schema)
                searches_text = True
            else:
                words.append(token)
                continue
        if negate:
            # COALESCE so that NULL columns count as "does not match" and survive the NOT.
            clause = f"NOT COALESCE(({clause}), false)"
        (searches if searches_text else narrow).append((clause, p))
    for word in words:
        searches.append(_text_clause(word, schema))
        texts.append(word)
    # Narrow column tests first: DuckDB evaluates an AND left to right on the rows still
    # selected and does not reorder two function calls by cost, so a search placed after
    # `model:x` reads bodies only for the rows the model test kept (measured: 1.9x faster).
    ordered = narrow + searches
    return Filter(text=text, clauses=tuple(cl for cl, _ in ordered),
                  params=tuple(v for _, ps in ordered for v in ps), texts=tuple(texts))


# Free text matches exactly where `col ILIKE '%text%' ESCAPE '\'` would (DuckDB lowercases
# both sides code point by code point, then compares), but that form is the slowest DuckDB
# has: on a million calls it scanned the bodies in ~1.1 s where the forms below take ~0.43 s
# (RE2) and ~0.5 s (lower + contains). A search whose words are everywhere but whose text is
# rare still reads every body (the search index rules out only calls missing a word), so this
# cost is that search's latency.
# Longer text uses lower+contains: RE2's automaton grows with the pattern, and past ~64
# characters it was no faster on the 1M-call DB (and 4x slower on highly repetitive text).
_TEXT_REGEX_MAX = 64

# Code points outside ASCII that DuckDB's lower() turns into an ASCII letter (İ -> i, the
# Kelvin sign -> k). ILIKE matches them against `i`/`k`, so the RE2 class must too;
# test_tui checks this table against DuckDB's own lower() over every code point.
NON_ASCII_LOWERING_TO_ASCII: dict[str, str] = {"i": "\u0130", "k": "\u212a"}


def _fold_regex(text: str) -> str:
    """An RE2 pattern that matches a string exactly when its lower() contains lower(text);
    `text` is ASCII. Every character not a letter or digit is written as \\x{..}, so nothing
    the user types is a regex operator."""
    out: list[str] = []
    for ch in text:
        low = ch.lower()
        if "a" <= low <= "z":
            extra = "".join(f"\\x{{{ord(x):x}}}" for x in NON_ASCII_LOWERING_TO_ASCII.get(low, ""))
            out.append(f"[{low}{low.upper()}{extra}]")
        elif "0" <= ch <= "9":
            out.append(ch)
        else:
            out.append(f"\\x{{{ord(ch):x}}}")
    return "".join(out)


def _text_clause(value: str, schema: Schema) -> tuple[str, list[Any]]:
    cols = (schema.col("content"), schema.col("reasoning"), schema.col("prompt"))
    if value.isascii() and len(value) <= _TEXT_REGEX_MAX:
        rx = _fold_regex(value)
        return " OR ".join(f"regexp_matches({col}, ?)" for col in cols), [rx] * len(cols)
    # Other scripts: DuckDB's lower() on both sides is ILIKE's own definition.
    return " OR ".join(f"contains(lower({col}), lower(?))" for col in cols), [value] * len(cols)


# -- the search index -------------------------------------------------------------------------
# Past this many separate id ranges the text is common enough that the windowed search finds a
# page of it early, and a long OR would cost more than it saves (each range ~9 ms when empty).
INDEX_MAX_RANGES = 24


def _term_test(run: str, left: bool, right: bool) -> tuple[str, list[Any]]:
    """A test on `_search_terms.term` true for some term of every chunk holding a body that
    contains the run (see recorder/search_index.py): the whole word where a separator bounds
    the run on both sides, else a word or piece starting, ending or containing it; '' and '*'
    stand for words too long to be sure of."""
    n = len(run)
    if left and right:
        return ("term = lower(?)", [run]) if n <= MAX_TERM else ("term IN ('', '*')", [])
    if left or right:
        fn = "starts_with" if left else "ends_with"
        return (f"(term = '*' OR {fn}(term, lower(?)))", [run]) if n <= MAX_TERM else ("term IN ('', '*')", [])
    markers = "term = '*'" if n <= PIECE_STEP + 1 else "term IN ('', '*')"
    return f"({markers} OR contains(term, lower(?)))", [run]


def index_clause(reader: Reader, schema: Schema, flt: Filter) -> tuple[str, list[Any]] | None:
    """A clause on `id` that keeps only the calls the search index cannot rule out for
    `flt.texts`, or None when it rules out nothing worth saying (no index, no words in the
    text, or matches in too many places)."""
    if not schema.has_search_index or not flt.texts:
        return None
    tests = [_term_test(*run) for text in flt.texts for run in split_words(text)]
    if not tests:
        return None  # punctuation only: every call may hold it
    any_sql = " OR ".join(t for t, _ in tests)
    all_sql = " AND ".join(f"bool_or({t})" for t, _ in tests)
    params = [p for _, ps in tests for p in ps]
    _, rows = reader.query(
        f"SELECT after_id, last_id, chunk IN (SELECT chunk FROM _search_terms WHERE {any_sql} "
        f"GROUP BY chunk HAVING {all_sql}) FROM _search_chunks ORDER BY after_id",
        params + params)
    if not rows:
        return None
    # Ranges (after, last] to read: chunks with a hit, gaps no chunk covers, and the calls
    # after the last chunk (last = None).
    ranges: list[list[str | None]] = []
    pos = ""
    for after, last, hit in rows:
        after, last = str(after), str(last)
        if after > pos:
            ranges.append([pos, after])  # a gap: read it
        if hit:
            ranges.append([after, last])
        pos = max(pos, last)
    ranges.append([pos, None])
    merged: list[list[str | None]] = []
    for lo, hi in ranges:
        if merged and merged[-1][1] is not None and merged[-1][1] >= lo:  # type: ignore[operator]
            merged[-1][1] = hi
        else:
            merged.append([lo, hi])
    if len(merged) > INDEX_MAX_RANGES or (len(merged) == 1 and merged[0][0] == ""):
        return None
    parts: list[str] = []
    out: list[Any] = []
    for lo, hi in merged:
        if hi is None:
            parts.append("id > ?")
            out.append(lo)
        else:
            parts.append("(id > ? AND id <= ?)")
            out += [lo, hi]
    return " OR ".join(parts), out


def narrow_by_index(reader: Reader, schema: Schema, flt: Filter) -> Filter:
    """`flt` with index_clause's restriction in front (a narrow test on id, so it runs first)."""
    found = index_clause(reader, schema, flt)
    if found is None:
        return flt
    clause, params = found
    return Filter(text=flt.text, clauses=(clause, *flt.clauses), params=(*params, *flt.params), texts=flt.texts)


# -- queries --------------------------------------------------------------------------------
def page_sql(schema: Schema, flt: Filter, before_id: str | None, limit: int = PAGE_SIZE,
             from_id: str | None = None) -> tuple[str, list[Any]]:
    """Keyset pagination on the ULID id: newest first, `id < last seen` for the next page,
    and optionally only ids >= `from_id` (one window, see load_page).

    OFFSET would rescan every skipped row; a key bound lets DuckDB prune by zone maps."""
    clauses: list[str] = []
    params: list[Any] = []
    if from_id is not None:
        clauses.append("id >= ?")
        params.append(from_id)
    if before_id is not None:
        clauses.append("id < ?")
        params.append(before_id)
    clauses += flt.clauses
    params += flt.params
    where = (" WHERE " + " AND ".join(f"({c})" for c in clauses)) if clauses else ""
    sql = f"SELECT {schema.select_list(LIST_COLUMNS)} FROM calls{where} ORDER BY id DESC LIMIT {int(limit)}"
    return sql, params


# -- newest-first windows -----------------------------------------------------------------------
# `ORDER BY id DESC LIMIT n` must test every row before it knows the newest n matches, so a
# filter that matches plenty of recent calls still paid for a scan of the whole year. A page is
# therefore looked for in windows of ids, newest first: the newest WINDOW_OFFSETS[0] calls,
# then up to the WINDOW_OFFSETS[1]-th newest, then the rest, stopping once the page is full.
# Rows come out exactly as from the one query (ids are unique; each window is newest first and
# older than the one before). Row groups outside a window are skipped by zone maps on id.
# Few windows, a small first one, and the rest in one go once the matches look too sparse to
# fill the page from the next window: a search matching nothing still reads everything, and
# each window is one more query and a scan of fewer row groups than cores. Measured on 1M
# calls: a common word answers in ~12 ms instead of ~85 ms; a search matching nothing costs
# ~3% more than one query (it was ~10% with 50k / 200k / rest windows and no merging).
WINDOW_OFFSETS: tuple[int, ...] = (10_000, 250_000)
WINDOW_BOUND_SQL = "SELECT id FROM calls ORDER BY id DESC LIMIT 1 OFFSET ?"


def window_bounds(reader: Reader, offsets: Sequence[int] | None = None) -> tuple[str, ...]:
    """The ids at `offsets` (default WINDOW_OFFSETS) from the newest call, newest first; fewer
    on a small table.

    Any ids would do for correctness: they only decide where one window ends and the next
    begins. Computed once and reused, they go stale gently (new calls widen the first window)."""
    bounds: list[str] = []
    for offset in WINDOW_OFFSETS if offsets is None else offsets:
        _, rows = reader.query(WINDOW_BOUND_SQL, [int(offset)])
        if not rows:
            break
        bounds.append(str(rows[0][0]))
    return tuple(sorted(set(bounds), reverse=True))


def windows(bounds: Sequence[str], before_id: str | None,
            offsets: Sequence[int] | None = None) -> list[tuple[str | None, str | None, int | None]]:
    """(from_id inclusive, before_id exclusive, about how many calls) of each window still to
    search, newest first; None is open-ended (and the last window's size unknown). Windows
    wholly newer than `before_id` are left out. `bounds` are window_bounds(…, offsets)."""
    offsets = WINDOW_OFFSETS if offsets is None else offsets
    edges: list[str | None] = [None, *bounds, None]
    sizes: list[int | None] = [b - a for a, b in zip((0, *offsets), offsets[:len(bounds)])]
    out: list[tuple[str | None, str | None, int | None]] = []
    for upper, lower, size in zip(edges, edges[1:], [*sizes, None]):
        if before_id is not None:
            if lower is not None and lower >= before_id:
                continue
            if upper is None or before_id < upper:
                upper = before_id
        out.append((lower, upper, size))
    return out


@dataclass
class Page:
    columns: list[str]
    rows: list[tuple]
    exhausted: bool  # no older call matches: the list ends here
    windows: int = 0  # window queries it took
    sql_s: float = 0.0


def load_page(reader: Reader, schema: Schema, flt: Filter, before_id: str | None, bounds: Sequence[str],
              limit: int | None = None, *, offsets: Sequence[int] | None = None,
              on_rows: Callable[[list[str], list[tuple]], None] | None = None,
              cancelled: Callable[[], bool] | None = None) -> Page | None:
    """The next `limit` calls the filter admits, older than `before_id`, newest first, searched
    window by window. `on_rows` gets each window's rows while later windows are still to be
    searched (so a rare match shows before the scan ends); the returned page holds all rows.
    None when `cancelled()` turned true between two windows."""
    limit = PAGE_SIZE if limit is None else limit
    t0 = time.perf_counter()
    flt = narrow_by_index(reader, schema, flt)
    sql_s = time.perf_counter() - t0
    columns: list[str] = []
    found: list[tuple] = []
    plan = windows(bounds, before_id, offsets)
    searched = 0  # calls in the windows searched so far, about
    n = 0
    while plan:
        if cancelled is not None and cancelled():
            return None
        lower, upper, size = plan.pop(0)
        sql, params = page_sql(schema, flt, upper, limit - len(found), from_id=lower)
        t0 = time.perf_counter()
        columns, rows = reader.query(sql, params)
        sql_s += time.perf_counter() - t0
        n += 1
        searched += size or 0
        found += rows
        if len(found) >= limit:
            return Page(columns, found, exhausted=False, windows=n, sql_s=sql_s)
        if not plan:
            break
        next_size = plan[0][2]
        # At the density seen so far, would the next window fill the page? If not (certainly
        # not after finding nothing), search everything older in one query: one scan of all
        # cores instead of several smaller ones, each partly on one core.
        if next_size is not None and (limit - len(found)) * searched > next_size * len(found):
            plan = [(None, plan[0][1], None)]
        if rows and on_rows is not None:
            on_rows(columns, rows)
    return Page(columns, found, exhausted=True, windows=n, sql_s=sql_s)


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


STATS_MAX_ROWS = 500  # groups drawn in the stats table; the busiest come first


def stats(reader: Reader, schema: Schema, flt: Filter) -> list[dict[str, Any]]:
    """Per model and provider, as `llmtap stats` computes them (recorder.stats)."""
    return stats_rows(reader, flt.where_sql, flt.params, schema.calls, limit=STATS_MAX_ROWS)


# Bucket widths for the stats charts, in ms: the first that cuts the filtered calls' time
# range into at most CHART_BUCKETS buckets.
BUCKET_STEPS_MS: tuple[tuple[int, str], ...] = tuple((s * 1000, label) for s, label in (
    (1, "1 s"), (5, "5 s"), (15, "15 s"), (60, "1 min"), (300, "5 min"), (900, "15 min"), (3600, "1 h"),
    (3 * 3600, "3 h"), (6 * 3600, "6 h"), (12 * 3600, "12 h"), (86400, "1 day"), (7 * 86400, "1 week"),
    (30 * 86400, "30 days"), (365 * 86400, "1 year")))
CHART_BUCKETS = 60


def time_range_sql(schema: Schema, flt: Filter) -> tuple[str, list[Any]]:
    """(first, last) start of the filtered calls, as epoch ms."""
    started = schema.col("started_at")
    return (f"SELECT min(epoch_ms({started})), max(epoch_ms({started})) FROM calls{_where(flt)}",
            list(flt.params))


def pick_bucket(first_ms: int, last_ms: int, max_buckets: int = CHART_BUCKETS) -> tuple[int, int, str]:
    """(start, width, label) of buckets covering [first, last]: the narrowest step that needs
    no more than `max_buckets`, starting on a multiple of the width (whole hours, days...)."""
    for width, label in BUCKET_STEPS_MS:
        start = first_ms - first_ms % width
        if (last_ms - start) // width + 1 <= max_buckets:
            return start, width, label
    width, label = BUCKET_STEPS_MS[-1]
    return first_ms - first_ms % width, width, label


def activity_sql(schema: Schema, flt: Filter, start_ms: int, width_ms: int) -> tuple[str, list[Any]]:
    """Per time bucket of the filtered calls: calls, errors, p95 duration (finished calls)."""
    c = schema.col
    sql = (f"SELECT CAST((epoch_ms({c('started_at')}) - ?) // ? AS BIGINT) AS b, count(*) AS calls, "
           f"count(*) FILTER (WHERE {error_condition(c)}) AS errors, "
           f"quantile_cont({c('duration_ms')}, 0.95) AS p95 "
           f"FROM calls{_where(flt)} GROUP BY b ORDER BY b")
    return sql, [int(start_ms), int(width_ms), *flt.params]


def latency_histogram_sql(schema: Schema, flt: Filter) -> tuple[str, list[Any]]:
    """Duration counts in power-of-two buckets (bucket b holds [2^b, 2^(b+1)) ms)."""
    d = schema.col("duration_ms")
    clauses = [f"{d} IS NOT NULL", *flt.clauses]
    where = " WHERE " + " AND ".join(f"({c})" for c in clauses)
    sql = (f"SELECT CAST(floor(log2(greatest({d}, 1))) AS INTEGER) AS b, count(*) FROM calls{where} "
           "GROUP BY b ORDER BY b")
    return sql, list(flt.params)
