#!/usr/bin/env python3
"""Pricing's cost to the recorder: the append rate with pricing on vs off, in the same run.

Realistic records (bench_recorder's 4 KB request and 8 KB SSE answer in 40 chunks, with a final
usage chunk so that every call is priced), N handed over at once to a Recorder, rounds of
pricing off and on interleaved so that a busy machine slows both alike; the median ratio is
the figure (pricing must not cut the rate by more than 10%: ratio >= 0.90), by the wall clock
and by the recorder's CPU time per call (steadier on a busy machine). Also the price of
one call alone, cached (one (provider, model, date) entry) and not (genai-prices' own
calc_price), for scale.

    .venv/bin/python scripts/bench_cost.py --calls 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_recorder  # noqa: E402
from bench_recorder import CHUNKS, EVENT, make_call  # noqa: E402
from llmtap.dialects.shapes import Usage  # noqa: E402
from llmtap.recorder.pricing import Pricer  # noqa: E402
from llmtap.recorder.recorder import Recorder  # noqa: E402

USAGE = (b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06","choices":[],'
         b'"usage":{"prompt_tokens":1200,"completion_tokens":80,"total_tokens":1280,'
         b'"prompt_tokens_details":{"cached_tokens":1024}}}\n\n')
PRICED_CHUNKS = CHUNKS[:-1] + [CHUNKS[-1].replace(b"data: [DONE]", USAGE + b"data: [DONE]")]
assert EVENT in CHUNKS[0]


def run(n: int, db: Path, pricing: bool) -> tuple[float, float, int]:
    """(calls/s by the wall clock, calls per CPU second of this process, calls priced)."""
    rec = Recorder(db, serve=False, pricing=pricing, helpers=0)
    rec.start()
    if rec.pricer is not None:
        rec.pricer.warm()  # as at a run's start, before the first call
    calls = [make_call() for _ in range(n)]
    t0, c0 = time.perf_counter(), time.process_time()
    for call in calls:
        rec.call_started(call.started())
        for chunk in PRICED_CHUNKS:
            rec.call_chunk(call.id, chunk)
        bench_recorder.finish(call)
        call.response_body = b"".join(PRICED_CHUNKS)
        rec.call_finished(call.finished())
    deadline = time.monotonic() + 600
    while rec.written + rec.dropped_total < n and time.monotonic() < deadline:
        time.sleep(0.01)
    rate, cpu_rate = n / (time.perf_counter() - t0), n / (time.process_time() - c0)
    rec.close()
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        priced = con.execute("SELECT count(*) FROM calls WHERE cost_usd IS NOT NULL").fetchone()[0]
    return rate, cpu_rate, priced


def one_call() -> dict:
    import genai_prices

    pricer = Pricer(None, prices_file=None)
    pricer.warm()
    usage = Usage(input_tokens=1200, output_tokens=80, cache_read_tokens=1024)
    when = datetime.now(UTC)
    m = 20000
    t0 = time.perf_counter()
    for _ in range(m):
        pricer.price(usage, provider="openai", models=("gpt-4o-2024-08-06", "gpt-4o"), url=None, when=when)
    cached = (time.perf_counter() - t0) / m
    g = genai_prices.Usage(input_tokens=1200, output_tokens=80, cache_read_tokens=1024)
    t0 = time.perf_counter()
    for _ in range(2000):
        genai_prices.calc_price(g, "gpt-4o-2024-08-06", provider_id="openai", genai_request_timestamp=when)
    genai = (time.perf_counter() - t0) / 2000
    return {"price_one_call_us": round(cached * 1e6, 1), "genai_calc_price_us": round(genai * 1e6, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000, metavar="N")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ratios, cpu_ratios, on_rates, off_rates = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            off, off_cpu, _ = run(args.calls, Path(tmp) / f"off{i}.duckdb", pricing=False)
            on, on_cpu, priced = run(args.calls, Path(tmp) / f"on{i}.duckdb", pricing=True)
            assert priced == args.calls, f"only {priced} of {args.calls} calls were priced"
            off_rates.append(off)
            on_rates.append(on)
            ratios.append(on / off)
            cpu_ratios.append(on_cpu / off_cpu)
    # On a shared machine the wall-clock rate swings with the neighbours' load; the recorder's
    # own CPU time per call (its every thread, DuckDB's included) swings far less.
    print(json.dumps({"calls": args.calls, "rounds": args.rounds,
                      "pricing_off_calls_per_s": [round(r) for r in off_rates],
                      "pricing_on_calls_per_s": [round(r) for r in on_rates],
                      "ratio_on_vs_off_median": round(statistics.median(ratios), 3),
                      "cpu_ratio_on_vs_off_median": round(statistics.median(cpu_ratios), 3),
                      **one_call()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
