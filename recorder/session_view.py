"""Reading sessions back: the list, the share failed per client, one session's calls.

The one place these are queried: `llmtap sessions` and the UI's sessions view both call these
through a Reader, so they show the same sessions. Values travel as parameters.
"""

from __future__ import annotations

from typing import Any

from llmtap.recorder.filters import glob_to_like
from llmtap.recorder.reader import Reader

PAGE = 50
# What a session's timeline shows of each call.
CALL_FIELDS: tuple[str, ...] = ("id", "started_at", "turn", "session_link", "parent_call_id", "model_requested",
                                "model_sent", "provider", "status", "complete", "attempts", "duration_ms",
                                "input_tokens", "output_tokens", "tool_calls", "prompt", "content", "error")


def has_sessions(reader: Reader) -> bool:
    _, rows = reader.query("SELECT count(*) FROM information_schema.tables WHERE table_name = 'sessions' "
                           "AND table_schema = 'main'")
    return bool(rows and rows[0][0])


def _where(since: str | None, client: str | None, failed: bool) -> tuple[str, list[Any]]:
    parts, params = ["TRUE"], []
    if since:
        parts.append("ended_at >= CAST(? AS TIMESTAMPTZ)")
        params.append(since)
    if client:
        parts.append("client ILIKE ? ESCAPE '\\'")
        params.append(glob_to_like(client if any(c in client for c in "*?") else f"*{client}*"))
    if failed:
        parts.append("failed")
    return " AND ".join(parts), params


def list_sessions(reader: Reader, *, since: str | None = None, client: str | None = None, failed: bool = False,
                  limit: int | None = PAGE, offset: int = 0) -> list[dict[str, Any]]:
    """Sessions newest first (by their first call), as dicts of the `sessions` columns."""
    if not has_sessions(reader):
        return []
    where, params = _where(since, client, failed)
    cut = f"LIMIT {int(limit)} OFFSET {int(offset)}" if limit is not None else ""
    cols, rows = reader.query(f"SELECT * FROM sessions WHERE {where} ORDER BY started_at DESC, id DESC {cut}", params)
    return [dict(zip(cols, r)) for r in rows]


def failed_share(reader: Reader, *, since: str | None = None, client: str | None = None) -> list[dict[str, Any]]:
    """Per client: sessions, failed sessions and their share, most sessions first."""
    if not has_sessions(reader):
        return []
    where, params = _where(since, client, False)
    cols, rows = reader.query(
        f"SELECT coalesce(client, '-') AS client, count(*) AS sessions, count(*) FILTER (WHERE failed) AS failed, "
        f"count(*) FILTER (WHERE failed) / count(*) AS failed_share FROM sessions WHERE {where} "
        "GROUP BY 1 ORDER BY 2 DESC, 1", params)
    return [dict(zip(cols, r)) for r in rows]


def find_session(reader: Reader, ref: str) -> dict[str, Any] | None:
    """A session by its id, or by the id or label that names it (`llmtap wrap --session NAME`),
    the newest of that name."""
    if not has_sessions(reader):
        return None
    cols, rows = reader.query("SELECT * FROM sessions WHERE id = ? OR key = ? OR key LIKE ? ESCAPE '\\' "
                              "ORDER BY id = ? DESC, started_at DESC LIMIT 1",
                              [ref, ref, "%=" + ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_"),
                               ref])
    return dict(zip(cols, rows[0])) if rows else None


def session_calls(reader: Reader, session: dict[str, Any]) -> list[dict[str, Any]]:
    """The calls of a session in order. A call's id is never before its session's (the id of
    its first call): the bound lets DuckDB skip the older part of the file."""
    names = {str(r[0]) for r in reader.query("SELECT column_name FROM information_schema.columns "
                                             "WHERE table_name = 'calls' AND table_schema = 'main'")[1]}
    select = ", ".join(f if f in names else f"NULL AS {f}" for f in CALL_FIELDS)
    cols, rows = reader.query(f"SELECT {select} FROM calls WHERE id >= ? AND session_id = ? ORDER BY turn, id",
                              [session["id"], session["id"]])
    return [dict(zip(cols, r)) for r in rows]
