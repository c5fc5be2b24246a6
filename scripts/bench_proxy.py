#!/usr/bin/env python3
"""Proxy benchmark: llmtap against bare mitmdump, interleaved in one run, same fake provider.

Measures, for direct / mitmdump (reverse) / llmtap gateway / llmtap proxy listener:
  - p50 latency of small non-streamed calls at concurrency 1, and the latency each proxy adds
    over direct; llmtap's added latency as a ratio of mitmdump's (target <= 1.25x);
  - throughput at concurrency 16 (target llmtap >= 0.8x mitmdump);
  - streamed time-to-first-byte with 5 ms between chunks (target within 5 ms of direct);
  - llmtap with recording on vs off (target within 10%): throughput at c=16, and the latency
    added at c=1;
  - a soak: N calls through a route whose primary fails 6% of the time at random (503, 429,
    reset), with a healthy fallback; target: zero failures seen by the client.

Everything runs on 127.0.0.1; every process it starts is stopped at the end.
    .venv/bin/python scripts/bench_proxy.py            # quick (~2 min)
    .venv/bin/python scripts/bench_proxy.py --full     # the issue's sizes (10,000-call soak)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmtap.addons.upstream import Origin, Pool  # noqa: E402  (a lean client keeps client noise low)

PY = sys.executable
BODY = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
SBODY = json.dumps({"model": "bench-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {proc.args}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening")


def start_fake(*extra: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([PY, str(ROOT / "tests" / "fakeprovider.py"), "--port", "0", *extra],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        raise RuntimeError(f"fake provider did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


class Target:
    def __init__(self, name: str, port: int, path: str, proxy: bool = False) -> None:
        self.name, self.port, self.path, self.proxy = name, port, path, proxy


async def one(pool: Pool, t: Target, body: bytes, fake_port: int) -> tuple[float, float, int]:
    """(latency ms, ttfb ms, status) of one call."""
    target = f"http://127.0.0.1:{fake_port}{t.path}" if t.proxy else t.path
    host = f"127.0.0.1:{fake_port}" if t.proxy else f"127.0.0.1:{t.port}"
    headers = [(b"host", host.encode()), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), (b"authorization", b"Bearer sk-bench")]
    t0 = time.perf_counter()
    resp = await pool.request("POST", Origin("http", "127.0.0.1", t.port), target, headers, body,
                              connect_timeout=10, first_byte_timeout=60)
    ttfb = None
    async for chunk in resp.aiter_raw():
        if ttfb is None and chunk:
            ttfb = time.perf_counter()
    end = time.perf_counter()
    return (end - t0) * 1000, ((ttfb or end) - t0) * 1000, resp.status


async def run_batch(t: Target, n: int, conc: int, body: bytes, fake_port: int) -> tuple[list[float], list[float], float, int]:
    pool = Pool()
    lat: list[float] = []
    ttfb: list[float] = []
    errors = 0
    remaining = n

    async def worker() -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            try:
                a, b, status = await one(pool, t, body, fake_port)
                lat.append(a)
                ttfb.append(b)
                errors += status != 200
            except Exception:
                errors += 1

    # warm the keep-alive connections first, outside the timing
    await asyncio.gather(*(one(pool, t, body, fake_port) for _ in range(conc)))
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    wall = time.perf_counter() - t0
    await pool.aclose()
    return lat, ttfb, n / wall, errors


def p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the issue's sizes (slower)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--soak", type=int, default=None, help="calls in the soak (default 2000, --full 10000)")
    a = ap.parse_args()
    rounds = a.rounds or (8 if a.full else 4)
    per = 300 if a.full else 150
    soak_n = a.soak or (10000 if a.full else 2000)

    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="llmtap-bench-"))
    try:
        fake, fport = start_fake("--bench", "--chunks", "20")
        sfake, sport = start_fake("--bench", "--chunks", "20", "--chunk-delay-ms", "5")
        flaky, flport = start_fake("--bench", "--chunks", "5", "--fail-rate", "0.06", "--seed", "7")
        procs += [fake, sfake, flaky]
        rules = tmp / "rules.yaml"
        rules.write_text(
            "providers:\n"
            f"  fake: {{base_url: 'http://127.0.0.1:{fport}/v1', api: openai}}\n"
            f"  sfake: {{base_url: 'http://127.0.0.1:{sport}/v1', api: openai}}\n"
            f"  flaky: {{base_url: 'http://127.0.0.1:{flport}/v1', api: openai}}\n"
            "routes:\n"
            "  - match: {model: 'soak*'}\n"
            "    targets: [{provider: flaky}, {provider: fake}]\n"
            "    retry: {attempts: 1, backoff_ms: 0, on: [connect, timeout, 429, 5xx]}\n"
        )
        mport, m2port = free_port(), free_port()
        mitm = subprocess.Popen([str(Path(PY).parent / "mitmdump"), "-q", "--mode",
                                 f"reverse:http://127.0.0.1:{fport}@127.0.0.1:{mport}",
                                 "--mode", f"reverse:http://127.0.0.1:{sport}@127.0.0.1:{m2port}",
                                 "--set", "connection_strategy=lazy", "--set", f"confdir={tmp / 'mitm'}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(mitm)
        ports = {k: free_port() for k in ("p_rec", "g_rec", "p_off", "g_off")}
        llm = subprocess.Popen([PY, "-m", "llmtap", "run", "-q", "--rules", str(rules), "--db", str(tmp / "b.duckdb"),
                                "--confdir", str(tmp / "ca"), "--proxy", f"127.0.0.1:{ports['p_rec']}",
                                "--gateway", f"127.0.0.1:{ports['g_rec']}"], stderr=subprocess.PIPE)
        llm_off = subprocess.Popen([PY, "-m", "llmtap", "run", "-q", "--no-record", "--rules", str(rules),
                                    "--confdir", str(tmp / "ca"), "--proxy", f"127.0.0.1:{ports['p_off']}",
                                    "--gateway", f"127.0.0.1:{ports['g_off']}"], stderr=subprocess.PIPE)
        procs += [llm, llm_off]
        for port, proc in ((mport, mitm), (m2port, mitm), (ports["g_rec"], llm), (ports["p_rec"], llm),
                           (ports["g_off"], llm_off)):
            wait_port(port, proc)

        targets = [
            Target("direct", fport, "/v1/chat/completions"),
            Target("mitmdump", mport, "/v1/chat/completions"),
            Target("llmtap-gateway", ports["g_rec"], "/fake/chat/completions"),
            Target("llmtap-proxy", ports["p_rec"], "/v1/chat/completions", proxy=True),
            Target("llmtap-norecord", ports["g_off"], "/fake/chat/completions"),
        ]
        stream_targets = [
            Target("direct", sport, "/v1/chat/completions"),
            Target("mitmdump", m2port, "/v1/chat/completions"),
            Target("llmtap-gateway", ports["g_rec"], "/sfake/chat/completions"),
        ]
        lat1: dict[str, list[float]] = {t.name: [] for t in targets}
        thr16: dict[str, list[float]] = {t.name: [] for t in targets}
        ttfb: dict[str, list[float]] = {t.name: [] for t in stream_targets}
        errs: dict[str, int] = {}
        print(f"interleaving {rounds} rounds: {per} calls at c=1, {per * 4} at c=16, 40 streams each ...",
              file=sys.stderr)
        for r in range(rounds):
            for t in targets:
                fp = sport if t.name == "llmtap-proxy-s" else fport
                lat, _, _, e1 = asyncio.run(run_batch(t, per, 1, BODY, fp))
                _, _, rate, e2 = asyncio.run(run_batch(t, per * 4, 16, BODY, fp))
                lat1[t.name] += lat
                thr16[t.name].append(rate)
                errs[t.name] = errs.get(t.name, 0) + e1 + e2
            for t in stream_targets:
                _, tt, _, e3 = asyncio.run(run_batch(t, 40 // rounds + 5, 1, SBODY, sport))
                ttfb[t.name] += tt
                errs[t.name] = errs.get(t.name, 0) + e3
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr)

        print(f"soak: {soak_n} calls through a primary failing 6% at random ...", file=sys.stderr)
        soak = Target("llmtap-soak", ports["g_rec"], "/fake/chat/completions")
        soak_body = json.dumps({"model": "soak-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
        _, _, soak_rate, soak_err = asyncio.run(run_batch(soak, soak_n, 8, soak_body, fport))

        d = statistics.median(lat1["direct"])
        m_add = statistics.median(lat1["mitmdump"]) - d
        out = {"p50_ms": {}, "added_p50_ms": {}, "throughput_c16_rps": {}, "ttfb_p50_ms": {}, "errors": errs}
        for name, values in lat1.items():
            out["p50_ms"][name] = round(statistics.median(values), 3)
            out["added_p50_ms"][name] = round(statistics.median(values) - d, 3)
            out["throughput_c16_rps"][name] = round(statistics.median(thr16[name]), 1)
        for name, values in ttfb.items():
            out["ttfb_p50_ms"][name] = round(statistics.median(values), 2)
        g_add = out["added_p50_ms"]["llmtap-gateway"]
        pr_add = out["added_p50_ms"]["llmtap-proxy"]
        out["ratios"] = {
            "gateway_added_latency_vs_mitmdump": round(g_add / m_add, 2),
            "proxy_added_latency_vs_mitmdump": round(pr_add / m_add, 2),
            "gateway_throughput_vs_mitmdump": round(out["throughput_c16_rps"]["llmtap-gateway"] / out["throughput_c16_rps"]["mitmdump"], 2),
            "proxy_throughput_vs_mitmdump": round(out["throughput_c16_rps"]["llmtap-proxy"] / out["throughput_c16_rps"]["mitmdump"], 2),
            "recording_on_vs_off_throughput": round(out["throughput_c16_rps"]["llmtap-gateway"] / out["throughput_c16_rps"]["llmtap-norecord"], 2),
            # One call at a time, as an agent makes them: the latency the proxy adds, with and without recording.
            "recording_on_vs_off_added_latency": round(g_add / out["added_p50_ms"]["llmtap-norecord"], 2),
            "stream_ttfb_minus_direct_ms": round(out["ttfb_p50_ms"]["llmtap-gateway"] - out["ttfb_p50_ms"]["direct"], 2),
        }
        out["soak"] = {"calls": soak_n, "client_failures": soak_err, "rate_rps": round(soak_rate, 1)}
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
