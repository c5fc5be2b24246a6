#!/usr/bin/env python3
"""Generate a realistic llmtap DuckDB file for benchmarks: N calls spread over a year.

Rows are built by DuckDB itself (range() and string functions), so a million calls take
seconds rather than the hours Python loops would: ~4 KB request bodies, ~8 KB SSE response
bodies with reasoning and content, varied models, providers, clients, statuses and fallbacks.

    .venv/bin/python scripts/make_big_db.py --db /tmp/big.duckdb --calls 1000000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmtap.recorder.columns import CALLS, M001, M003  # noqa: E402
from llmtap.recorder.record import CROCKFORD  # noqa: E402
from llmtap.recorder.schema import migrate  # noqa: E402

# The columns the generated rows fill; those later migrations add stay NULL, as in a file
# recorded before them.
GENERATED = ", ".join(c.name for c in CALLS if c.added_in in (M001, M003))
from llmtap.recorder.search_index import SearchIndex  # noqa: E402

SLICE = 100_000
POOL = 5000
WORDS = (
    "the a of to and in is for on that with as by at from this be are was it an or not but if then so we you "
    "model token layer agent search paper fold hole answer reason context tool call result error retry stream "
    "data json value count index first second third double triple check verify assume consider compute return "
    "function file path query table column row vector matrix graph node edge weight bias gradient loss epoch "
    "batch source claim evidence summary section figure author year method dataset baseline metric score"
).split()

# Real answers draw on a large vocabulary (Heaps' law: ~50k distinct words in a few thousand
# answers), which is what sizes the search index: a quarter of the words in paragraphs are made-up
# words of 6-10 letters from a vocabulary this big.
RARE_WORDS = 50_000

def ulid_sql(ms: str, counter: str) -> str:
    """A SQL expression for an id as record.new_id spells it (a ULID: 10 Crockford base32
    characters of the millisecond `ms`, then 16 of `counter`), so that generated calls sort by
    time among the ids a recorder then adds to the file."""
    def digits(value: str, n: int) -> str:
        return (f"list_reduce(list_transform(range({n - 1}, -1, -1), lambda k: substr('{CROCKFORD}', "
                f"((({value}) >> (5 * k)) & 31)::INTEGER + 1, 1)), lambda a, b: a || b)")
    return f"({digits(ms, 10)} || '00000000' || {digits(counter, 8)})"


INSERT = """
INSERT INTO calls (@COLUMNS@)
SELECT
  @ID@ AS id,
  ts AS started_at,
  ['Cline/3.38', 'local-deep-research/0.6', 'OpenAI/Python 2.8', 'Anthropic/Python 0.72', 'curl/8.5'][1 + i % 5] AS client,
  ['openai.chat', 'anthropic.messages', 'openai.chat', 'ollama.chat', 'openai.responses'][1 + i % 5] AS api,
  'POST', 'http://127.0.0.1:8081/' || ['openrouter', 'anthropic', 'openai', 'ollama', 'openai'][1 + i % 5] || '/chat/completions',
  CASE WHEN i % 53 = 0 THEN 529 WHEN i % 41 = 0 THEN 429 WHEN i % 97 = 0 THEN 500 ELSE 200 END AS status,
  ['gpt-4o', 'claude-sonnet-4-5', 'o3-mini', 'qwen3:14b', 'gpt-5'][1 + i % 5] AS model_requested,
  ['openai/gpt-4o', 'claude-sonnet-4-5', 'o3-mini', 'qwen3:14b', 'gpt-5'][1 + i % 5] AS model_sent,
  ['openai/gpt-4o', 'claude-sonnet-4-5-20250929', 'o3-mini-2025-01-31', 'qwen3:14b', 'gpt-5-2025-08-07'][1 + i % 5],
  ['openrouter', 'anthropic', 'openai', 'ollama', 'openai'][1 + i % 5] AS provider,
  CASE WHEN i % 3 = 0 THEN 'main' END AS route,
  CASE WHEN i % 17 = 0 THEN 2 ELSE 1 END AS attempts,
  TRUE, i % 211 <> 0 AS complete,
  20 + (i * 7919) % 900 AS ttfb_ms, 300 + (i * 104729) % 30000 AS duration_ms,
  '{"content-type": "application/json", "authorization": "Bearer sk-…3f9a", "user-agent": "agent"}',
  -- The system prompt repeats across calls as an agent's does; the rest is put together from
  -- pools of word-by-word random paragraphs and SSE runs, picked by a hash of the row, so
  -- the file compresses like real traffic rather than like repeat().
  '{"model": "m", "stream": true, "messages": [{"role": "system", "content": "' || repeat('You are a careful research agent. ', 30)
     || '"}, {"role": "user", "content": "question ' || i || ': ' || q1.t || ' ' || q2.t || ' ' || q3.t || '"}]}' AS request_body,
  '{"content-type": "text/event-stream"}',
  s1.t || s2.t || s3.t || 'data: [DONE]' || chr(10) || chr(10) AS response_body,
  'Thinking about question ' || i || ': ' || r.t AS reasoning,
  'Answer ' || i || ': ' || c.t AS content,
  CASE WHEN i % 7 = 0 THEN '[{"id": "call_1", "name": "search", "arguments": "{\\"q\\": \\"paper\\"}"}]' END,
  'stop', 800 + i % 3000, 200 + i % 900, (i % 4) * 150, 1000 + i % 4000,
  CASE WHEN i % 53 = 0 THEN 'Overloaded' END, NULL, NULL, NULL,
  -- prompt: the text parts of request_body, as the recorder extracts them
  repeat('You are a careful research agent. ', 30) || chr(10) || 'question ' || i || ': ' || q1.t || ' ' || q2.t
     || ' ' || q3.t AS prompt
