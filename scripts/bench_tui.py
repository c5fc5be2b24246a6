"""Benchmark the terminal UI on a big DB: time to interactive, filter latency, memory.

    .venv/bin/python scripts/bench_tui.py --calls 1000000            # generates /tmp/llmtap-bench-1000000.duckdb
    .venv/bin/python scripts/bench_tui.py --db PATH                  # an existing DB

The app runs headless (`App.run_test`). "Interactive" is the moment the first page of the call
list is in the table and a frame has been drawn; it is compared with the bare first-page SQL
query run in the same process, so the difference is what the UI adds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

FILTERS = [
    "model:gpt-4o*", "model:claude*", "provider:openrouter", "provider:anthropic", "client:cline",
    "status:5xx", "status:429", "status:2xx", "errors", "fallbacks", "incomplete", "since:2h", "since:1d",
    "model:gpt-4o* status:5xx", "provider:openai fallbacks", "-provider:openai", "errors since:7d",
    "api:anthropic*", "model:nothing-matches*", "\"rate limit\"", "weather",
]


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(db: Path, calls: int) -> None:
    """Rows shaped like real traffic, bodies included (so a list query that read them would show)."""
    maker = ROOT / "scripts" / "make_big_db.py"
    if maker.exists():
        subprocess.run([sys.executable, str(maker), "--db", str(db), "--calls", str(calls)], check=True)
        return
    import duckdb

    from llmtap.recorder.schema import migrate

    con = duckdb.connect(str(db))
    migrate(con)
    con.execute(f"""
        INSERT INTO calls
        SELECT
            '01' || lpad(CAST(i AS VARCHAR), 24, '0') AS id,
            now() - INTERVAL 30 DAY + to_milliseconds(CAST(i AS BIGINT) * (CAST(2592000000 AS BIGINT) // {calls})) AS started_at,
            ['openai-python/1.50', 'cline/3.1 node/22', 'claude-code/2.0', 'curl/8.5'][i % 4 + 1] AS client,
            ['openai.chat', 'anthropic.messages', 'openai.responses', 'ollama.chat'][i % 4 + 1] AS api,
            'POST', 'http://127.0.0.1:8081/openai/chat/completions',
            CASE WHEN i % 50 = 0 THEN 503 WHEN i % 97 = 0 THEN 429 ELSE 200 END AS status,
            ['gpt-4o', 'claude-sonnet-4', 'gpt-4o-mini', 'qwen3:8b', 'o3'][i % 5 + 1] AS model_requested,
            ['gpt-4o', 'claude-sonnet-4', 'gpt-4o-mini', 'qwen3:8b', 'o3'][i % 5 + 1] AS model_sent,
            NULL,
            ['openai', 'anthropic', 'openrouter', 'ollama'][i % 4 + 1] AS provider,
            NULL,
            CASE WHEN i % 40 = 0 THEN 2 ELSE 1 END AS attempts,
            i % 2 = 0, i % 333 <> 0,
            50 + (i * 7919) % 900, 300 + (i * 104729) % 20000,
            '{{"content-type": "application/json"}}',
            '{{"model": "gpt-4o", "messages": [{{"role": "user", "content": "' || repeat('tell me about the weather ', 40) || i || '"}}]}}',
            '{{"content-type": "application/json"}}',
            '{{"choices": [{{"message": {{"content": "' || repeat('sunny and warm ', 60) || '"}}}}]}}',
            CASE WHEN i % 3 = 0 THEN 'Let me think about rate limits and retries ' || i END,
            repeat('sunny and warm ', 20) || i,
            NULL, 'stop', 100 + i % 5000, 20 + i % 800, CASE WHEN i % 3 = 0 THEN i % 400 END, NULL,
            CASE WHEN i % 50 = 0 THEN 'upstream 503' END, NULL, NULL, NULL
        FROM range({calls}) t(i)
    """)
    con.close()


async def measure(reader, runs_filters: list[str]) -> dict[str, object]:
    from llmtap.tui import query as q
    from llmtap.tui.app import LlmtapApp

    # Baseline: what the first page costs as bare SQL, in this process, on this DB.
    schema = q.load_schema(reader)
    base: list[float] = []
    for _ in range(3):
        t = time.perf_counter()
        reader.query(*q.page_sql(schema, q.Filter(), None))
        base.append(time.perf_counter() - t)

    app = LlmtapApp(reader)
    t0 = time.perf_counter()
    async with app.run_test(size=(160, 45)) as pilot:
        screen = app.calls
        while screen.first_page_s is None:
            await asyncio.sleep(0.0005)  # pilot.pause would add its own idle wait
        await pilot.pause()  # one frame drawn with the rows in it
        interactive = time.perf_counter() - t0
        first_page_handled = screen.first_page_s - t0
        rows_shown = screen.table.row_count

        latencies: dict[str, float] = {}
        split: dict[str, tuple[float, float]] = {}
        for text in runs_filters:
            before = screen.pages_loaded
            t = time.perf_counter()
            if not screen.apply_filter(text):
                raise SystemExit(f"filter {text!r} did not parse")
            while screen.pages_loaded == before:
                await asyncio.sleep(0.0005)  # pilot.pause would add its own idle wait
            latencies[text] = time.perf_counter() - t
            split[text] = (screen.last_page_sql_s, screen.last_page_ui_s)
        # Scroll to the end twice: keyset paging must stay as fast as the first page.
        screen.apply_filter("")
        while screen.table.row_count == 0:
            await asyncio.sleep(0.0005)  # pilot.pause would add its own idle wait
        pages: list[float] = []
        for _ in range(3):
            before = screen.pages_loaded
            t = time.perf_counter()
            await pilot.press("end")
            while screen.pages_loaded == before:
                await asyncio.sleep(0.0005)  # pilot.pause would add its own idle wait
            pages.append(time.perf_counter() - t)
        rss = rss_mb()
    return {
        "baseline_s": statistics.median(base), "interactive_s": interactive, "first_page_handled_s": first_page_handled,
        "rows_shown": rows_shown, "filters": latencies, "split": split, "pages": pages, "rss_mb": rss,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, default=None)
    ap.add_argument("--calls", type=int, default=1_000_000)
    args = ap.parse_args()
    db = args.db or Path(f"/tmp/llmtap-bench-{args.calls}.duckdb")
    if not db.exists():
        t = time.perf_counter()
        print(f"generating {args.calls:,} calls into {db} …", file=sys.stderr)
        generate(db, args.calls)
        print(f"  done in {time.perf_counter() - t:.1f}s, {db.stat().st_size / 1e6:,.0f} MB", file=sys.stderr)
    rss_start = rss_mb()
    try:
        from llmtap.recorder.reader import open_reader

        reader = open_reader(db)
    except ImportError:  # the recorder's reader is not there yet: the test reader does the same
        from tuihelpers import DuckReader

        reader = DuckReader(db, do_migrate=False)
    _, rows = reader.query("SELECT count(*) FROM calls")
    total = rows[0][0]
    result = asyncio.run(measure(reader, FILTERS))
    reader.close()

    ms = lambda s: f"{s * 1000:8.1f} ms"  # noqa: E731
    filt = sorted(result["filters"].values())  # type: ignore[union-attr]
    p = lambda xs, f: xs[min(len(xs) - 1, int(round(f * (len(xs) - 1))))]  # noqa: E731
    print(f"\nllmtap tui on {db} ({total:,} calls, reader {reader.kind}, pid {os.getpid()})\n")
    print(f"{'measure':<44}{'value':>12}")
    print("-" * 56)
    print(f"{'bare first-page SQL (baseline, median of 3)':<44}{ms(result['baseline_s'])}")
    print(f"{'first page in the table (from app start)':<44}{ms(result['first_page_handled_s'])}")
    print(f"{'interactive: first page drawn':<44}{ms(result['interactive_s'])}")
    print(f"{'rows held after first page':<44}{result['rows_shown']:>12}")
    print(f"{f'filter latency p50 ({len(filt)} filters)':<44}{ms(p(filt, 0.5))}")
    print(f"{'filter latency p95':<44}{ms(p(filt, 0.95))}")
    print(f"{'filter latency max':<44}{ms(filt[-1])}")
    pages = result["pages"]
    print(f"{'next page (keyset), median of 3':<44}{ms(statistics.median(pages))}")  # type: ignore[arg-type]
    print(f"{'RSS before opening the DB':<44}{rss_start:>9.0f} MB")
    print(f"{'RSS after the run':<44}{result['rss_mb']:>9.0f} MB")
    print(f"\n{'per filter':<34}{'total':>11}{'its SQL':>11}{'table fill':>11}")
    split = result["split"]
    for text, s in sorted(result["filters"].items(), key=lambda kv: kv[1]):  # type: ignore[union-attr]
        sql_s, ui_s = split[text]  # type: ignore[index]
        print(f"  {text:<32}{ms(s)}{ms(sql_s)}{ms(ui_s)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
