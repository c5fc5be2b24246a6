#!/usr/bin/env python3
"""What `llmtap run --metrics` costs the proxy: two recording llmtap runs, one serving metrics
(scraped every second, harder than Prometheus' usual 15 s) and one not, interleaved in one run
against the same fake provider.

Measures, for each: throughput at concurrency 16 and the latency added over direct at c=1
(median of the rounds), and the CPU llmtap's processes (proxy, recorder, helpers) spend per
call; goal: metrics on within 3% of off. On a shared machine the wall-clock figures swing with
other load far more than 3%; CPU per call swings less, and what the metrics themselves cost per
call is also measured on this thread (`metrics_own_cpu`), as a share of llmtap's CPU per call.
Then the cost of a scrape once the page holds its most series (the model cap full), and its size.

Everything runs on 127.0.0.1; every process it starts is stopped at the end.
    .venv/bin/python scripts/bench_metrics.py             # quick (~2 min)
    .venv/bin/python scripts/bench_metrics.py --rounds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_proxy import BODY, PY, Target, free_port, run_batch, start_fake, wait_port  # noqa: E402


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all below it (the recorder process, its helpers), so far."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += tree_cpu(int(child))
    except OSError:
        pass  # a helper that just exited: its time is in its parent's cutime from now on
    return total


def service_cpu_us(n: int = 20000) -> dict[str, float]:
    """CPU per call of what --metrics adds to the recorder's process, measured on this thread:
    the rows as dicts (built once for all services), committed() on the writer, the count."""
    from datetime import datetime, timezone

    from llmtap.recorder.columns import ATTEMPT_COLUMNS, CALL_COLUMNS
    from llmtap.recorder.metrics import Metrics

    class Idle:  # what the collector reads of a recorder
        _calls: dict = {}
        _queue: list = []
        dropped_total = _lost = written = _waiting_bytes = 0
        _failing = False
        db_path = Path(tempfile.gettempdir()) / "none.duckdb"

    metrics = Metrics(Idle())
    now = datetime.now(timezone.utc)
    row = {c: None for c in CALL_COLUMNS}
    calls = []
    for i in range(n):
        values = dict(row, id=str(i), started_at=now, provider="openai", model_requested=f"gpt-{i % 20}",
                      model_sent=f"gpt-{i % 20}", api="openai.chat", status=200 if i % 50 else 503, stream=i % 2 == 0,
                      attempts=1 + (i % 25 == 0), complete=True, duration_ms=800.0 + i % 900, ttfb_ms=200.0 + i % 300,
                      input_tokens=1200, output_tokens=300, reasoning_tokens=100, request_body="x" * 4096)
        calls.append(tuple(values[c] for c in CALL_COLUMNS))
    attempt = tuple({"call_id": "x", "n": 1, "provider": "openai", "url": "u", "started_at": now,
                     "status": 200}.get(c) for c in ATTEMPT_COLUMNS)
    t0 = time.thread_time()
    for i in range(0, n, 256):  # batches as the writer commits them
        part = calls[i:i + 256]
        metrics.committed([dict(zip(CALL_COLUMNS, r)) for r in part], [dict(zip(ATTEMPT_COLUMNS, attempt))] * len(part))
    t1 = time.thread_time()
    metrics.drain()
    count_s = time.thread_time() - t1
    from prometheus_client import generate_latest

    generate_latest(metrics.registry)  # the first imports what the collector reads
    t2 = time.thread_time()
    generate_latest(metrics.registry)
    t3 = time.thread_time()
    return {"writer_us_per_call": round((t1 - t0) / n * 1e6, 2), "count_us_per_call": round(count_s / n * 1e6, 2),
            "scrape_ms_20_models": round((t3 - t2) * 1000, 1)}


def scraper(url: str, stop: threading.Event, times: list[float]) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.wait(1.0):
            t0 = time.perf_counter()
            client.get(url).raise_for_status()
            times.append((time.perf_counter() - t0) * 1000)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per", type=int, default=100, help="calls per round at c=1 (4x as many at c=16)")
    a = ap.parse_args()

    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="llmtap-bench-metrics-"))
    try:
        fake, fport = start_fake("--bench", "--chunks", "20")
        procs.append(fake)
        rules = tmp / "rules.yaml"
        rules.write_text(f"providers:\n  fake: {{base_url: 'http://127.0.0.1:{fport}/v1', api: openai}}\n")
        ports = {k: free_port() for k in ("on", "off", "metrics")}
        common = ["-q", "--rules", str(rules), "--confdir", str(tmp / "ca"), "--proxy", "off"]
        on = subprocess.Popen([PY, "-m", "llmtap", "run", *common, "--db", str(tmp / "on.duckdb"),
                               "--gateway", f"127.0.0.1:{ports['on']}", "--metrics", f"127.0.0.1:{ports['metrics']}"],
                              stderr=subprocess.DEVNULL)
        off = subprocess.Popen([PY, "-m", "llmtap", "run", *common, "--db", str(tmp / "off.duckdb"),
                                "--gateway", f"127.0.0.1:{ports['off']}"], stderr=subprocess.DEVNULL)
        procs += [on, off]
        for port, proc in ((ports["on"], on), (ports["metrics"], on), (ports["off"], off)):
            wait_port(port, proc)
        url = f"http://127.0.0.1:{ports['metrics']}/metrics"
        direct = Target("direct", fport, "/v1/chat/completions")
        targets = [Target("metrics-on", ports["on"], "/fake/chat/completions"),
                   Target("metrics-off", ports["off"], "/fake/chat/completions")]
        lat1: dict[str, list[float]] = {t.name: [] for t in [direct, *targets]}
        thr16: dict[str, list[float]] = {t.name: [] for t in targets}
        cpu: dict[str, list[float]] = {t.name: [] for t in targets}  # ms of llmtap's CPU per call, per round
        pid = {"metrics-on": on.pid, "metrics-off": off.pid}
        stop, scrapes = threading.Event(), []
        scraping = threading.Thread(target=scraper, args=(url, stop, scrapes), daemon=True)
        scraping.start()
        print(f"interleaving {a.rounds} rounds: {a.per} calls at c=1, {a.per * 4} at c=16, each ...", file=sys.stderr)
        for r in range(a.rounds):
            # Alternate which goes first, so that neither always meets the machine warmer.
            order = targets if r % 2 == 0 else targets[::-1]
            lat, _, _, _ = asyncio.run(run_batch(direct, a.per, 1, BODY, fport))
            lat1["direct"] += lat
            for t in order:
                c0 = tree_cpu(pid[t.name])
                lat, _, _, e1 = asyncio.run(run_batch(t, a.per, 1, BODY, fport))
                _, _, rate, e2 = asyncio.run(run_batch(t, a.per * 4, 16, BODY, fport))
                # Calls end before their rows commit: wait the flush interval out, for both alike.
                time.sleep(0.6)
                cpu[t.name].append((tree_cpu(pid[t.name]) - c0) * 1000 / (a.per * 5 + 16 + 1))
                if e1 or e2:
                    gone = [f"{name} exited with {proc.returncode}" for name, proc in (("on", on), ("off", off))
                            if proc.poll() is not None]
                    raise RuntimeError(f"{t.name}: {e1 + e2} failed calls {gone or ''}")
                lat1[t.name] += lat
                thr16[t.name].append(rate)
            print(f"  round {r + 1}/{a.rounds} done", file=sys.stderr)
        stop.set()
        scraping.join()

        # The page at its largest: the model cap (100) full, and then some.
        models = [json.dumps({"model": f"model-{i:03d}", "messages": [{"role": "user", "content": "hi"}]}).encode()
                  for i in range(150)]

        async def many() -> None:
            for body in models:
                await run_batch(targets[0], 1, 1, body, fport)

        asyncio.run(many())
        with httpx.Client(timeout=30) as client:
            deadline = time.monotonic() + 60
            while 'model="other"' not in client.get(url).text and time.monotonic() < deadline:
                time.sleep(0.2)
            big = []
            for _ in range(20):
                t0 = time.perf_counter()
                page = client.get(url).text
                big.append((time.perf_counter() - t0) * 1000)

        d = statistics.median(lat1["direct"])
        out: dict = {"throughput_c16_rps": {}, "added_p50_ms": {}}
        for t in targets:
            out["throughput_c16_rps"][t.name] = round(statistics.median(thr16[t.name]), 1)
            out["added_p50_ms"][t.name] = round(statistics.median(lat1[t.name]) - d, 3)
        per_round = [x / y for x, y in zip(thr16["metrics-on"], thr16["metrics-off"])]
        out["ratios"] = {
            "metrics_on_vs_off_throughput": round(out["throughput_c16_rps"]["metrics-on"]
                                                  / out["throughput_c16_rps"]["metrics-off"], 3),
            "metrics_on_vs_off_added_latency": round(out["added_p50_ms"]["metrics-on"]
                                                     / out["added_p50_ms"]["metrics-off"], 3),
            # Round by round, on over off (each pair a few seconds apart, so they meet the same load
            # on a shared machine): their median is the figure to quote; their spread is the noise.
            "throughput_per_round_median": round(statistics.median(per_round), 3),
            "throughput_per_round": [round(x, 3) for x in per_round],
        }
        cpu_ratio = [y / x for x, y in zip(cpu["metrics-on"], cpu["metrics-off"])]
        out["cpu_ms_per_call"] = {name: round(statistics.median(v), 3) for name, v in cpu.items()}
        # CPU-bound, throughput goes as 1 / CPU per call: off's CPU over on's is the throughput
        # the metrics leave. CPU time is less at the mercy of other load than wall time.
        out["ratios"]["cpu_off_over_on_per_round_median"] = round(statistics.median(cpu_ratio), 3)
        own = service_cpu_us()
        out["metrics_own_cpu"] = own
        per_call_ms = (own["writer_us_per_call"] + own["count_us_per_call"]) / 1000
        # Its share of llmtap's CPU per call, measured under the same load as the runs above.
        out["ratios"]["throughput_left_by_metrics_own_cpu"] = round(
            out["cpu_ms_per_call"]["metrics-off"] / (out["cpu_ms_per_call"]["metrics-off"] + per_call_ms), 4)
        out["scrape"] = {"during_traffic_p50_ms": round(statistics.median(scrapes), 2) if scrapes else None,
                         "scrapes": len(scrapes), "full_page_p50_ms": round(statistics.median(big), 2),
                         "full_page_bytes": len(page.encode()), "full_page_lines": page.count("\n")}
        print(json.dumps(out, indent=2))
        return 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
