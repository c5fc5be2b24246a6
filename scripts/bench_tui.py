"""Benchmark the terminal UI: on a big DB (time to interactive, filter latency, memory) and live
(rows appearing while a proxy serves traffic, and what the open UI costs the proxy).

    .venv/bin/python scripts/bench_tui.py --calls 1000000            # generates /tmp/llmtap-bench-1000000.duckdb
    .venv/bin/python scripts/bench_tui.py --db PATH                  # an existing DB
    .venv/bin/python scripts/bench_tui.py --live                     # proxy + fake upstream + UI attached

The app runs headless (`App.run_test`). "Interactive" is the moment the first page of the call
list is in the table and a frame has been drawn; it is compared with the bare first-page SQL
query run in the same process, so the difference is what the UI adds. Each filter is also run
as the one query the UI used before windowed search (free text as ILIKE … ESCAPE), in the
same process and round, as the baseline.

--live starts a fake upstream and `llmtap run` on free ports with a fresh DB, then per round:
drives R calls/s for S seconds and a closed loop at concurrency 16 from a separate load
process with no UI open; then attaches the UI (open_reader -> the recorder's endpoint, as
`llmtap tui` does) in this process and repeats both loads. A row's appear latency runs from the
client sending the call (CLOCK_MONOTONIC, shared by the processes) to the frame drawn after the
live update added it to the call table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bench_proxy import free_port, start_fake  # noqa: E402  (this folder: one way to start the fake)

FILTERS = [
    "model:gpt-4o*", "model:claude*", "provider:openrouter", "provider:anthropic", "client:cline",
    "status:5xx", "status:429", "status:2xx", "errors", "fallbacks", "incomplete", "since:2h", "since:1d",
    "model:gpt-4o* status:5xx", "provider:openai fallbacks", "-provider:openai", "errors since:7d",
    "api:anthropic*", "model:nothing-matches*", "\"rate limit\"", "weather",
]
# Searches with matches at several densities (words of make_big_db.py's pool), timed apart
# from FILTERS so that they cannot pull its percentiles down.
EXTRA_SEARCHES = ["paper", "\"vector matrix\"", "\"gradient loss epoch\"", "\"the a of\"", "model:o3* \"rate limit\""]


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pct(values: list[float], f: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(round(f * (len(xs) - 1))))] if xs else float("nan")


def ms(s: float) -> str:
    return f"{s * 1000:8.1f} ms"


def generate(db: Path, calls: int) -> None:
    """Rows shaped like real traffic, bodies included (so a list query that read them would show)."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_big_db.py"), "--db", str(db), "--calls", str(calls)],
                   check=True)


# -- the big DB -------------------------------------------------------------------------------
def legacy_filter(text: str, schema: Any) -> Any:
    """The filter as the UI built it before: free text as `ILIKE '%…%' ESCAPE '\\'`."""
    from llmtap.tui import query as q

    def text_clause(value: str, schema: q.Schema) -> tuple[str, list[Any]]:
        like = f"%{q._like_escape(value)}%"
        return (f"{schema.col('content')} ILIKE ? ESCAPE '\\' OR {schema.col('reasoning')} ILIKE ? ESCAPE '\\'",
                [like, like])

    saved = q._text_clause
    q._text_clause = text_clause  # type: ignore[assignment]
    try:
        return q.parse_filter(text, schema)
    finally:
        q._text_clause = saved  # type: ignore[assignment]


