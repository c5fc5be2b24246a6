#!/usr/bin/env python3
"""`llmtap sql` on a big DB while `llmtap run` records into it, against DuckDB on a copy of the
file (what a user would run if the file were not locked), measured in the same run.

    .venv/bin/python scripts/bench_sql.py                      # 1M calls: /tmp/llmtap-sql-bench-lean-1000000.duckdb
    .venv/bin/python scripts/bench_sql.py --calls 200000 --rounds 5 --rate 20

The DB is generated here (kept for the next run; see LEAN) or given with --db (e.g. one made by
scripts/make_big_db.py) and copied; `llmtap run`
records into the original while a load process sends R calls/s through its gateway to the fake
provider. For each simple aggregate, per round:

  direct      the query on the copy by DuckDB in this process (read-only connection, warm)
  endpoint    the same query through the recorder's endpoint (reader.RemoteReader.stream, as
              `llmtap sql` runs it), in this process: what reading through the proxy adds
  llmtap sql  the whole command as a user types it (`llmtap sql --json QUERY`), process start-up
              and imports included, vs `python -c` running the direct query on the copy

Medians of the rounds, and the ratio to the direct run. The target is under 1 s for a simple
aggregate through `llmtap sql` while recording.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench_proxy import free_port, start_fake, wait_port  # noqa: E402
from make_big_db import ulid_sql  # noqa: E402

PY = sys.executable
QUERIES = {
    "count errors": "SELECT count(*) FROM calls WHERE status >= 400",
    "per model": "SELECT model_sent, count(*) AS calls, avg(duration_ms) AS ms FROM calls GROUP BY 1 ORDER BY 2 DESC",
    "tokens 30d": "SELECT provider, sum(input_tokens) AS tin, sum(output_tokens) AS tout FROM calls "
                  "WHERE started_at >= TIMESTAMPTZ '2026-10-01' GROUP BY 1",
    "p95 per api": "SELECT api, quantile_cont(duration_ms, 0.95) AS p95 FROM calls GROUP BY 1",
}


# The columns an aggregate reads, valued as scripts/make_big_db.py values them, with short bodies:
# DuckDB stores by column, so an aggregate over these reads what it would read in a file with
# make_big_db.py's 4-8 KB bodies, and a million rows are built in seconds, not the minutes that
# building the bodies (and their search index) takes on a busy machine. --db takes such a file.
LEAN = """
INSERT INTO calls BY NAME
SELECT @ID@ AS id, ts AS started_at,
  ['Cline/3.38', 'local-deep-research/0.6', 'OpenAI/Python 2.8', 'Anthropic/Python 0.72', 'curl/8.5'][1 + i % 5] AS client,
  ['openai.chat', 'anthropic.messages', 'openai.chat', 'ollama.chat', 'openai.responses'][1 + i % 5] AS api,
  'POST' AS method, 'http://127.0.0.1:8081/openai/chat/completions' AS url,
  CASE WHEN i % 53 = 0 THEN 529 WHEN i % 41 = 0 THEN 429 WHEN i % 97 = 0 THEN 500 ELSE 200 END AS status,
  ['gpt-4o', 'claude-sonnet-4-5', 'o3-mini', 'qwen3:14b', 'gpt-5'][1 + i % 5] AS model_requested,
  ['openai/gpt-4o', 'claude-sonnet-4-5', 'o3-mini', 'qwen3:14b', 'gpt-5'][1 + i % 5] AS model_sent,
  ['openrouter', 'anthropic', 'openai', 'ollama', 'openai'][1 + i % 5] AS provider,
  CASE WHEN i % 17 = 0 THEN 2 ELSE 1 END AS attempts, TRUE AS stream, i % 211 <> 0 AS complete,
  20 + (i * 7919) % 900 AS ttfb_ms, 300 + (i * 104729) % 30000 AS duration_ms,
  'Answer ' || i AS content, 'stop' AS finish_reason, 800 + i % 3000 AS input_tokens, 200 + i % 900 AS output_tokens,
  (i % 4) * 150 AS reasoning_tokens, 1000 + i % 4000 AS total_tokens
