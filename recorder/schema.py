"""The DuckDB schema, created and upgraded by numbered migrations applied on open.

Column names of `calls` and `attempts` are a contract: users write SQL against them. Fix
mistakes forward with a new migration; never edit one that has shipped. Their columns are
specified in columns.py: a new column is appended there tagged with a new migration, whose
step runs `columns.add_columns(table, name)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import duckdb

from llmtap.recorder.columns import M001, TABLES, add_columns, create_table

Migration = tuple[str, Callable[[duckdb.DuckDBPyConnection], None]]


def _m001_calls_and_attempts(con: duckdb.DuckDBPyConnection) -> None:
    # From the column specification's m001 columns; test_recorder checks the tables it makes
    # against a frozen copy of what m001 has always made.
    con.execute(create_table("calls", M001))
    con.execute(create_table("attempts", M001))
    con.execute(
        """
        CREATE TABLE dropped (
            dropped_at TIMESTAMPTZ NOT NULL,
            count      BIGINT NOT NULL,            -- records lost to a full buffer
            reason     VARCHAR NOT NULL
        )
        """
    )


def _m002_search_index(con: duckdb.DuckDBPyConnection) -> None:
    # Internal (underscore): the recorder rebuilds what is missing; see search_index.py.
    con.execute(
        """
        CREATE TABLE _search_chunks (
            chunk    INTEGER PRIMARY KEY,
            after_id VARCHAR NOT NULL,                 -- covers calls with after_id < id <= last_id
            last_id  VARCHAR NOT NULL,
            calls    BIGINT NOT NULL,
            level    INTEGER NOT NULL,                 -- 0 as built, +1 per merge of MERGE_FANIN
            built_at TIMESTAMPTZ NOT NULL
        )
        """
    )
    con.execute("CREATE TABLE _search_terms (chunk INTEGER NOT NULL, term VARCHAR NOT NULL)")


def _m003_prompt(con: duckdb.DuckDBPyConnection) -> None:
    # The text parts of what the client sent (system prompt and messages, see
    # extract.prompt_text), so a free-text search finds a call by its prompt. Calls recorded
    # before this migration keep NULL: their bodies are not parsed again.
    for statement in add_columns("calls", "m003_prompt"):
        con.execute(statement)


def _m004_usage(con: duckdb.DuckDBPyConnection) -> None:
    # Cache tokens and the provider's own usage object, read by each dialect (llmtap.dialects):
    # what pricing needs. Calls recorded before keep NULL.
    for statement in add_columns("calls", "m004_usage"):
        con.execute(statement)


def _m005_cost(con: duckdb.DuckDBPyConnection) -> None:
    # What a call cost and where that figure came from (recorder/pricing.py). Calls recorded
    # before keep NULL until `llmtap cost backfill` prices them.
    for statement in add_columns("calls", "m005_cost"):
        con.execute(statement)
def _m006_sessions(con: duckdb.DuckDBPyConnection) -> None:
    # Calls recorded before keep NULL sessions: they are not grouped again.
    from llmtap.recorder.sessions import SESSION_COLUMNS

    for statement in add_columns("calls", "m006_sessions"):
        con.execute(statement)
    con.execute("CREATE TABLE sessions (\n" + ",\n".join(f"    {n} {s}" for n, s, _ in SESSION_COLUMNS) + "\n)")


def _m007_spool_import(con: duckdb.DuckDBPyConnection) -> None:
    # Which bytes of which spool the last committed part of an import took (Recorder._import_spool).
    con.execute("CREATE TABLE _spool_import (ino BIGINT, start BIGINT, stop BIGINT, crc BIGINT)")


MIGRATIONS: list[Migration] = [
    ("m001_calls_and_attempts", _m001_calls_and_attempts),
    ("m002_search_index", _m002_search_index),
    ("m003_prompt", _m003_prompt),
    ("m004_usage", _m004_usage),
    ("m005_cost", _m005_cost),
    ("m006_sessions", _m006_sessions),
    ("m007_spool_import", _m007_spool_import),
]

SCHEMA_VERSION = len(MIGRATIONS)


def _check_spec() -> None:
    """Columns are only ever appended: the appender writes them in the spec's order, which must
    be the tables' physical order (creation order)."""
    order = {name: i for i, (name, _) in enumerate(MIGRATIONS)}
    for table, cols in TABLES.items():
        steps = [order.get(c.added_in, -1) for c in cols]
        for c, step in zip(cols, steps):
            if step < 0:
                raise RuntimeError(f"recorder/columns.py: {table}.{c.name} is added in {c.added_in!r}, "
                                   "which is not in schema.MIGRATIONS")
        if steps != sorted(steps):
            raise RuntimeError(f"recorder/columns.py: {table}'s columns must be listed in the order "
                               "their migrations add them (append new columns at the end)")


_check_spec()


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """BEGIN … COMMIT; rolled back when anything inside raises (the error goes on)."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        try:
            con.execute("ROLLBACK")
        except Exception:  # the connection itself is gone: nothing left to undo
            pass
        raise


def migrate(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Apply every migration not yet recorded in `_migrations`; return the names applied."""
    con.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMPTZ DEFAULT now())"
    )
    done = {row[0] for row in con.execute("SELECT name FROM _migrations").fetchall()}
    applied: list[str] = []
    for name, fn in MIGRATIONS:
        if name in done:
            continue
        with transaction(con):
            fn(con)
            con.execute("INSERT INTO _migrations (name) VALUES (?)", [name])
        applied.append(name)
    return applied