async def measure(reader: Any, filters: list[str], extra: list[str], rounds: int) -> dict[str, Any]:
    from llmtap.tui import query as q
    from llmtap.tui.app import LlmtapApp

    # Baseline: what the first page costs as bare SQL, in this process, on this DB.
    schema = q.load_schema(reader)
    base: list[float] = []
    for _ in range(3):
        t = time.perf_counter()
        reader.query(*q.page_sql(schema, q.Filter(), None))
        base.append(time.perf_counter() - t)
    # The floor of a search that matches nothing: reading (decompressing) both searched
    # columns once, no predicate at all. Run twice; the first also warms DuckDB's cache.
    scan: list[float] = []
    for _ in range(2):
        t = time.perf_counter()
        reader.query("SELECT sum(length(content)) + sum(length(reasoning)) FROM calls")
        scan.append(time.perf_counter() - t)

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

        async def apply(text: str) -> tuple[float, float | None, tuple[float, float, int]]:
            """(until the page is complete, until its first rows show, (sql, table fill, windows))."""
            await asyncio.sleep(0)
            before = screen.pages_loaded
            t = time.perf_counter()
            if not screen.apply_filter(text):
                raise SystemExit(f"filter {text!r} did not parse")
            first: float | None = None
            while screen.pages_loaded == before:
                if first is None and screen.table.row_count:
                    first = time.perf_counter() - t
                await asyncio.sleep(0.0005)  # pilot.pause would add its own idle wait
            done = time.perf_counter() - t
            return done, (first if first is not None else (done if screen.table.row_count else None)), (
                screen.last_page_sql_s, screen.last_page_ui_s, screen.last_page_windows)

        def legacy_sql(text: str) -> float:
            t = time.perf_counter()
            reader.query(*q.page_sql(schema, legacy_filter(text, schema), None))
            return time.perf_counter() - t

        now: dict[str, list[float]] = {}
        first_rows: dict[str, list[float]] = {}
        split: dict[str, list[tuple[float, float, int]]] = {}
        before: dict[str, list[float]] = {}
        for r in range(rounds):
            for text in [*filters, *extra]:
                total, first, sp = await apply(text)
                now.setdefault(text, []).append(total)
                if first is not None:
                    first_rows.setdefault(text, []).append(first)
                split.setdefault(text, []).append(sp)
                # The same filter as one query of the old SQL, right after: same cache state.
                before.setdefault(text, []).append(legacy_sql(text))
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr)
        # Scroll to the end three times: keyset paging must stay as fast as the first page.
        await apply("")
        pages: list[tuple[float, float, float]] = []
        for _ in range(3):
            n = screen.pages_loaded
            t = time.perf_counter()
            await pilot.press("end")
            while screen.pages_loaded == n:
                await asyncio.sleep(0.0005)  # pilot.pause would add its own idle wait
            pages.append((time.perf_counter() - t, screen.last_page_sql_s, screen.last_page_ui_s))
        rss = rss_mb()
    return {
        "baseline_s": statistics.median(base), "scan_s": min(scan), "interactive_s": interactive, "first_page_handled_s": first_page_handled,
        "rows_shown": rows_shown, "now": now, "first_rows": first_rows, "split": split, "before": before,
        "pages": pages, "rss_mb": rss,
    }