FROM (SELECT i, TIMESTAMPTZ '2025-11-23 00:00:00+00' + to_milliseconds(i * (31536000000 // @N@)) AS ts
      FROM range(@N@) t(i))
"""


def generate(db: Path, calls: int) -> None:
    if db.exists():
        return
    import duckdb

    from llmtap.recorder.schema import migrate

    print(f"generating {db} ({calls:,} calls, lean bodies) ...", file=sys.stderr)
    t0 = time.perf_counter()
    con = duckdb.connect(str(db))
    migrate(con)
    con.execute(LEAN.replace("@N@", str(calls)).replace("@ID@", ulid_sql("epoch_ms(ts)", "i")))
    con.execute("CHECKPOINT")
    con.close()
    print(f"  {db.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def load(gateway: str, rate: float, stop: threading.Event, sent: list[int]) -> None:
    """R calls/s through the gateway, as traffic would arrive while someone queries."""
    import httpx

    async def main() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            t0 = time.monotonic()
            n = 0
            pending: set[asyncio.Task[Any]] = set()
            while not stop.is_set():
                due = t0 + n / rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                body = {"model": "bench", "messages": [{"role": "user", "content": f"q {n}"}]}
                task = asyncio.create_task(client.post(f"{gateway}/fake/chat/completions", json=body))
                pending.add(task)
                task.add_done_callback(pending.discard)
                n += 1
                sent[0] = n
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    asyncio.run(main())


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def child_cpu(fn: Any) -> tuple[float, float]:
    """Wall time of a command, and the CPU time (user + system) its process took: on a shared
    machine the wall time mostly measures the queue for a CPU."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = timed(fn)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--db", type=Path, default=None, help="an existing big DB (default: generated in /tmp)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rate", type=float, default=20.0, help="calls/s recorded meanwhile (default 20)")
    a = ap.parse_args()
    import duckdb

    from llmtap.recorder.reader import RemoteReader, open_reader

    db = a.db or Path(f"/tmp/llmtap-sql-bench-lean-{a.calls}.duckdb")
    generate(db, a.calls)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"llmtap-bench-sql-{os.getpid()}"
    work.mkdir()
    procs: list[subprocess.Popen[Any]] = []
    stop = threading.Event()
    try:
        copy = work / "copy.duckdb"
        shutil.copyfile(db, copy)
        live = work / "live.duckdb"
        shutil.copyfile(db, live)  # the generated file stays as made, for the next run
        fake, fport = start_fake("--bench")
        procs.append(fake)
        rules = work / "rules.yaml"
        rules.write_text(f"providers:\n  fake: {{base_url: 'http://127.0.0.1:{fport}/v1', api: openai}}\n")
        gport = free_port()
        log = (work / "run.log").open("w")
        run = subprocess.Popen([PY, "-m", "llmtap", "run", "-q", "--rules", str(rules), "--db", str(live),
                                "--confdir", str(work / "ca"), "--proxy", "off", "--gateway", f"127.0.0.1:{gport}"],
                               stdout=log, stderr=log)
        procs.append(run)
        wait_port(gport, run)
        reader = open_reader(live)
        while not isinstance(reader, RemoteReader):
            reader.close()
            time.sleep(0.1)
            reader = open_reader(live)
        sent = [0]
        loader = threading.Thread(target=load, args=(f"http://127.0.0.1:{gport}", a.rate, stop, sent), daemon=True)
        loader.start()
        direct = duckdb.connect(str(copy), read_only=True)
        first = reader.query("SELECT count(*) FROM calls")[1][0][0]

        def through(sql: str) -> None:
            for _batch in reader.stream(sql):  # type: ignore[attr-defined]
                pass

        results: dict[str, dict[str, list[float]]] = {}
        for name, sql in QUERIES.items():
            direct.execute(sql).fetchall()  # warm both caches once
            through(sql)
            r: dict[str, list[float]] = {"direct": [], "endpoint": [], "cli": [], "cli_direct": [],
                                         "cli_cpu": [], "cli_direct_cpu": []}
            for _ in range(a.rounds):
                r["direct"].append(timed(lambda sql=sql: direct.execute(sql).fetchall()))
                r["endpoint"].append(timed(lambda sql=sql: through(sql)))
                wall, cpu = child_cpu(lambda sql=sql: subprocess.run(
                    [PY, "-m", "llmtap", "sql", "--db", str(live), "--json", sql], check=True,
                    stdout=subprocess.DEVNULL))
                r["cli"].append(wall)
                r["cli_cpu"].append(cpu)
                code = (f"import duckdb, json; c = duckdb.connect({str(copy)!r}, read_only=True); "
                        f"print(json.dumps(c.execute({sql!r}).fetchall(), default=str))")
                wall, cpu = child_cpu(lambda code=code: subprocess.run([PY, "-c", code], check=True,
                                                                       stdout=subprocess.DEVNULL))
                r["cli_direct"].append(wall)
                r["cli_direct_cpu"].append(cpu)
            results[name] = r
        last = reader.query("SELECT count(*) FROM calls")[1][0][0]
        stop.set()
        loader.join(60)
        reader.close()
        direct.close()
    finally:
        stop.set()
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    print(f"\n{first:,} calls in the DB; recorded {last - first:,} more while measuring "
          f"({sent[0]:,} sent at {a.rate:g}/s); {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; medians of {a.rounds} rounds\n")
    print("in-process query time: DuckDB on the copy vs through the recording llmtap's endpoint;")
    print("whole commands, wall (and CPU of the command's own process): python -c on the copy vs llmtap sql\n")
    print(f"{'query':<14} {'direct':>8} {'endpoint':>9} {'ratio':>6}   {'python -c':>16} {'llmtap sql':>17} {'ratio':>6}")
    for name, r in results.items():
        d, e, c, cd = med(r["direct"]), med(r["endpoint"]), med(r["cli"]), med(r["cli_direct"])
        cc, cdc = med(r["cli_cpu"]), med(r["cli_direct_cpu"])
        print(f"{name:<14} {d * 1000:>6.0f}ms {e * 1000:>7.0f}ms {e / d:>5.1f}x   {cd * 1000:>6.0f}ms ({cdc * 1000:>4.0f} cpu) "
              f"{c * 1000:>7.0f}ms ({cc * 1000:>4.0f} cpu) {c / cd:>5.1f}x")
    worst = max(med(r["cli"]) for r in results.values())
    worst_q = max(med(r["endpoint"]) for r in results.values())
    print(f"\nslowest query through the endpoint: {worst_q * 1000:.0f} ms; slowest whole `llmtap sql` "
          f"(start-up included): {worst * 1000:.0f} ms ({'under' if worst < 1 else 'OVER'} the 1 s target "
          f"at this load)")
    print(json.dumps({n: {k: round(med(v), 4) for k, v in r.items()} for n, r in results.items()}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
