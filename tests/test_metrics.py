"""`llmtap run --metrics`: what Prometheus scrapes while the proxy serves traffic."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fakeprovider import FakeProvider, cut, reset, slow, status
from llmtap.recorder.endpoint import discovery_path
from llmtap.recorder.metrics import BUCKETS_S
from test_cli import Lines

AGENT = "planted-agent/7.7 (secret-session-42)"


class MetricsRun:
    """`llmtap run --metrics 127.0.0.1:0` as a user starts it; gateway and metrics on ports from the OS."""

    def __init__(self, tmp_path: Path, rules: str, *extra: str, metrics: str = "127.0.0.1:0") -> None:
        path = tmp_path / "rules.yaml"
        path.write_text(rules)
        self.db = tmp_path / "calls.duckdb"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmtap", "run", "-q", "--db", str(self.db), "--rules", str(path),
             "--confdir", str(tmp_path / "ca"), "--proxy", "off", "--gateway", "127.0.0.1:0",
             "--metrics", metrics, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err = Lines(self.proc.stderr)
        Lines(self.proc.stdout)
        line = self.err.wait_for("gateway ")
        self.gateway = line[line.index("http://"):].split("/<provider>")[0]
        self.metrics_url = ""
        served = [l for l in self.err.lines if l.startswith("llmtap metrics ")]
        if served:
            self.metrics_url = served[0].split()[2]

    def scrape(self) -> str:
        r = httpx.get(self.metrics_url, timeout=30)
        assert r.status_code == 200, r.text
        return r.text

    def scrape_when(self, done, timeout: float = 120) -> dict[str, list]:
        """Scrape until `done(samples)` holds (the recorder commits every quarter second)."""
        deadline = time.monotonic() + timeout
        while True:
            samples = parse(self.scrape())
            if done(samples):
                return samples
            assert time.monotonic() < deadline, "the scrapes never showed the traffic"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def started() -> Iterator[list[MetricsRun]]:
    runs: list[MetricsRun] = []
    yield runs
    for run in runs:
        run.stop()


def parse(text: str) -> dict[str, list]:
    """sample name -> [(labels, value)], as Prometheus reads the page."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(v for l, v in samples.get(name, []) if all(l.get(k) == want for k, want in labels.items()))