def run_db(args: argparse.Namespace) -> int:
    db = args.db or Path(f"/tmp/llmtap-bench-{args.calls}.duckdb")
    if not db.exists():
        t = time.perf_counter()
        print(f"generating {args.calls:,} calls into {db} …", file=sys.stderr)
        generate(db, args.calls)
        print(f"  done in {time.perf_counter() - t:.1f}s, {db.stat().st_size / 1e6:,.0f} MB", file=sys.stderr)
    rss_start = rss_mb()
    from llmtap.recorder.reader import open_reader
    from llmtap.tui.commands import UI_MEMORY_LIMIT

    reader = open_reader(db, memory_limit=UI_MEMORY_LIMIT)  # as `llmtap tui` opens it
    _, rows = reader.query("SELECT count(*) FROM calls")
    total = rows[0][0]
    result = asyncio.run(measure(reader, FILTERS, EXTRA_SEARCHES, args.rounds))
    reader.close()

    # Per filter: the median over rounds; the first round alone too (DuckDB's cache is cold
    # for the bodies until the first search has read them).
    med = {t: statistics.median(v) for t, v in result["now"].items()}
    first_round = {t: v[0] for t, v in result["now"].items()}
    old = {t: statistics.median(v) for t, v in result["before"].items()}
    filt = [med[t] for t in FILTERS]
    filt1 = [first_round[t] for t in FILTERS]
    oldf = [old[t] for t in FILTERS]
    print(f"\nllmtap tui on {db} ({total:,} calls, reader {reader.kind}, pid {os.getpid()}, "
          f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f})\n")
    print(f"{'measure':<52}{'value':>12}")
    print("-" * 64)
    print(f"{'bare first-page SQL (baseline, median of 3)':<52}{ms(result['baseline_s'])}")
    print(f"{'bare scan of content + reasoning (search floor)':<52}{ms(result['scan_s'])}")
    print(f"{'first page in the table (from app start)':<52}{ms(result['first_page_handled_s'])}")
    print(f"{'interactive: first page drawn':<52}{ms(result['interactive_s'])}")
    print(f"{'rows held after first page':<52}{result['rows_shown']:>12}")
    print(f"{f'filter latency p50 ({len(filt)} filters, median of {args.rounds} rounds)':<52}{ms(pct(filt, 0.5))}")
    print(f"{'filter latency p95':<52}{ms(pct(filt, 0.95))}")
    print(f"{'filter latency max':<52}{ms(max(filt))}")
    print(f"{'  first round only (cold cache): p50':<52}{ms(pct(filt1, 0.5))}")
    print(f"{'  first round only: p95':<52}{ms(pct(filt1, 0.95))}")
    print(f"{'  first round only: max':<52}{ms(max(filt1))}")
    print(f"{'  before (one ILIKE query, SQL only): p50':<52}{ms(pct(oldf, 0.5))}")
    print(f"{'  before: p95':<52}{ms(pct(oldf, 0.95))}")
    print(f"{'  before: max':<52}{ms(max(oldf))}")
    pages = result["pages"]
    print(f"{'next page (End key to page in table), median of 3':<52}{ms(statistics.median(p[0] for p in pages))}")
    print(f"{'  of which its SQL / table fill':<52}{statistics.median(p[1] for p in pages) * 1000:8.1f} / "
          f"{statistics.median(p[2] for p in pages) * 1000:.1f} ms")
    print(f"{'RSS before opening the DB':<52}{rss_start:>9.0f} MB")
    print(f"{'RSS after the run':<52}{result['rss_mb']:>9.0f} MB")
    print(f"\n{'per filter (median of rounds)':<36}{'total':>11}{'1st rows':>11}{'its SQL':>11}{'fill':>9}"
          f"{'win':>5}{'before':>11}")

    def line(text: str) -> None:
        runs = result["split"][text]
        sql_s, ui_s = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        wins = max(r[2] for r in runs)
        fr = result["first_rows"].get(text)
        first = ms(statistics.median(fr)) if fr else f"{'-':>11}"
        print(f"  {text:<34}{ms(med[text])}{first}{ms(sql_s)}{ui_s * 1000:6.1f} ms{wins:>5}{ms(old[text])}")

    for text in sorted(FILTERS, key=lambda t: med[t]):
        line(text)
    print("  -- other searches, not in the percentiles")
    for text in EXTRA_SEARCHES:
        line(text)
    return 0


