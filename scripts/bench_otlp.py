#!/usr/bin/env python3
"""OTLP export benchmark: `llmtap run --otlp` (spans to a loopback OTLP/HTTP receiver) against
the same recording `llmtap run` without it, interleaved in one run, same fake provider.

Measures, for both: throughput at concurrency 16 and the latency added at concurrency 1 over
calling the fake directly; the ratio with export on vs off (target: within 3%, i.e. >= 0.97
for throughput, <= 1.03 for added latency). Also how many spans the receiver got of the calls
made (the export keeping up, not dropping).

Everything runs on 127.0.0.1; every process it starts is stopped at the end.
    .venv/bin/python scripts/bench_otlp.py             # quick (~1-2 min)
    .venv/bin/python scripts/bench_otlp.py --rounds 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_proxy import BODY, PY, Target, free_port, run_batch, start_fake, wait_port  # noqa: E402


def start_receiver() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([PY, str(ROOT / "tests" / "otlpreceiver.py")], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("READY "):
        raise RuntimeError(f"OTLP receiver did not start: {line!r}")
    return proc, line.split()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (the recorder process), from /proc."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per", type=int, default=150, help="calls per c=1 batch (x4 at c=16)")
    a = ap.parse_args()
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="llmtap-bench-otlp-"))
    rx = None
    try:
        fake, fport = start_fake("--bench", "--chunks", "20")
        rx, rx_url = start_receiver()
        procs += [fake]
        rules = tmp / "rules.yaml"
        rules.write_text(f"providers:\n  fake: {{base_url: 'http://127.0.0.1:{fport}/v1', api: openai}}\n")
        ports = {"on": free_port(), "off": free_port()}
        runs = {}
        for name, extra in (("on", ["--otlp", rx_url]), ("off", [])):
            runs[name] = subprocess.Popen(
                [PY, "-m", "llmtap", "run", "-q", "--rules", str(rules), "--db", str(tmp / f"{name}.duckdb"),
                 "--confdir", str(tmp / "ca"), "--proxy", "off", "--gateway", f"127.0.0.1:{ports[name]}", *extra],
                stderr=subprocess.PIPE)
            procs.append(runs[name])
        for name, proc in runs.items():
            wait_port(ports[name], proc)
        targets = [Target("direct", fport, "/v1/chat/completions"),
                   Target("otlp-on", ports["on"], "/fake/chat/completions"),
                   Target("otlp-off", ports["off"], "/fake/chat/completions")]
        lat1: dict[str, list[float]] = {t.name: [] for t in targets}
        thr16: dict[str, list[float]] = {t.name: [] for t in targets}
        calls_on = 0
        print(f"interleaving {a.rounds} rounds: {a.per} calls at c=1, {a.per * 4} at c=16 ...", file=sys.stderr)
        for r in range(a.rounds):
            # Alternate which of the two goes first, so neither always follows the other's backlog.
            order = targets if r % 2 == 0 else [targets[0], targets[2], targets[1]]
            for t in order:
                lat, _, _, e1 = asyncio.run(run_batch(t, a.per, 1, BODY, fport))
                _, _, rate, e2 = asyncio.run(run_batch(t, a.per * 4, 16, BODY, fport))
                if e1 or e2:
                    raise RuntimeError(f"{t.name}: {e1 + e2} calls failed")
                lat1[t.name] += lat
                thr16[t.name].append(rate)
                if t.name == "otlp-on":
                    calls_on += a.per * 5 + 1 + 16  # the batches and their warm-up calls
            print(f"  round {r + 1}/{a.rounds} done", file=sys.stderr)
        cpu = {name: round(cpu_seconds(proc.pid), 2) for name, proc in runs.items()}
        cpu["receiver"] = round(cpu_seconds(rx.pid), 2)
        for proc in runs.values():
            proc.terminate()
            proc.wait(60)
        time.sleep(0.5)  # the receiver answers the last batch before it is stopped
        rx.terminate()
        out_line = rx.stdout.read() if rx.stdout else ""
        rx.wait(15)
        received = int(out_line.split("RECEIVED")[1].split()[0]) if "RECEIVED" in out_line else -1
        d = statistics.median(lat1["direct"])
        result = {
            "p50_ms": {k: round(statistics.median(v), 3) for k, v in lat1.items()},
            "added_p50_ms": {k: round(statistics.median(v) - d, 3) for k, v in lat1.items()},
            "throughput_c16_rps": {k: round(statistics.median(v), 1) for k, v in thr16.items()},
            "throughput_c16_rps_rounds": {k: [round(x) for x in v] for k, v in thr16.items()},
        }
        on, off = result["throughput_c16_rps"]["otlp-on"], result["throughput_c16_rps"]["otlp-off"]
        # Each round measures both within a minute: the median of the rounds' own ratios is
        # less at the mercy of what else the machine does than the ratio of the medians.
        paired = sorted(a_ / b_ for a_, b_ in zip(thr16["otlp-on"], thr16["otlp-off"]))
        result["ratios"] = {
            "otlp_on_vs_off_throughput": round(on / off, 3),
            "otlp_on_vs_off_throughput_paired_median": round(statistics.median(paired), 3),
            "otlp_on_vs_off_added_latency": round(result["added_p50_ms"]["otlp-on"] / result["added_p50_ms"]["otlp-off"], 3),
        }
        # Each call is a span and its attempt a child span: 2 per call.
        # CPU seconds each llmtap (proxy and recorder process) and the receiver used over the run.
        result["cpu_s"] = cpu
        result["spans"] = {"calls_with_export": calls_on, "spans_received": received,
                           "calls_exported": received // 2 if received >= 0 else None}
        print(json.dumps(result, indent=2))
        return 0
    finally:
        for proc in procs + ([rx] if rx is not None else []):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs + ([rx] if rx is not None else []):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