def test_a_scrape_counts_the_traffic_by_provider_model_and_status_with_fallbacks_cuts_and_tokens(
        tmp_path: Path, fake: FakeProvider, fake2: FakeProvider, started: list[MetricsRun]) -> None:
    rules = f"""\
providers:
  local: {{base_url: "{fake.url}/v1", api: openai}}
  backup: {{base_url: "{fake2.url}/v1", api: openai}}
routes:
  - name: fast
    match: {{model: fast}}
    targets: [{{provider: local, model: real-model}}, {{provider: backup, model: backup-model}}]
    retry: {{backoff_ms: 1, on: [503]}}
  - name: sturdy
    match: {{model: sturdy}}
    targets: [{{provider: local, model: reset-model}}, {{provider: backup}}]
    retry: {{backoff_ms: 1, on: [connect]}}
"""
    fake.script_for_model("real-model", status(503))
    fake.script_for_model("bad", status(400))
    fake.script_for_model("cutme", cut(after_events=2))
    fake.script_for_model("reset-model", reset())  # no response at all: a `connect` failure
    run = MetricsRun(tmp_path, rules)
    started.append(run)
    assert run.metrics_url.endswith("/metrics") and run.metrics_url.startswith("http://127.0.0.1:")

    def chat(client: httpx.Client, model: str, stream: bool = False) -> int:
        body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
        try:
            with client.stream("POST", f"{run.gateway}/local/chat/completions", json=body) as r:
                r.read()
                return r.status_code
        except httpx.HTTPError:
            return -1  # the cut stream

    with httpx.Client(timeout=60, headers={"user-agent": AGENT}) as client:
        codes = [chat(client, "m1") for _ in range(3)]
        codes += [chat(client, "m2", stream=True) for _ in range(2)]
        codes += [chat(client, "bad"), chat(client, "fast"), chat(client, "sturdy"), chat(client, "cutme", stream=True)]
    assert codes[:8] == [200, 200, 200, 200, 200, 400, 200, 200]

    s = run.scrape_when(lambda s: total(s, "llmtap_requests_total") >= 9)
    assert total(s, "llmtap_requests_total") == 9
    assert total(s, "llmtap_requests_total", provider="local", model="m1", status_class="2xx", stream="false",
                 api="openai.chat", route="") == 3
    assert total(s, "llmtap_requests_total", provider="local", model="m2", status_class="2xx", stream="true") == 2
    assert total(s, "llmtap_requests_total", provider="local", model="bad", status_class="4xx") == 1
    # The fallback: asked for `fast`, answered by the second target.
    assert total(s, "llmtap_requests_total", provider="backup", model="backup-model", route="fast",
                 status_class="2xx") == 1
    assert total(s, "llmtap_fallbacks_total") == 2
    assert total(s, "llmtap_fallbacks_total", provider="backup", model="backup-model", route="fast") == 1
    assert total(s, "llmtap_fallbacks_total", provider="backup", route="sturdy") == 1
    assert total(s, "llmtap_attempts_total", provider="local", outcome="5xx") == 1
    assert total(s, "llmtap_attempts_total", provider="local", outcome="connect") == 1
    assert total(s, "llmtap_attempts_total", provider="backup", outcome="2xx") == 2
    assert total(s, "llmtap_attempts_total") == 11
    assert total(s, "llmtap_cut_streams_total") == 1
    assert total(s, "llmtap_cut_streams_total", provider="local", model="cutme") == 1
    assert total(s, "llmtap_attempts_total", provider="local", outcome="cut") == 1

    # Histograms reach long reasoning calls, and every finished call is in them.
    for name in ("llmtap_request_duration_seconds", "llmtap_ttfb_seconds"):
        bounds = {float(l["le"]) for l, _ in s[f"{name}_bucket"]}
        assert {60.0, 300.0, 1800.0, 3600.0} <= bounds
        assert total(s, f"{name}_bucket", le="+Inf") == total(s, f"{name}_count")
    assert total(s, "llmtap_request_duration_seconds_count") == 9
    assert total(s, "llmtap_request_duration_seconds_count", model="m1", provider="local") == 3

    # The recorder's own state, read at scrape time.
    assert total(s, "llmtap_recorder_dropped_calls_total") == 0
    assert total(s, "llmtap_recorder_spool_bytes") == 0
    assert total(s, "llmtap_recorder_committed_calls_total") == 9
    assert "llmtap_recorder_queue_depth" in s and "llmtap_calls_in_flight" in s

    # Never a user agent, a session or a key: not as a label, not anywhere on the page.
    page = run.scrape()
    assert "planted-agent" not in page and "secret-session" not in page

    run.proc.terminate()
    assert run.proc.wait(60) == 0
    with duckdb.connect(str(run.db), read_only=True) as con:
        by_db = dict(con.execute("SELECT model_sent, sum(input_tokens) FROM calls WHERE input_tokens IS NOT NULL "
                                 "GROUP BY 1").fetchall())
        outputs = con.execute("SELECT sum(output_tokens) FROM calls").fetchone()[0]
    for model, tokens in by_db.items():
        assert total(s, "llmtap_tokens_total", model=model, kind="input") == tokens
    assert total(s, "llmtap_tokens_total", kind="output") == outputs > 0