# -- live ---------------------------------------------------------------------------------------
def wait_for(cond: Callable[[], bool], proc: subprocess.Popen[Any], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds so far of a process and the processes it started (the
    recorder process of `llmtap run` and its helpers)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    tree, grew = {pid}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(cpu.get(p, 0.0) for p in tree)


async def load_worker(url: str, tag: str, rate: float, seconds: float, concurrency: int, out: Path) -> None:
    """Runs in its own process: the client. Fixed rate (open loop) when `rate` > 0, else
    `concurrency` callers back to back. Writes one [n, sent, latency, status] per call."""
    import httpx

    calls: list[list[Any]] = []
    limits = httpx.Limits(max_connections=max(concurrency, 64), max_keepalive_connections=max(concurrency, 64))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0, trust_env=False) as client:
        async def one(n: int) -> None:
            body = {"model": f"{tag}-{n}", "messages": [{"role": "user", "content": "hi"}]}
            sent = time.monotonic()
            try:
                r = await client.post("/fake/chat/completions", json=body)
                status = r.status_code
            except httpx.HTTPError:
                status = 0
            calls.append([n, sent, time.monotonic() - sent, status])

        await one(-1)  # a connection warmed outside the timing (its row is ignored)
        calls.clear()
        t0 = time.monotonic()
        if rate > 0:
            tasks: list[asyncio.Task[None]] = []
            total = int(rate * seconds)
            for n in range(total):
                delay = t0 + n / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(n)))
            await asyncio.gather(*tasks)
        else:
            counter = iter(range(10**9))

            async def caller() -> None:
                while time.monotonic() - t0 < seconds:
                    await one(next(counter))

            await asyncio.gather(*(caller() for _ in range(concurrency)))
        wall = time.monotonic() - t0
    out.write_text(json.dumps({"wall": wall, "calls": calls}))


class Live:
    """The processes of one --live run: fake upstream and `llmtap run` on a fresh DB."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[Any]] = []
        self.db = tmp / "live.duckdb"
        self.gateway = ""
        self.proxy_pid = 0

    def start(self) -> None:
        py = sys.executable
        fake, fport = start_fake("--bench")
        self.procs.append(fake)
        rules = self.tmp / "rules.yaml"
        rules.write_text(f"providers:\n  fake: {{base_url: 'http://127.0.0.1:{fport}/v1', api: openai}}\n")
        gport, pport = free_port(), free_port()
        # Its output goes to a file (printed if it fails to start): the table should stay readable.
        self.log = self.tmp / "llmtap-run.log"
        with self.log.open("w") as log:
            run = subprocess.Popen([py, "-m", "llmtap", "run", "-q", "--rules", str(rules), "--db", str(self.db),
                                    "--confdir", str(self.tmp / "ca"), "--proxy", f"127.0.0.1:{pport}",
                                    "--gateway", f"127.0.0.1:{gport}"], cwd=str(ROOT), stdout=log, stderr=log)
        self.procs.append(run)
        self.proxy_pid = run.pid
        endpoint = self.db.with_name(self.db.name + ".endpoint.json")
        try:
            wait_for(lambda: port_open(gport) and endpoint.exists(), run, "llmtap run did not start")
        except (RuntimeError, TimeoutError):
            print(self.log.read_text(), file=sys.stderr)
            raise
        self.gateway = f"http://127.0.0.1:{gport}"

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


async def run_load(live: Live, tag: str, rate: float, seconds: float, concurrency: int) -> dict[str, Any]:
    """One load from a separate client process (awaited without blocking this loop, where the
    UI may be running); also the proxy process's CPU over it."""
    out = live.tmp / f"{tag}.json"
    cpu0 = proc_cpu_s(live.proxy_pid)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--load-worker", live.gateway, tag, str(rate), str(seconds), str(concurrency),
        str(out))
    try:
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if code != 0:
        raise RuntimeError(f"load process exited with {code}")
    data = json.loads(out.read_text())
    calls = data["calls"]
    ok = [c for c in calls if c[3] == 200]
    return {"tag": tag, "calls": calls, "sent": {c[0]: c[1] for c in calls}, "n": len(calls), "ok": len(ok),
            "rps": len(ok) / data["wall"], "lat": [c[2] for c in ok], "proxy_cpu_s": proc_cpu_s(live.proxy_pid) - cpu0}


