"""Filter clauses shared by the command line and the terminal UI.

`llmtap stats --since 2h --model 'gpt-4o*'` and the UI's `since:2h model:gpt-4o*` compile to the
same SQL here, so the two give the same numbers for the same filter. Values travel as query
parameters, never in the SQL text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Column = Callable[[str], str]  # a column reference, or "NULL" when the open DB predates it

MODEL_COLUMNS: tuple[str, ...] = ("model_requested", "model_sent", "model_reported")


def like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def glob_to_like(text: str) -> str:
    return like_escape(text).replace("*", "%").replace("?", "_")


def _plain(name: str) -> str:
    return name


def model_clause(glob: str, col: Column = _plain) -> tuple[str, list[Any]]:
    """Calls whose model asked for, sent or reported matches `glob` (`*`, `?`), ignoring case."""
    like = glob_to_like(glob)
    return " OR ".join(f"{col(m)} ILIKE ? ESCAPE '\\'" for m in MODEL_COLUMNS), [like] * len(MODEL_COLUMNS)


def since_clause(when: str) -> tuple[str, list[Any]]:
    """Calls started at or after `when` (an ISO timestamp, see times.parse_when)."""
    return "started_at >= CAST(? AS TIMESTAMPTZ)", [when]


def until_clause(when: str) -> tuple[str, list[Any]]:
    """Calls started before `when`."""
    return "started_at < CAST(? AS TIMESTAMPTZ)", [when]


def error_condition(col: Column = _plain) -> str:
    """A call that failed: an error status, a finished call that got no status (the upstream
    never answered), or one the proxy noted an error for."""
    status, duration, error = col("status"), col("duration_ms"), col("error")
    return f"{status} >= 400 OR ({status} IS NULL AND {duration} IS NOT NULL) OR {error} IS NOT NULL"


def flags_where(since: str | None = None, until: str | None = None,
                model: str | None = None) -> tuple[str | None, list[Any]]:
    """The command line's --since/--until/--model as one WHERE expression (None: no filter)."""
    parts: list[tuple[str, list[Any]]] = []
    if since:
        parts.append(since_clause(since))
    if until:
        parts.append(until_clause(until))
    if model:
        parts.append(model_clause(model))
    if not parts:
        return None, []
    return " AND ".join(f"({c})" for c, _ in parts), [v for _, ps in parts for v in ps]