def test_calls_in_flight_show_while_a_stream_is_open(tmp_path: Path, fake: FakeProvider,
                                                     started: list[MetricsRun]) -> None:
    fake.script_for_model("long", slow(0.2, chunks=300))  # a minute of stream unless the client leaves
    run = MetricsRun(tmp_path, f"providers:\n  local: {{base_url: '{fake.url}/v1', api: openai}}\n")
    started.append(run)
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{run.gateway}/local/chat/completions",
                           json={"model": "long", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
            pieces = r.iter_raw()  # held: a dropped iterator closes the response
            next(pieces)
            s = run.scrape_when(lambda s: total(s, "llmtap_calls_in_flight") == 1)
            assert total(s, "llmtap_requests_total") == 0
    # The client left mid-stream: no longer in flight, and counted as an answer cut short.
    s = run.scrape_when(lambda s: total(s, "llmtap_requests_total") == 1)
    assert total(s, "llmtap_calls_in_flight") == 0
    assert total(s, "llmtap_cut_streams_total", model="long") == 1


def test_three_hundred_model_names_stay_within_the_cap_and_the_rest_count_as_other(
        tmp_path: Path, fake: FakeProvider, started: list[MetricsRun]) -> None:
    run = MetricsRun(tmp_path, f"providers:\n  local: {{base_url: '{fake.url}/v1', api: openai}}\n")
    started.append(run)
    with httpx.Client(timeout=60) as client:
        for i in range(300):
            r = client.post(f"{run.gateway}/local/chat/completions",
                            json={"model": f"model-{i:03d}-" + "x" * 40, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
    s = run.scrape_when(lambda s: total(s, "llmtap_requests_total") >= 300)
    models = {l["model"] for l, _ in s["llmtap_requests_total"]}
    assert len(models) == 101 and "other" in models  # the default cap of 100, and `other`
    assert total(s, "llmtap_requests_total", model="other") == 200
    assert total(s, "llmtap_requests_total") == 300
    # Every family stays bounded by the cap, histograms included (buckets per model, not per call).
    for name, rows in s.items():
        assert len({l.get("model") for l, _ in rows}) <= 101, name
    assert len(s["llmtap_request_duration_seconds_bucket"]) == 101 * (len(BUCKETS_S) + 1)


def test_a_port_in_use_is_said_naming_the_flag_and_recording_goes_on(
        tmp_path: Path, fake: FakeProvider, started: list[MetricsRun]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        run = MetricsRun(tmp_path, f"providers:\n  local: {{base_url: '{fake.url}/v1', api: openai}}\n",
                         metrics=f"127.0.0.1:{port}")
        started.append(run)
        said = [l for l in run.err.lines if "--metrics" in l]
        assert len(said) == 1, run.err.lines
        assert f"--metrics 127.0.0.1:{port}: cannot listen there" in said[0] and "recording goes on" in said[0]
        assert run.metrics_url == ""
        r = httpx.post(f"{run.gateway}/local/chat/completions", timeout=60,
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        run.proc.terminate()
        assert run.proc.wait(60) == 0
    with duckdb.connect(str(run.db), read_only=True) as con:
        assert con.execute("SELECT model_requested, status FROM calls").fetchall() == [("m", 200)]


def test_the_page_answers_only_at_metrics_and_only_a_loopback_host_name(
        tmp_path: Path, fake: FakeProvider, started: list[MetricsRun]) -> None:
    run = MetricsRun(tmp_path, f"providers:\n  local: {{base_url: '{fake.url}/v1', api: openai}}\n",
                     metrics="0")  # a bare port: loopback
    started.append(run)
    assert run.metrics_url.startswith("http://127.0.0.1:")
    # A web page that rebinds its own name to 127.0.0.1 sends that name as the Host.
    r = httpx.get(run.metrics_url, headers={"host": "attacker.example"}, timeout=30)
    assert r.status_code == 403
    assert httpx.get(run.metrics_url.replace("/metrics", "/"), timeout=30).status_code == 404
    assert httpx.get(run.metrics_url.replace("127.0.0.1", "localhost"), timeout=30).status_code == 200


def test_metrics_without_a_recorder_is_refused_with_the_reason(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "llmtap", "run", "--no-record", "--metrics", "9464",
                        "--confdir", str(tmp_path / "ca")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "--metrics" in r.stderr and "--no-record" in r.stderr
    r = subprocess.run([sys.executable, "-m", "llmtap", "run", "--metrics", "nine"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "--metrics" in r.stderr and "HOST:PORT" in r.stderr


def test_a_recorder_process_started_again_serves_the_metrics_again_on_the_same_port(
        tmp_path: Path, fake: FakeProvider, started: list[MetricsRun]) -> None:
    with socket.socket() as probe:  # a port from the OS, given by number as a user would
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = MetricsRun(tmp_path, f"providers:\n  local: {{base_url: '{fake.url}/v1', api: openai}}\n",
                     metrics=f"127.0.0.1:{port}")
    started.append(run)
    assert run.metrics_url == f"http://127.0.0.1:{port}/metrics"

    def call(model: str) -> None:
        r = httpx.post(f"{run.gateway}/local/chat/completions", timeout=60,
                       json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200

    for _ in range(3):
        call("before")
    run.scrape_when(lambda s: total(s, "llmtap_requests_total", model="before") == 3)
    os.kill(json.loads(discovery_path(run.db).read_text())["pid"], signal.SIGKILL)
    run.err.wait_for("a new recorder process records into")
    for _ in range(2):
        call("after")
    s = run.scrape_when(lambda s: total(s, "llmtap_requests_total", model="after") == 2)
    # Counted from 0 by the new process: only what the dead one may not have reported committed
    # is handed (and counted) again.
    assert total(s, "llmtap_requests_total", model="before") <= 3
    assert sum(1 for l in run.err.lines if l.startswith("llmtap metrics ")) == 2