async def with_ui(live: Live, loads: list[tuple[str, float, float, int]]) -> list[dict[str, Any]]:
    """Attach the UI as `llmtap tui --db` does, run each load, time each row's appearance."""
    from llmtap.recorder.reader import open_reader
    from llmtap.tui.app import LlmtapApp

    reader = open_reader(live.db)
    if reader.kind != "remote":
        raise RuntimeError(f"expected to attach to the running proxy, got a {reader.kind} reader")
    added: dict[str, float] = {}  # model asked -> when its row was added
    drawn: dict[str, float] = {}  # model asked -> the end of the first refresh after that
    results: list[dict[str, Any]] = []
    try:
        app = LlmtapApp(reader)
        async with app.run_test(size=(160, 45)) as pilot:
            screen = app.calls
            while screen.pages_loaded == 0:
                await asyncio.sleep(0.005)
            await pilot.pause()

            def on_added(records: list[dict[str, Any]]) -> None:
                now = time.monotonic()
                models = [str(r.get("model_requested")) for r in records]
                for m in models:
                    added.setdefault(m, now)

                def painted() -> None:
                    t = time.monotonic()
                    for m in models:
                        drawn.setdefault(m, t)

                app.call_after_refresh(painted)

            screen.live_rows_added = on_added
            for tag, rate, seconds, conc in loads:
                cpu0 = time.process_time()
                res = await run_load(live, tag, rate, seconds, conc)
                # Give the last rows their chance to arrive (bounded: a lost row is reported).
                want = {f"{tag}-{n}" for n, *_ in res["calls"]}
                deadline = time.monotonic() + 10
                while not want <= drawn.keys() and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                res["ui_cpu_s"] = time.process_time() - cpu0
                appear = [drawn[f"{tag}-{n}"] - sent for n, sent in res["sent"].items() if f"{tag}-{n}" in drawn]
                in_table = [added[f"{tag}-{n}"] - sent for n, sent in res["sent"].items() if f"{tag}-{n}" in added]
                res.update(appear=appear, in_table=in_table, missing=len(want - drawn.keys()),
                           rows_held=screen.table.row_count)
                results.append(res)
            res_rss = rss_mb()
            for res in results:
                res["ui_rss_mb"] = res_rss
    finally:
        reader.close()
    return results


