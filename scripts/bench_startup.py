#!/usr/bin/env python3
"""How long `llmtap run` takes to start: until both ports accept, and until a first call
through the gateway to a fake provider (tests/fakeprovider.py) is answered.

Two cases: a first start (a fresh HOME: llmtap creates its CA, config and data folders and the
DuckDB file) and a later start (the same HOME again). The baseline, measured in the same run,
is bare `mitmdump` listening on one port with its CA already made: what any mitmproxy-based
proxy costs on this machine. Each figure is min / median / max of N starts, and the median as a
ratio to the baseline's.

    .venv/bin/python scripts/bench_startup.py -n 10
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_ports(proc: subprocess.Popen, ports: list[int], t0: float) -> float:
    """Seconds from t0 until every port accepts a connection."""
    waiting = list(ports)
    while waiting:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening: {proc.stderr.read() if proc.stderr else ''}")
        if time.perf_counter() - t0 > TIMEOUT_S:
            raise RuntimeError(f"ports {waiting} not accepting after {TIMEOUT_S} s")
        if accepts(waiting[0]):
            waiting.pop(0)
        else:
            time.sleep(0.002)
    return time.perf_counter() - t0


def first_call(gateway: int) -> None:
    body = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{gateway}/fake/chat/completions", data=body, method="POST",
                                 headers={"content-type": "application/json", "authorization": "Bearer sk-bench"})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"first call answered {resp.status}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_llmtap(home: Path, rules: Path) -> tuple[float, float]:
    """(seconds until both ports accept, seconds until the first call is answered)."""
    proxy, gateway = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_") and k not in ("HTTPS_PROXY", "HTTP_PROXY")}
    env["HOME"] = str(home)
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "llmtap"), "run", "--quiet", "--rules", str(rules),
                             "--proxy", f"127.0.0.1:{proxy}", "--gateway", f"127.0.0.1:{gateway}"],
                            env=env, cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        listening = wait_ports(proc, [gateway, proxy], t0)
        first_call(gateway)
        answered = time.perf_counter() - t0
    finally:
        stop(proc)
    return listening, answered


def start_mitmdump(confdir: Path) -> float:
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "mitmdump"), "-q", "--listen-host", "127.0.0.1", "-p", str(port),
                             "--set", f"confdir={confdir}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        return wait_ports(proc, [port], t0)
    finally:
        stop(proc)


def summary(name: str, values: list[float], base: float | None) -> str:
    med = statistics.median(values)
    ratio = f"  {med / base:4.1f}x baseline" if base else ""
    return (f"{name:<34} min {min(values):6.3f} s  median {med:6.3f} s  max {max(values):6.3f} s{ratio}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=5, help="starts per case (default 5)")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from fakeprovider import FakeProvider

    fake = FakeProvider("127.0.0.1", 0)
    fake.start()
    results: dict[str, list[float]] = {k: [] for k in ("base", "first_listen", "first_call", "later_listen",
                                                        "later_call")}
    with tempfile.TemporaryDirectory(prefix="llmtap-bench-startup-") as tmp:
        tmpdir = Path(tmp)
        rules = tmpdir / "rules.yaml"
        rules.write_text(f"providers:\n  fake: {{base_url: {fake.url}/v1, api: openai}}\nroutes: []\n")
        confdir = tmpdir / "mitmdump-ca"
        start_mitmdump(confdir)  # its CA, made once: the baseline is a later start too
        later_home = tmpdir / "later"
        later_home.mkdir()
        start_llmtap(later_home, rules)  # the later case's first start, not counted
        try:
            # Interleaved, so that a machine getting busier shifts every case alike.
            for i in range(a.n):
                results["base"].append(start_mitmdump(confdir))
                home = tmpdir / f"first{i}"
                home.mkdir()
                listen, call = start_llmtap(home, rules)
                results["first_listen"].append(listen)
                results["first_call"].append(call)
                listen, call = start_llmtap(later_home, rules)
                results["later_listen"].append(listen)
                results["later_call"].append(call)
                print(f"  round {i + 1}/{a.n}", file=sys.stderr)
        finally:
            fake.close()
    base = statistics.median(results["base"])
    print(summary("baseline: mitmdump listening", results["base"], None))
    print(summary("first start: both ports accept", results["first_listen"], base))
    print(summary("first start: first call answered", results["first_call"], base))
    print(summary("later start: both ports accept", results["later_listen"], base))
    print(summary("later start: first call answered", results["later_call"], base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
