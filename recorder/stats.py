"""Per model and provider (or client): calls, errors, fallbacks, tokens, latency percentiles,
cost and the calls left unpriced. One query.

The one place these numbers are computed: `llmtap stats` and the UI's stats screen both call
stats_rows with their filter compiled to a WHERE expression (filters.flags_where for the
command line's flags, the UI's filter language for the UI), so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from decimal import Decimal
from typing import Any

from llmtap.recorder.filters import error_condition
from llmtap.recorder.reader import Reader

QUANTILES: tuple[str, ...] = ("p50", "p95", "p99")
# What a group can be keyed by (`llmtap stats --by`), and the expression of each.
GROUPS: dict[str, tuple[str, ...]] = {"model": ("model_sent", "model_requested"), "provider": ("provider",),
                                      "client": ("client",)}
DEFAULT_BY: tuple[str, ...] = ("model", "provider")


def calls_columns(reader: Reader) -> frozenset[str]:
    """The columns of `calls` in the open DB (an older schema may lack some)."""
    _, rows = reader.query("SELECT column_name FROM information_schema.columns "
                           "WHERE table_name = 'calls' AND table_schema = 'main'")
    return frozenset(str(r[0]) for r in rows)


def stats_sql(have: Collection[str], where_sql: str | None = None, limit: int | None = None,
              by: Sequence[str] = DEFAULT_BY) -> str:
    """The per-group query; a column the DB predates reads as NULL."""

    def c(name: str) -> str:
        return name if name in have else "NULL"

    where = f"WHERE {where_sql}" if where_sql else ""
    cut = f"LIMIT {int(limit)}" if limit is not None else ""
    keys = "".join(f"coalesce({', '.join(c(n) for n in GROUPS[g])}, '-') AS {g},\n               " for g in by)
    # The sum as text: a remote reader hands a DECIMAL over as a float, and a cost stays exact.
    return f"""
        SELECT {keys}count(*)                                                 AS calls,
               count(*) FILTER (WHERE {error_condition(c)})             AS errors,
               count(*) FILTER (WHERE {c('attempts')} > 1)              AS fallbacks,
               coalesce(sum({c('input_tokens')}), 0)                    AS input_tokens,
               coalesce(sum({c('output_tokens')}), 0)                   AS output_tokens,
               coalesce(sum({c('reasoning_tokens')}), 0)                AS reasoning_tokens,
               quantile_cont({c('ttfb_ms')}, [0.5, 0.95, 0.99])         AS ttfb,
               quantile_cont({c('duration_ms')}, [0.5, 0.95, 0.99])     AS duration,
               CAST(sum({c('cost_usd')}) AS VARCHAR)                    AS cost_usd,
               count(*) FILTER (WHERE {c('cost_source')} = 'unknown')   AS unpriced
        FROM calls
        {where}
        GROUP BY ALL
        ORDER BY calls DESC, {', '.join(by)}
        {cut}
    """


def stats_rows(reader: Reader, where_sql: str | None = None, params: Sequence[Any] = (),
               columns: Collection[str] | None = None, limit: int | None = None,
               by: Sequence[str] = DEFAULT_BY) -> list[dict[str, Any]]:
    """One dict per model and provider (the keys `by` names): calls, errors, fallbacks,
    error_rate, fallback_rate, input/output/reasoning tokens, ttfb_p50…p99 and duration_p50…p99
    (ms, finished calls), cost_usd (a Decimal: the sum over the priced calls, None when none
    was) and unpriced (calls with tokens that no price was found for)."""
    have = calls_columns(reader) if columns is None else columns
    names, rows = reader.query(stats_sql(have, where_sql, limit, by), list(params))
    out = []
    for row in rows:
        r = dict(zip(names, row))
        ttfb, dur = r.pop("ttfb") or [None] * 3, r.pop("duration") or [None] * 3
        r["cost_usd"] = Decimal(r["cost_usd"]) if r["cost_usd"] is not None else None
        for key in ("calls", "errors", "fallbacks", "input_tokens", "output_tokens", "reasoning_tokens", "unpriced"):
            r[key] = int(r[key] or 0)  # a remote reader hands sums over as text or float
        r["error_rate"] = round(r["errors"] / r["calls"], 4) if r["calls"] else 0.0
        r["fallback_rate"] = round(r["fallbacks"] / r["calls"], 4) if r["calls"] else 0.0
        for name, values in (("ttfb", ttfb), ("duration", dur)):
            for q, v in zip(QUANTILES, values):
                r[f"{name}_{q}"] = round(float(v), 1) if v is not None else None
        out.append(r)
    return out
