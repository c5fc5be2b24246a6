"""Everything llmtap writes holds traffic, keys or the CA: it is the user's alone, wherever it is.

The user's umask here is the common 022, and the folder given with --db is an existing 0755 one:
the files llmtap (and DuckDB for it) makes there must still be 0600, its folders 0700.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import duckdb
import httpx

from fakeprovider import FakeProvider
from llmtap.recorder.endpoint import discovery_path
from llmtap.recorder.reader import LocalReader
from llmtap.recorder.recorder import Recorder
from test_cli import Lines, llmtap


def user_umask() -> None:
    os.umask(0o022)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_private(*paths: Path) -> None:
    for path in paths:
        assert path.exists(), f"{path} was not written"
        want = 0o700 if path.is_dir() else 0o600
        assert mode(path) & 0o077 == 0, f"{path} is {oct(mode(path))}, want {oct(want)}"


def assert_private_tree(folder: Path) -> None:
    assert_private(folder, *folder.iterdir())


def start_run(db: Path, confdir: Path, rules: Path) -> tuple[subprocess.Popen, Lines, Lines, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtap", "run", "--db", str(db), "--rules", str(rules), "--confdir", str(confdir),
         "--proxy", "127.0.0.1:0", "--gateway", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=user_umask)
    err, out = Lines(proc.stderr), Lines(proc.stdout)
    gateway = err.wait_for("gateway").split()[1].split("/<provider>")[0]
    return proc, err, out, gateway


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_rules(tmp_path: Path, fake: FakeProvider) -> Path:
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"providers:\n  local: {{base_url: '{fake.url}/v1', api: openai}}\n"
                     "routes:\n  - match: {model: fast}\n    targets: [{provider: local, model: real-model}]\n")
    return rules


def test_run_keeps_the_record_the_token_the_export_and_the_ca_private(tmp_path: Path, fake: FakeProvider) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)  # a folder of the user's that others may list
    db = shared / "calls.duckdb"
    confdir = tmp_path / "config" / "ca"
    proc, err, out, gateway = start_run(db, confdir, write_rules(tmp_path, fake))
    try:
        with httpx.Client(timeout=30, trust_env=False) as client:
            r = client.post(f"{gateway}/local/chat/completions",
                            json={"model": "fast", "messages": [{"role": "user", "content": "my secret prompt"}]})
            assert r.status_code == 200
        out.wait_for("fast → real-model")
        # While it records: the file, its WAL and the endpoint's token.
        assert_private(db, db.with_name(db.name + ".wal"), discovery_path(db))
        exported = shared / "calls.parquet"
        exp = subprocess.run([sys.executable, "-m", "llmtap", "export", "--db", str(db), "--out", str(exported)],
                             capture_output=True, text=True, timeout=120, preexec_fn=user_umask)
        assert exp.returncode == 0 and "running llmtap" in exp.stderr, exp.stderr
        assert_private(exported)
        assert_private_tree(confdir)
        assert {"mitmproxy-ca.pem", "mitmproxy-ca-cert.pem"} <= {p.name for p in confdir.iterdir()}
    finally:
        stop(proc)
    assert proc.returncode == 0
    assert mode(shared) == 0o755  # the user's own folder is theirs to set
    assert_private(*shared.iterdir())
    # Nothing to say: it made every file private from the start.
    assert "readable by others" not in "".join(err.lines)


def test_files_an_older_llmtap_left_open_are_made_private_and_said_so(tmp_path: Path, fake: FakeProvider) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    db = shared / "calls.duckdb"
    old = os.umask(0o022)
    try:
        duckdb.connect(str(db)).close()  # a DB from before, 0644
        confdir = tmp_path / "ca"
        confdir.mkdir(mode=0o755)
        from mitmproxy.certs import CertStore

        CertStore.from_store(confdir, "mitmproxy", 2048)  # mitmproxy alone: its certs 0644
    finally:
        os.umask(old)
    assert mode(db) == 0o644 and mode(confdir) == 0o755
    proc, err, out, gateway = start_run(db, confdir, write_rules(tmp_path, fake))
    try:
        with httpx.Client(timeout=30, trust_env=False) as client:
            assert client.post(f"{gateway}/local/chat/completions",
                               json={"model": "fast", "messages": []}).status_code == 200
        out.wait_for("fast → real-model")
        assert_private(db, db.with_name(db.name + ".wal"))
        assert_private_tree(confdir)
    finally:
        stop(proc)
    told = [line for line in err.lines if "readable by others" in line]
    assert len([line for line in told if str(db) in line]) == 1, err.lines
    assert len([line for line in told if str(confdir) in line]) == 1, err.lines


def test_an_export_is_private_whatever_the_umask_of_the_process(tmp_path: Path) -> None:
    db = tmp_path / "calls.duckdb"
    rec = Recorder(db, serve=False)
    rec.start()
    rec.close()
    old = os.umask(0o022)
    try:
        reader = LocalReader(db)
        try:
            for fmt in ("parquet", "jsonl"):
                reader.export(tmp_path / f"all.{fmt}", fmt)
                assert_private(tmp_path / f"all.{fmt}")
        finally:
            reader.close()
    finally:
        os.umask(old)


def test_wrap_keeps_the_users_umask_for_its_command_but_makes_the_ca_private(tmp_path: Path) -> None:
    confdir = tmp_path / "ca"
    confdir.mkdir(mode=0o755)
    mine = confdir / "notes.txt"  # the user's own file in the folder given as --confdir
    mine.write_text("mine")
    mine.chmod(0o644)
    w = subprocess.run([sys.executable, "-m", "llmtap", "wrap", "--proxy", "127.0.0.1:9", "--confdir", str(confdir),
                        "--", sys.executable, "-c", "import os; print(oct(os.umask(0)))"],
                       capture_output=True, text=True, timeout=120, preexec_fn=user_umask)
    assert w.returncode == 0 and w.stdout.strip() == "0o22", w.stderr
    assert_private(confdir, *[p for p in confdir.iterdir() if p != mine])
    assert mode(mine) == 0o644
    env = llmtap("env", "--confdir", str(tmp_path / "ca2"))
    assert env.returncode == 0
    assert_private_tree(tmp_path / "ca2")
