#!/usr/bin/env python3
"""What `llmtap run --metrics` costs the proxy: two recording llmtap runs, one serving metrics
(scraped every second, harder than Prometheus' usual 15 s) and one not, interleaved in one run
against the same fake provider.

Measures, for each: throughput at concurrency 16 and the latency added over direct at c=1
(median of the rounds); goal: metrics on within 3% of off. Then the cost of a scrape once the
page holds its most series (the model cap full), and its size.

Everything runs on 127.0.0.1; every process it starts is stopped at the end.
    .venv/bin/python scripts/bench_metrics.py             # quick (~2 min)
    .venv/bin/python scripts/bench_metrics.py --rounds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
                lat, _, _, e1 = asyncio.run(run_batch(t, a.per, 1, BODY, fport))
                _, _, rate, e2 = asyncio.run(run_batch(t, a.per * 4, 16, BODY, fport))
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
