"""The `llmtap` command as a user runs it: start-up lines, one line per call, clean stop."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import httpx
import pytest

from fakeprovider import FakeProvider


def llmtap(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmtap", *args], capture_output=True, text=True, timeout=120, **kw)


class Lines:
    """Reads a pipe on a thread so the test can wait for a line without blocking forever."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.ended = threading.Event()  # the process closed the pipe
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe) -> None:
        for line in pipe:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        self.ended.set()

    def wait_for(self, text: str, timeout: float = 60) -> str:
        with self._cond:
            found = self._cond.wait_for(lambda: next((l for l in self.lines if text in l), None), timeout)
        assert found, f"no line with {text!r} in {self.lines}"
        return found


def test_run_prints_where_it_listens_a_line_per_call_and_stops_on_sigterm(tmp_path: Path, fake: FakeProvider) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"providers:\n  local: {{base_url: '{fake.url}/v1', api: openai}}\n"
                     "routes:\n  - match: {model: fast}\n    targets: [{provider: local, model: real-model}]\n")
    db = tmp_path / "calls.duckdb"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtap", "run", "--db", str(db), "--rules", str(rules), "--confdir", str(tmp_path / "ca"),
         "--proxy", "127.0.0.1:0", "--gateway", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        err, out = Lines(proc.stderr), Lines(proc.stdout)
        gateway = err.wait_for("gateway").split()[1].split("/<provider>")[0]
        assert "(1 routes)" in err.wait_for("rules")
        # A client keeps its connection alive across calls, as every SDK does, and still holds
        # it when llmtap is stopped.
        with httpx.Client(timeout=30) as client:
            r = client.post(f"{gateway}/local/chat/completions", headers={"user-agent": "agent/1.0"},
                            json={"model": "fast", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
            line = out.wait_for("fast → real-model")
            assert "agent/1.0" in line and "local" in line and " 200 " in line
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        assert err.ended.wait(10)
        # Nothing but the start-up banner and the stop line: no traceback, and no leak report
        # from DuckDB's bindings.
        assert err.lines[-1] == f"llmtap: stopped; 1 call committed to {db}, none lost\n"
        assert not [l for l in err.lines[:-1] if not l.startswith(("llmtap ", "       "))], "".join(err.lines)
        with duckdb.connect(str(db), read_only=True) as con:
            assert con.execute("SELECT model_sent, status FROM calls").fetchall() == [("real-model", 200)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_rules_file_ends_start_up_with_the_problem(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("routes:\n  - match: {model: x}\n    targets: [{provider: opnai}]\n")
    r = llmtap("run", "--no-record", "--rules", str(rules), "--confdir", str(tmp_path / "ca"))
    assert r.returncode == 2
    assert f"{rules}:3: route `route 1`: unknown provider `opnai`; did you mean `openai`?" in r.stderr


def test_env_and_wrap_send_a_tool_through_the_proxy(tmp_path: Path) -> None:
    r = llmtap("env", "--proxy", "127.0.0.1:9999", "--confdir", str(tmp_path / "ca"))
    exports = dict(line.removeprefix("export ").split("=", 1) for line in r.stdout.splitlines())
    assert exports["HTTPS_PROXY"] == "http://127.0.0.1:9999"
    bundle = Path(exports["SSL_CERT_FILE"])
    ca = (tmp_path / "ca" / "mitmproxy-ca-cert.pem").read_text()
    # The bundle trusts llmtap's CA and still the public CAs (tunnelled hosts must verify).
    assert ca in bundle.read_text() and bundle.read_text().count("BEGIN CERTIFICATE") > 10
    assert exports["NODE_EXTRA_CA_CERTS"] == str(tmp_path / "ca" / "mitmproxy-ca-cert.pem")
    w = llmtap("wrap", "--proxy", "127.0.0.1:9999", "--confdir", str(tmp_path / "ca"), "--",
               sys.executable, "-c", "import os; print(os.environ['HTTPS_PROXY'], os.environ['REQUESTS_CA_BUNDLE'])")
    assert w.returncode == 0 and w.stdout.split() == ["http://127.0.0.1:9999", str(bundle)]


def test_help_teaches_both_ways_in() -> None:
    r = llmtap("run", "--help")
    assert "HTTPS_PROXY" in r.stdout and "http://127.0.0.1:8081/openai" in r.stdout and "--rules" in r.stdout
    top = llmtap("--help")
    for command in ("run", "env", "wrap", "rules"):
        assert command in top.stdout


# -- what a new user and the agent tools run into (issue 14) --------------------------------------
def start_run(tmp_path: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "llmtap", "run", "--confdir", str(tmp_path / "ca"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_ctrl_c_says_how_many_calls_were_committed_and_gateway_rows_keep_the_clients_host(
        tmp_path: Path, fake: FakeProvider) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"providers:\n  local: {{base_url: '{fake.url}/v1', api: openai}}\n")
    db = tmp_path / "calls.duckdb"
    # Its own process group, as a terminal runs it: Ctrl-C sends SIGINT to the whole group,
    # the recorder process included.
    proc = start_run(tmp_path, "--db", str(db), "--rules", str(rules), "--proxy", "off",
                     "--gateway", "127.0.0.1:0", "-q", start_new_session=True)
    try:
        err = Lines(proc.stderr)
        gateway = re.search(r"(http://\S+)/<provider>", err.wait_for("gateway")).group(1)
        with httpx.Client(timeout=30) as client:
            for _ in range(3):
                r = client.post(f"{gateway}/local/chat/completions",
                                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
        assert err.ended.wait(10)
        assert err.lines[-1] == f"llmtap: stopped; 3 calls committed to {db}, none lost\n", "".join(err.lines)
        with duckdb.connect(str(db), read_only=True) as con:
            hosts = [json.loads(h)["host"] for (h,) in con.execute("SELECT request_headers FROM calls").fetchall()]
        assert hosts == [gateway.removeprefix("http://")] * 3  # not the relay's 127.0.0.1:<port>
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("flag", ["--proxy", "--gateway"])
def test_a_busy_port_is_said_once_with_the_flag_that_moves_it(tmp_path: Path, flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = "--gateway" if flag == "--proxy" else "--proxy"
        r = llmtap("run", "--no-record", "--confdir", str(tmp_path / "ca"), flag, f"127.0.0.1:{port}",
                   other, "127.0.0.1:0")
    assert r.returncode == 2
    what = flag.removeprefix("--")
    assert r.stderr == (f"llmtap: port 127.0.0.1:{port} ({what}) is in use by another program; "
                        f"choose another with {flag} HOST:PORT\n")


def record(db: Path, ages: list[timedelta]) -> None:
    """Calls into `db` as `llmtap run` would have recorded them, started `ages` ago."""
    from llmtap.recorder.record import Call, new_id
    from llmtap.recorder.recorder import Recorder

    rec = Recorder(db, serve=False)
    rec.start()
    try:
        for age in ages:
            call = Call(id=new_id(), started_at=datetime.now(timezone.utc) - age, method="POST",
                        url="http://127.0.0.1:8081/openai/chat/completions", api="openai.chat",
                        model_requested="gpt-4o", model_sent="gpt-4o", provider="openai", status=200,
                        attempts=1, duration_ms=12.0, request_body=b'{"model":"gpt-4o","messages":[]}',
                        response_headers={"content-type": "application/json"}, response_body=b"{}")
            rec.call_finished(call.finished([]))
    finally:
        rec.close()


def test_since_and_until_take_the_uis_ages_in_stats_and_export(tmp_path: Path) -> None:
    db = tmp_path / "calls.duckdb"
    record(db, [timedelta(minutes=5), timedelta(minutes=10), timedelta(hours=5), timedelta(days=3)])
    recent = llmtap("stats", "--db", str(db), "--since", "2h", "--json")
    assert recent.returncode == 0, recent.stderr
    assert [r["calls"] for r in json.loads(recent.stdout)] == [2]
    older = llmtap("stats", "--db", str(db), "--since", "7d", "--until", "1h", "--json")
    assert [r["calls"] for r in json.loads(older.stdout)] == [2]
    out = tmp_path / "week.parquet"
    exp = llmtap("export", "--db", str(db), "--out", str(out), "--since", "1w", "--until", "7m")
    assert exp.returncode == 0 and "exported 3 calls" in exp.stderr, exp.stderr
    bad = llmtap("stats", "--db", str(db), "--until", "yesterday")
    assert bad.returncode == 2 and "--until 'yesterday': expected an age like 2h" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_export_writes_the_format_the_file_name_asks_for(tmp_path: Path) -> None:
    db = tmp_path / "calls.duckdb"
    record(db, [timedelta(minutes=1), timedelta(minutes=2)])
    for name, reader in (("calls.csv", "read_csv"), ("calls.ndjson", "read_json"), ("calls.parquet", "read_parquet")):
        r = llmtap("export", "--db", str(db), "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        with duckdb.connect() as con:
            rows = con.execute(f"SELECT model_sent, status FROM {reader}(?)", [str(tmp_path / name)]).fetchall()
        assert rows == [("gpt-4o", 200)] * 2, name
    assert (tmp_path / "calls.csv").read_text().startswith("id,started_at,")
    forced = llmtap("export", "--db", str(db), "--out", str(tmp_path / "calls.data"), "--format", "csv")
    assert forced.returncode == 0 and (tmp_path / "calls.data").read_text().startswith("id,")
    unknown = llmtap("export", "--db", str(db), "--out", str(tmp_path / "calls.xlsx"))
    assert unknown.returncode == 2 and "'.xlsx' names no format" in unknown.stderr
    assert ".parquet, .csv, .jsonl" in unknown.stderr and "--format parquet|csv|jsonl" in unknown.stderr
    assert not (tmp_path / "calls.xlsx").exists()


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    db = tmp_path / "calls.duckdb"
    record(db, [timedelta(minutes=1)])
    # `llmtap stats --json | head -0`: the reader is gone before llmtap writes a byte.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, "-m", "llmtap", "stats", "--db", str(db), "--json"],
                           stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert r.stderr == ""
    assert r.returncode == 141


def test_rules_check_says_an_unknown_match_key_once(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("routes:\n  - match: {modle: 'gpt-4o*'}\n    targets: [{provider: openai}]\n")
    r = llmtap("rules", "check", str(rules))
    assert r.returncode == 2
    assert "unknown key `modle`; did you mean `model`?" in r.stderr
    assert "match is empty" not in r.stderr and "1 problem" in r.stderr.splitlines()[0]


@pytest.mark.parametrize("command", ["run", "stats", "export", "env", "wrap", "sql"])
def test_help_is_wrapped_to_the_terminal_and_every_argument_is_described(command: str) -> None:
    r = llmtap(command, "--help", env={**os.environ, "COLUMNS": "60"})
    assert r.returncode == 0
    # Prose (unindented) wraps to the width; indented lines are examples, kept as written.
    long = [line for line in r.stdout.splitlines() if len(line) > 60 and not line.startswith(" ")]
    assert not long, r.stdout
    from llmtap.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    undescribed = [a.dest for a in sub.choices[command]._actions if not a.help]
    assert not undescribed


def test_a_database_another_llmtap_run_records_into_ends_start_up_before_listening(tmp_path: Path) -> None:
    """The recorder process starts while the proxy loads; when it refuses (another `llmtap run`
    records into the file: the one case to refuse), `llmtap run` ends with its message before
    either port is taken."""
    db = tmp_path / "calls.duckdb"
    first = subprocess.Popen(
        [sys.executable, "-m", "llmtap", "run", "--db", str(db), "--confdir", str(tmp_path / "ca"),
         "--proxy", "off", "--gateway", "127.0.0.1:0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        Lines(first.stderr).wait_for("gateway")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        r = llmtap("run", "--db", str(db), "--confdir", str(tmp_path / "ca"), "--proxy", "off",
                   "--gateway", f"127.0.0.1:{port}")
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"llmtap: cannot record into {db}: ") and f"pid {first.pid}" in r.stderr
    assert "gateway" not in r.stderr  # it never said it listens


def test_starting_the_proxy_loads_neither_duckdb_nor_mitmproxys_unused_addons() -> None:
    """What `llmtap run` imports before it listens: DuckDB is the recorder process's, and
    mitmproxy's default addons (Flask for mitm.it, ldap3 ...) are never used; loading them
    was most of a second of start-up. mitmproxy's own default_addons() still works."""
    code = ("import sys\n"
            "from llmtap.cli import build_parser\n"
            "build_parser().parse_args(['run'])\n"
            "import llmtap.addons.runner, llmtap.addons.commands\n"
            "from llmtap.addons.runner import _mitm_addons\n"
            "_mitm_addons()\n"
            "print(sorted(m for m in ('duckdb', 'flask', 'ldap3', 'mitmproxy.addons.onboarding') if m in sys.modules))\n"
            "from mitmproxy import addons\n"
            "print(len(addons.default_addons()))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["[]", "31"]


def test_a_command_duckdb_stops_for_ctrl_c_ends_with_130_and_no_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    # DuckDB's bindings raise RuntimeError('Query interrupted') for a Ctrl-C during a query on
    # the main thread (`llmtap stats` on a file at rest, say), where a KeyboardInterrupt was meant.
    from llmtap import cli

    def fails(message: str) -> argparse.ArgumentParser:
        def run(args: argparse.Namespace) -> int:
            raise RuntimeError(message)
        parser = argparse.ArgumentParser()
        parser.set_defaults(func=run, command="wrap")  # "wrap": leaves this process's umask alone
        return parser

    monkeypatch.setattr(cli, "build_parser", lambda: fails("Query interrupted"))
    assert cli.main([]) == 130
    monkeypatch.setattr(cli, "build_parser", lambda: fails("something else broke"))
    with pytest.raises(RuntimeError, match="something else"):
        cli.main([])
