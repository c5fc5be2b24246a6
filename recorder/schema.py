"""The DuckDB schema, created and upgraded by numbered migrations applied on open.

Column names of `calls` and `attempts` are a contract: users write SQL against them. Fix
mistakes forward with a new migration; never edit one that has shipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import duckdb

Migration = tuple[str, Callable[[duckdb.DuckDBPyConnection], None]]


def _m001_calls_and_attempts(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        """
        CREATE TABLE calls (
            id               VARCHAR PRIMARY KEY,  -- ULID: sorts by start time
            started_at       TIMESTAMPTZ NOT NULL,
            client           VARCHAR,              -- User-Agent
            api              VARCHAR NOT NULL,     -- openai.chat, openai.responses, anthropic.messages,
                                                   -- ollama.chat, gemini.generate, other
            method           VARCHAR NOT NULL,
            url              VARCHAR NOT NULL,     -- as the client addressed it, secrets redacted
            status           INTEGER,              -- what the client got; NULL while in progress
            model_requested  VARCHAR,
            model_sent       VARCHAR,
            model_reported   VARCHAR,              -- what the upstream says answered
            provider         VARCHAR,
            route            VARCHAR,              -- matching rule, NULL when none matched
            attempts         INTEGER NOT NULL DEFAULT 0,
            stream           BOOLEAN,
            complete         BOOLEAN,              -- ended the way its API ends a good answer
            ttfb_ms          DOUBLE,
            duration_ms      DOUBLE,               -- NULL while in progress
            request_headers  JSON,                 -- redacted
            request_body     VARCHAR,              -- NULL when not UTF-8: see request_body_raw
            response_headers JSON,                 -- redacted
            response_body    VARCHAR,              -- bytes the client received, as text
            reasoning        VARCHAR,
            content          VARCHAR,
            tool_calls       JSON,                 -- [{id, name, arguments}], arguments verbatim
            finish_reason    VARCHAR,
            input_tokens     BIGINT,
            output_tokens    BIGINT,
            reasoning_tokens BIGINT,
            total_tokens     BIGINT,
            error            VARCHAR,
            notes            JSON,                 -- list of what went wrong while recording
            request_body_raw  BLOB,                -- only when the body is not valid UTF-8
            response_body_raw BLOB                 -- likewise
        )
        """
    )
    con.execute(
        """
        CREATE TABLE attempts (
            call_id     VARCHAR NOT NULL,
            n           INTEGER NOT NULL,          -- 1-based order in the fallback chain
            provider    VARCHAR,
            url         VARCHAR NOT NULL,
            model_sent  VARCHAR,
            status      INTEGER,                   -- NULL when no response arrived
            error       VARCHAR,
            started_at  TIMESTAMPTZ NOT NULL,
            duration_ms DOUBLE,
            ttfb_ms     DOUBLE
        )
        """
    )
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
    con.execute("ALTER TABLE calls ADD COLUMN prompt VARCHAR")


MIGRATIONS: list[Migration] = [
    ("m001_calls_and_attempts", _m001_calls_and_attempts),
    ("m002_search_index", _m002_search_index),
    ("m003_prompt", _m003_prompt),
]

SCHEMA_VERSION = len(MIGRATIONS)


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