FROM (SELECT i, TIMESTAMPTZ '2025-11-23 00:00:00+00' + to_milliseconds(i * (@SPAN@ // @TOTAL@)) AS ts,
             [hash(i, k) % @NP@ for k in range(8)] AS h
      FROM range(@START@, @STOP@) t(i))
-- Joins on small pool tables: indexing a pool list per row would copy the list per row.
JOIN para q1 ON q1.p = h[1] JOIN para q2 ON q2.p = h[2] JOIN para q3 ON q3.p = h[3]
JOIN sse s1 ON s1.p = h[4] JOIN sse s2 ON s2.p = h[5] JOIN sse s3 ON s3.p = h[6]
JOIN para r ON r.p = h[7] JOIN para c ON c.p = h[8]
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--calls", type=int, default=1_000_000)
    a = ap.parse_args()
    if a.db.exists():
        print(f"{a.db} exists; remove it first", file=sys.stderr)
        return 2
    con = duckdb.connect(str(a.db))
    migrate(con)
    # Pools built once: paragraphs of 150 random words (~1 KB), and runs of 20 SSE events
    # of one word each (~2.7 KB).
    con.execute("CREATE TEMP TABLE words AS SELECT ?::VARCHAR[] AS w", [WORDS])
    nw = len(WORDS)
    con.execute(f"""
        CREATE TEMP TABLE rare AS SELECT list(word) AS r FROM (
          SELECT array_to_string(list_transform(range(6 + (hash(v) % 5)::BIGINT), lambda j: chr(97 + (hash(v, j) % 26)::INTEGER)), '') AS word
          FROM range({RARE_WORDS}) t(v))""")
    con.execute(f"""
        CREATE TEMP TABLE para AS SELECT p::UBIGINT AS p,
          array_to_string(list_transform(range(150), lambda k: CASE WHEN hash(p, k, 7) % 4 = 0
            THEN r[1 + ((hash(p, k, 8) >> 20) % {RARE_WORDS})::BIGINT] ELSE w[1 + (hash(p, k) % {nw})::BIGINT] END), ' ') AS t
        FROM range({POOL}) r(p), words, rare""")
    con.execute(f"""
        CREATE TEMP TABLE sse AS SELECT p::UBIGINT AS p,
          array_to_string(list_transform(range(20), lambda k:
            'data: {{"id":"chatcmpl-' || p || '","object":"chat.completion.chunk","choices":[{{"index":0,"delta":'
            || '{{"content":"' || w[1 + (hash(p, k, 9) % {nw})::BIGINT] || ' "}},"finish_reason":null}}]}}'
            || chr(10) || chr(10)), '') AS t
        FROM range({POOL}) r(p), words""")
    span_ms = 365 * 24 * 3600 * 1000
    t0 = time.perf_counter()
    for start in range(0, a.calls, SLICE):
        stop = min(a.calls, start + SLICE)
        sql = INSERT
        for token, value in (("@START@", start), ("@STOP@", stop), ("@TOTAL@", a.calls), ("@SPAN@", span_ms),
                             ("@NP@", POOL), ("@COLUMNS@", GENERATED), ("@ID@", ulid_sql("epoch_ms(ts)", "i"))):
            sql = sql.replace(token, str(value))
        con.execute(sql)
        print(f"  {stop:,} / {a.calls:,} calls  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    # Each fallback call gets its failed first attempt (the answering one is implied).
    con.execute("INSERT INTO attempts SELECT id, 1, 'primary', url, model_sent, 529, 'Overloaded', started_at, 50, 40 "
                "FROM calls WHERE attempts = 2")
    t1 = time.perf_counter()
    indexed = SearchIndex(con).build_all()
    print(f"  search index: {indexed:,} calls in {time.perf_counter() - t1:.0f} s", file=sys.stderr)
    con.execute("CHECKPOINT")
    con.close()
    size = a.db.stat().st_size
    print(f"{a.db}: {a.calls:,} calls, {size / 2**20:.0f} MiB ({size / a.calls:.0f} bytes per call), "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
