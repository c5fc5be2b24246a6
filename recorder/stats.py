"""Per model and provider: calls, errors, fallbacks, tokens, latency percentiles. One query."""

from __future__ import annotations

from typing import Any

from llmtap.recorder.reader import Reader

STATS_SQL = """
SELECT coalesce(model_sent, model_requested, '-')            AS model,
       coalesce(provider, '-')                                AS provider,
       count(*)                                               AS calls,
       count(*) FILTER (WHERE status >= 400 OR (status IS NULL AND duration_ms IS NOT NULL)
                        OR error IS NOT NULL)                 AS errors,
       count(*) FILTER (WHERE attempts > 1)                   AS fallbacks,
       coalesce(sum(input_tokens), 0)                         AS input_tokens,
       coalesce(sum(output_tokens), 0)                        AS output_tokens,
       coalesce(sum(reasoning_tokens), 0)                     AS reasoning_tokens,
       quantile_cont(ttfb_ms, [0.5, 0.95, 0.99])              AS ttfb,
       quantile_cont(duration_ms, [0.5, 0.95, 0.99])          AS duration
FROM calls
WHERE {where}
GROUP BY ALL
ORDER BY calls DESC, model, provider
"""


def stats_rows(reader: Reader, since: str | None = None, until: str | None = None) -> list[dict[str, Any]]:
    parts: list[str] = []
    params: list[Any] = []
    if since:
        parts.append("started_at >= CAST(? AS TIMESTAMPTZ)")
        params.append(since)
    if until:
        parts.append("started_at < CAST(? AS TIMESTAMPTZ)")
        params.append(until)
    columns, rows = reader.query(STATS_SQL.format(where=" AND ".join(parts) or "TRUE"), params)
    out = []
    for row in rows:
        r = dict(zip(columns, row))
        ttfb, dur = r.pop("ttfb") or [None] * 3, r.pop("duration") or [None] * 3
        r["error_rate"] = round(r["errors"] / r["calls"], 4) if r["calls"] else 0.0
        for name, values in (("ttfb", ttfb), ("duration", dur)):
            for q, v in zip(("p50", "p95", "p99"), values):
                r[f"{name}_{q}"] = round(v, 1) if v is not None else None
        out.append(r)
    return out