def run_live(args: argparse.Namespace) -> int:
    rate, seconds, max_s = args.rate, args.seconds, args.max_seconds
    tmp = Path(tempfile.mkdtemp(prefix="llmtap-bench-live-"))
    live = Live(tmp)
    rounds: list[dict[str, list[dict[str, Any]]]] = []
    try:
        live.start()
        print(f"proxy pid {live.proxy_pid} at {live.gateway}, DB {live.db}", file=sys.stderr)
        for r in range(args.rounds):
            # Alternate which goes first, so a drift of the machine's load does not side with one.
            order = ("bare", "ui") if r % 2 == 0 else ("ui", "bare")
            got: dict[str, list[dict[str, Any]]] = {}
            for mode in order:
                loads = [(f"r{r}{mode}rate", rate, seconds, 0), (f"r{r}{mode}c16", 0, max_s, 16)]
                if mode == "bare":
                    got[mode] = [asyncio.run(run_load(live, *load)) for load in loads]
                else:
                    got[mode] = asyncio.run(with_ui(live, loads))
            rounds.append(got)
            print(f"  round {r + 1}/{args.rounds}: {rate:g}/s without UI {got['bare'][0]['rps']:.1f}, with UI "
                  f"{got['ui'][0]['rps']:.1f}; c=16 without UI {got['bare'][1]['rps']:.0f}/s, with UI "
                  f"{got['ui'][1]['rps']:.0f}/s", file=sys.stderr)
    finally:
        live.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def merged(mode: str, i: int, key: str) -> list[float]:
        return [x for rd in rounds for x in rd[mode][i][key]]

    def rps(mode: str, i: int) -> float:
        return statistics.median(rd[mode][i]["rps"] for rd in rounds)

    def cpu_ms_per_call(mode: str, i: int) -> float:
        return statistics.median(rd[mode][i]["proxy_cpu_s"] / max(rd[mode][i]["ok"], 1) * 1000 for rd in rounds)

    print(f"\nllmtap tui live: proxy + fake upstream + UI attached through the endpoint; {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}\n")
    print(f"{'measure':<52}{'no UI':>12}{'UI open':>12}{'ratio':>8}")
    print("-" * 84)
    for i, label in ((0, f"{rate:g} calls/s for {seconds:g} s"), (1, f"concurrency 16 for {max_s:g} s")):
        b, u = rps("bare", i), rps("ui", i)
        print(f"{label + ': throughput (calls/s, median)':<52}{b:>12.1f}{u:>12.1f}{u / b:>8.2f}")
        lb, lu = merged("bare", i, "lat"), merged("ui", i, "lat")
        print(f"{'  client latency p50':<52}{ms(pct(lb, 0.5)):>12}{ms(pct(lu, 0.5)):>12}{pct(lu, 0.5) / pct(lb, 0.5):>8.2f}")
        print(f"{'  client latency p95':<52}{ms(pct(lb, 0.95)):>12}{ms(pct(lu, 0.95)):>12}{pct(lu, 0.95) / pct(lb, 0.95):>8.2f}")
        cb, cu = cpu_ms_per_call("bare", i), cpu_ms_per_call("ui", i)
        print(f"{'  proxy CPU per call (its recorder process included)':<52}{cb:>9.2f} ms{cu:>9.2f} ms{cu / cb:>8.2f}")
        errors = sum(rd[m][i]["n"] - rd[m][i]["ok"] for rd in rounds for m in ("bare", "ui"))
        if errors:
            print(f"{'  calls that failed (both modes)':<52}{errors:>12}")
        appear, table = merged("ui", i, "appear"), merged("ui", i, "in_table")
        missing = sum(rd["ui"][i]["missing"] for rd in rounds)
        print(f"{'  row appears in the UI (send -> drawn): p50':<52}{'':>12}{ms(pct(appear, 0.5)):>12}")
        print(f"{'  row appears: p95':<52}{'':>12}{ms(pct(appear, 0.95)):>12}")
        print(f"{'  row appears: max':<52}{'':>12}{ms(max(appear) if appear else float('nan')):>12}")
        print(f"{'  (send -> added to the table, before the draw) p95':<52}{'':>12}{ms(pct(table, 0.95)):>12}")
        print(f"{'  rows that never appeared':<52}{'':>12}{missing:>12}")
        ui_cpu = statistics.median(rd["ui"][i]["ui_cpu_s"] for rd in rounds)
        dur = seconds if i == 0 else max_s
        print(f"{'  UI process CPU (share of one core)':<52}{'':>12}{100 * ui_cpu / dur:>11.0f}%")
    print(f"{'UI RSS at the end (rows held: ' + str(rounds[-1]['ui'][1]['rows_held']) + ')':<52}{'':>12}"
          f"{rounds[-1]['ui'][1]['ui_rss_mb']:>9.0f} MB")
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--load-worker":
        url, tag, rate, seconds, conc, out = sys.argv[2:8]
        asyncio.run(load_worker(url, tag, float(rate), float(seconds), int(conc), Path(out)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, default=None)
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=None, help="repeats (default 3 for the DB, 2 for --live)")
    ap.add_argument("--live", action="store_true", help="measure live updates against a running proxy")
    ap.add_argument("--rate", type=float, default=100.0, help="--live: calls per second of the paced load")
    ap.add_argument("--seconds", type=float, default=10.0, help="--live: length of the paced load")
    ap.add_argument("--max-seconds", type=float, default=5.0, help="--live: length of the concurrency-16 load")
    args = ap.parse_args()
    if args.live:
        args.rounds = args.rounds or 2
        return run_live(args)
    args.rounds = args.rounds or 3
    return run_db(args)


if __name__ == "__main__":
    sys.exit(main())
