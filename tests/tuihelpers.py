"""A reader over a DuckDB connection for the UI tests, and helpers to build DB files.

`DuckReader` fulfils the interface of llmtap.recorder.reader's readers (query, events_after,
partial, export, close) so tests can drive the UI deterministically: they insert rows and
`publish()` events the way a running recorder would.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb

from llmtap.recorder.record import new_id
from llmtap.recorder.schema import migrate


class DuckReader:
    """Read (and, for tests, write) one DuckDB file; events are published by the test."""

    kind = "local"

    def __init__(self, path: Path | str, *, do_migrate: bool = True) -> None:
        self.path = Path(path)
        self.con = duckdb.connect(str(path))
        if do_migrate:
            migrate(self.con)
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._events: list[dict] = []
        self.partials: dict[str, dict] = {}
        self.queries: list[str] = []

    # -- the reader interface ---------------------------------------------------------------
    def query(self, sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]:
        with self._lock:  # a cursor per call: DuckDB connections are not shared across threads
            cur = self.con.cursor()
            self.queries.append(sql)
        try:
            res = cur.execute(sql, params or [])
            cols = [d[0] for d in res.description or []]
            return cols, res.fetchall()
        finally:
            cur.close()

    def events_after(self, seq: int, timeout: float) -> tuple[int, list[dict]]:
        with self._cond:
            self._cond.wait_for(lambda: len(self._events) > seq, timeout)
            return len(self._events), list(self._events[seq:])

    def latest_seq(self) -> int:
        with self._cond:
            return len(self._events)

    def partial(self, call_id: str) -> dict | None:
        return self.partials.get(call_id)

    def export(self, out: Path, fmt: str, *, since: Any = None, until: Any = None, model: Any = None,
               where_sql: str | None = None, params: list | None = None,
               progress: Callable[[int, int], None] | None = None) -> int:
        where = f" WHERE {where_sql}" if where_sql else ""
        _, rows = self.query(f"SELECT count(*) FROM calls{where}", list(params or []))
        total = int(rows[0][0])
        if progress:
            progress(0, total)
        with self._lock:
            cur = self.con.cursor()
        try:
            target = str(out).replace("'", "''")
            cur.execute(f"COPY (SELECT * FROM calls{where} ORDER BY id) TO '{target}' (FORMAT {fmt})",
                        list(params or []))
        finally:
            cur.close()
        if progress:
            progress(total, total)
        return total

    def close(self) -> None:
        self.con.close()

    # -- test helpers -----------------------------------------------------------------------
    def publish(self, kind: str, call_id: str) -> None:
        with self._cond:
            self._events.append({"seq": len(self._events) + 1, "kind": kind, "id": call_id})
            self._cond.notify_all()

    def insert(self, **fields: Any) -> str:
        row = call_row(**fields)
        cols = [c for c in row if c != "_attempts"]
        with self._lock:
            cur = self.con.cursor()
        try:
            cur.execute(f"INSERT INTO calls ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                        [row[c] for c in cols])
            for att in row.get("_attempts") or []:
                acols = list(att)
                cur.execute(f"INSERT INTO attempts ({', '.join(acols)}) VALUES ({', '.join('?' for _ in acols)})",
                            [att[c] for c in acols])
        finally:
            cur.close()
        return str(row["id"])

    def update(self, call_id: str, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            cur = self.con.cursor()
        try:
            cur.execute(f"UPDATE calls SET {sets} WHERE id = ?", [*_jsonify(fields).values(), call_id])
        finally:
            cur.close()


def _jsonify(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in fields.items()}


BASE_TIME = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)


def call_row(**overrides: Any) -> dict[str, Any]:
    """A finished, successful OpenAI chat call; override any column."""
    started = overrides.pop("started_at", None) or datetime.now(timezone.utc)
    body = {
        "model": overrides.get("model_requested", "gpt-4o"),
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hi"},
        ],
    }
    row: dict[str, Any] = {
        "id": new_id(int(started.timestamp() * 1000)),
        "started_at": started,
        "client": "openai-python/1.50",
        "api": "openai.chat",
        "method": "POST",
        "url": "http://127.0.0.1:8081/openai/chat/completions",
        "status": 200,
        "model_requested": "gpt-4o",
        "model_sent": "gpt-4o",
        "model_reported": "gpt-4o-2024-08-06",
        "provider": "openai",
        "attempts": 1,
        "stream": False,
        "complete": True,
        "ttfb_ms": 120.0,
        "duration_ms": 450.0,
        "request_headers": {"content-type": "application/json", "authorization": "Bearer sk-…REDACTED"},
        "request_body": json.dumps(body),
        "response_headers": {"content-type": "application/json"},
        "response_body": json.dumps({"choices": [{"message": {"role": "assistant", "content": "hi"}}]}),
        "reasoning": "The user wants a greeting.",
        "content": "hi",
        "tool_calls": None,
        "finish_reason": "stop",
        "input_tokens": 12,
        "output_tokens": 2,
        "reasoning_tokens": 8,
        "total_tokens": 22,
    }
    row.update(overrides)
    return _jsonify({k: v for k, v in row.items() if k != "_attempts"}) | (
        {"_attempts": row["_attempts"]} if "_attempts" in row else {})


def make_reader(tmp_path: Path, rows: list[dict[str, Any]] | None = None, name: str = "t.duckdb") -> DuckReader:
    reader = DuckReader(tmp_path / name)
    for i, fields in enumerate(rows or []):
        fields = dict(fields)
        fields.setdefault("started_at", BASE_TIME + timedelta(seconds=i))
        reader.insert(**fields)
    return reader
