"""The columns of `calls` and `attempts`: one specification for the whole program.

The migrations create the tables from it (schema.py), the recorder turns a row built by name
into the appender's tuple in its order (recorder.py), and readers take their column lists
from it (the UI's query.py). The order here is the tables' physical order, which is the order
the appender writes positionally, so a column is only ever added at the end, tagged with the
migration that adds it; a migration that has shipped keeps producing exactly what it did
(test_recorder freezes m001's tables).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from typing import Any

M001 = "m001_calls_and_attempts"
M003 = "m003_prompt"
M004 = "m004_usage"


@dataclass(frozen=True)
class Column:
    name: str
    sql: str  # type and constraints, as written in CREATE TABLE / ALTER TABLE ADD COLUMN
    added_in: str  # the migration that creates the column
    note: str = ""  # what a user writing SQL needs to know


CALLS: tuple[Column, ...] = tuple(Column(n, s, M001, note) for n, s, note in (
    ("id", "VARCHAR PRIMARY KEY", "ULID: sorts by start time"),
    ("started_at", "TIMESTAMPTZ NOT NULL", ""),
    ("client", "VARCHAR", "User-Agent"),
    ("api", "VARCHAR NOT NULL", "the dialect (llmtap.dialects.registry.names()): openai.chat, anthropic.messages, ..., other"),
    ("method", "VARCHAR NOT NULL", ""),
    ("url", "VARCHAR NOT NULL", "as the client addressed it, secrets redacted"),
    ("status", "INTEGER", "what the client got; NULL while in progress"),
    ("model_requested", "VARCHAR", ""),
    ("model_sent", "VARCHAR", ""),
    ("model_reported", "VARCHAR", "what the upstream says answered"),
    ("provider", "VARCHAR", ""),
    ("route", "VARCHAR", "matching rule, NULL when none matched"),
    ("attempts", "INTEGER NOT NULL DEFAULT 0", ""),
    ("stream", "BOOLEAN", ""),
    ("complete", "BOOLEAN", "ended the way its API ends a good answer"),
    ("ttfb_ms", "DOUBLE", ""),
    ("duration_ms", "DOUBLE", "NULL while in progress"),
    ("request_headers", "JSON", "redacted"),
    ("request_body", "VARCHAR", "NULL when not UTF-8: see request_body_raw"),
    ("response_headers", "JSON", "redacted"),
    ("response_body", "VARCHAR", "bytes the client received, as text"),
    ("reasoning", "VARCHAR", ""),
    ("content", "VARCHAR", ""),
    ("tool_calls", "JSON", "[{id, name, arguments}], arguments verbatim"),
    ("finish_reason", "VARCHAR", ""),
    ("input_tokens", "BIGINT", "all input, cache reads and writes included"),
    ("output_tokens", "BIGINT", "reasoning included"),
    ("reasoning_tokens", "BIGINT", ""),
    ("total_tokens", "BIGINT", ""),
    ("error", "VARCHAR", ""),
    ("notes", "JSON", "list of what went wrong while recording"),
    ("request_body_raw", "BLOB", "only when the body is not valid UTF-8"),
    ("response_body_raw", "BLOB", "likewise"),
)) + (
    Column("prompt", "VARCHAR", M003, "what this call added as text: system prompt and new messages"),
) + (
    # Usage as every dialect normalises it (llmtap.dialects.shapes.Usage). input_tokens counts
    # cache reads and writes too, in every dialect (since m004: Anthropic's input_tokens was its
    # own field alone before), and output_tokens counts reasoning (Gemini's thoughts, since m004).
    Column("cache_read_tokens", "BIGINT", M004, "input tokens read from the provider's prompt cache (in input_tokens)"),
    Column("cache_write_tokens", "BIGINT", M004, "input tokens written to the prompt cache (in input_tokens)"),
    Column("usage_raw", "JSON", M004, "the provider's final usage object as sent, redacted; NULL before m004"),
)

ATTEMPTS: tuple[Column, ...] = tuple(Column(n, s, M001, note) for n, s, note in (
    ("call_id", "VARCHAR NOT NULL", ""),
    ("n", "INTEGER NOT NULL", "1-based order in the fallback chain"),
    ("provider", "VARCHAR", ""),
    ("url", "VARCHAR NOT NULL", ""),
    ("model_sent", "VARCHAR", ""),
    ("status", "INTEGER", "NULL when no response arrived"),
    ("error", "VARCHAR", ""),
    ("started_at", "TIMESTAMPTZ NOT NULL", ""),
    ("duration_ms", "DOUBLE", ""),
    ("ttfb_ms", "DOUBLE", ""),
))

TABLES: dict[str, tuple[Column, ...]] = {"calls": CALLS, "attempts": ATTEMPTS}

CALL_COLUMNS: tuple[str, ...] = tuple(c.name for c in CALLS)
ATTEMPT_COLUMNS: tuple[str, ...] = tuple(c.name for c in ATTEMPTS)
# Columns a reader gets as a timestamp (the UI asks for them as epoch ms).
TIME_COLUMNS: frozenset[str] = frozenset(c.name for cols in TABLES.values() for c in cols
                                         if c.sql.startswith("TIMESTAMPTZ"))


def create_table(table: str, migration: str) -> str:
    """CREATE TABLE for the columns `migration` creates (the first migration of `table`)."""
    cols = [c for c in TABLES[table] if c.added_in == migration]
    return f"CREATE TABLE {table} (\n" + ",\n".join(f"    {c.name} {c.sql}" for c in cols) + "\n)"


def add_columns(table: str, migration: str) -> list[str]:
    """ALTER TABLE … ADD COLUMN for the columns a later `migration` adds to `table`."""
    return [f"ALTER TABLE {table} ADD COLUMN {c.name} {c.sql}" for c in TABLES[table] if c.added_in == migration]


def _tuple_of(names: tuple[str, ...]) -> Any:
    get = itemgetter(*names)
    n = len(names)

    def to_tuple(row: dict[str, Any]) -> tuple:
        # itemgetter raises KeyError for a column the row lacks; the length check catches a
        # name the table does not have (a typo would otherwise be dropped silently).
        if len(row) != n:
            extra = sorted(set(row) - set(names)) or sorted(set(names) - set(row))
            raise KeyError(f"row does not match the column specification (recorder/columns.py): {extra}")
        return get(row)

    return to_tuple


# A row built by name -> the appender's tuple, in the table's order. The one place that order is used.
call_tuple = _tuple_of(CALL_COLUMNS)
attempt_tuple = _tuple_of(ATTEMPT_COLUMNS)
