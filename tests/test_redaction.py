"""No credential a call carried reaches its record, and no network text reaches the terminal raw.

Written the way a leak happens: a distinct key planted in every place a client or upstream can
put one, all at once, through the real proxy into a real DuckDB file (and its spool, and a
Parquet export); then every column of every table is searched for any of them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import httpx
import pytest

from fakeprovider import FakeProvider, ok, status
from llmtap.addons.commands import format_call_line
from llmtap.recorder.export import export
from llmtap.recorder.recorder import Recorder, spool_path
from llmtap.recorder.redact import fingerprint, redact_headers
from proxyharness import RunningProxy
from test_cli import Lines

# One distinct value per place; none has a well-known key shape unless its name says so, so
# that only exact-value masking can catch it.
AUTH = "authhdr-PLANTED-0001-qwertyuiop"
XAPI = "xapikey-PLANTED-0002-qwertyuiop"
XAUTH = "xauthtok-PLANTED-0003-qwertyuiop"
AZURE = "azurekey-PLANTED-0004-qwertyuiop"
COOKIE = "cookiesess-PLANTED-0005-qwertyuiop"
QUERY = "AIzaQUERY-PLANTED-0006-qwertyuiopasdfghjkl"
BODY = "bodyapikey-PLANTED-0007-qwertyuiop"
NESTED = "nestedtok-PLANTED-0008-qwertyuiop"
PASSWORD = "hunter2"  # short: masked where it stands, not searched for elsewhere
ENV = "envkey-PLANTED-0009-qwertyuiop"  # the key llmtap itself sends to the fallback provider
SHAPED = "sk-ant-api03-PASTEDINMESSAGE-0010-qwertyuiop"  # a key the user pasted into a message
REPLY_SHAPED = "sk-proj-MODELREPLIED-0011-qwertyuiop"  # a key shape in the model's answer
SET_COOKIE = "setcookie-PLANTED-0012-qwertyuiop"  # a session the upstream hands out
CARRIED = [AUTH, XAPI, XAUTH, AZURE, COOKIE, QUERY, BODY, NESTED, ENV]
PLANTED = [*CARRIED, PASSWORD, SHAPED, REPLY_SHAPED, SET_COOKIE]
ESCAPES = "\x1b[2J\x1b]52;c;cHduZWQ=\x07\r\b\x9b31m\u202e"


def _rules(tmp_path: Path, fake: FakeProvider, fake2: FakeProvider) -> Path:
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"""\
providers:
  p1: {{base_url: "{fake.url}/v1", api: openai}}
  p2: {{base_url: "{fake2.url}/v1", api: openai, key_env: LLMTAP_TEST_P2_KEY}}
routes:
  - match: {{model: "fail-*"}}
    targets: [{{provider: p1}}, {{provider: p2}}]
    retry: {{backoff_ms: 1, on: [429, 401]}}
""")
    return rules


def _request(model: str) -> bytes:
    return json.dumps({
        "model": model, "max_tokens": 64, "api_key": BODY,
        "metadata": {"auth": {"access_token": NESTED, "password": PASSWORD}},
        "messages": [{"role": "user", "content": f"here is my key {SHAPED}, keep it safe"}],
    }).encode()


def _traffic(proxy: RunningProxy, fake: FakeProvider, fake2: FakeProvider) -> list[bytes]:
    """Two calls carrying every key: one whose upstreams echo them in their errors and
    headers (a fallback chain), one whose model repeats keys in its answer."""
    echo = " ".join(CARRIED[:-1])
    fake.script(status(429, body={"error": {"message": f"Incorrect API key provided: {echo} {ESCAPES}",
                                            "type": "invalid_request_error"}},
                       headers={"x-echo-key": XAPI, "set-cookie": f"sid={SET_COOKIE}; Path=/; HttpOnly"}),
                ok())
    fake2.script(status(401, body={"error": {"message": f"bad key {ENV}; body said {BODY} {ESCAPES}",
                                             "type": "invalid_request_error"}}))
    fake.reply_text = f"Noted: {BODY} and {REPLY_SHAPED}."
    headers = {
        "authorization": f"Bearer {AUTH}", "x-api-key": XAPI, "x-auth-token": XAUTH, "api-key": AZURE,
        "cookie": f"session={COOKIE}; theme=dark", "content-type": "application/json", "user-agent": "agent/1.0",
    }
    sent = []
    with httpx.Client(timeout=30) as client:
        for model in ("fail-model", "plain-model"):
            body = _request(model)
            sent.append(body)
            r = client.post(f"{proxy.gateway_url}/p1/chat/completions?key={QUERY}", headers=headers, content=body)
            assert r.status_code == (401 if model == "fail-model" else 200)
    return sent


def _dump(con: duckdb.DuckDBPyConnection) -> str:
    """Every value of every table, as text."""
    out = []
    for (table,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall():
        for row in con.execute(f'SELECT * FROM "{table}"').fetchall():
            out += [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v) for v in row]
    return "\n".join(out)


def _assert_clean(text: str, where: str) -> None:
    leaked = [k for k in PLANTED if k in text]
    assert not leaked, f"{where} holds {leaked}"


def test_no_planted_key_reaches_any_column_export_or_call_line(tmp_path: Path, confdir: Path, fake: FakeProvider,
                                                               fake2: FakeProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMTAP_TEST_P2_KEY", ENV)
    db = tmp_path / "llmtap.duckdb"
    recorder = Recorder(db)
    recorder.start()
    try:
        with RunningProxy(_rules(tmp_path, fake, fake2), confdir, sink=recorder) as proxy:
            sent = _traffic(proxy, fake, fake2)
    finally:
        recorder.close()

    # What went on the wire is untouched: the upstream got every key and the body as sent.
    first = fake.requests[0]
    assert first.headers["authorization"] == f"Bearer {AUTH}" and first.headers["x-auth-token"] == XAUTH
    assert f"key={QUERY}" in first.path and first.body == sent[0]
    assert fake2.requests[0].headers["authorization"] == f"Bearer {ENV}"

    with duckdb.connect(str(db)) as con:
        _assert_clean(_dump(con), "the database")
        out = tmp_path / "calls.parquet"
        assert export(con, out) == 2
        _assert_clean(_dump_parquet(con, out), "the Parquet export")
        failed = con.execute("SELECT id, url, request_headers, request_body, error FROM calls "
                             "WHERE model_requested = 'fail-model'").fetchone()
        attempts = con.execute("SELECT n, url, error FROM attempts WHERE call_id = ? ORDER BY n", [failed[0]]).fetchall()
        answered = con.execute("SELECT content, response_body FROM calls WHERE model_requested = 'plain-model'").fetchone()
    assert _key_not_in_file(db)

    # The same key has the same fingerprint in every column and table.
    fp_query = fingerprint(QUERY)
    assert f"key={fp_query}" in failed[1] and f"key={fp_query}" in attempts[0][1]
    headers = json.loads(failed[2])
    assert headers["x-api-key"] == fingerprint(XAPI) and fingerprint(XAPI) in attempts[0][2]
    assert headers["authorization"] == f"Bearer {fingerprint(AUTH)}" and fingerprint(AUTH) in attempts[0][2]
    assert headers["cookie"] == f"session={fingerprint(COOKIE)}; theme={fingerprint('dark')}"
    assert fingerprint(ENV) in attempts[1][2] and fingerprint(ENV) in failed[4]
    # The stored request body is what the client sent, its secret values masked in place.
    doc = json.loads(failed[3])
    assert doc["api_key"] == fingerprint(BODY) and doc["metadata"]["auth"]["password"] == fingerprint(PASSWORD)
    assert doc["max_tokens"] == 64 and doc["messages"][0]["content"] == f"here is my key {fingerprint(SHAPED)}, keep it safe"
    # The model's answer, extracted and raw, with the call's key and a key shape masked.
    assert answered[0] == f"Noted: {fingerprint(BODY)} and {fingerprint(REPLY_SHAPED)}."
    assert fingerprint(BODY) in answered[1]

    # The call line `llmtap run` prints: no key, and printable text only.
    for call, _ in proxy.lines:
        line = format_call_line(call)
        _assert_clean(line, "the call line")
        assert line.isprintable(), repr(line)


def _key_not_in_file(db: Path) -> bool:
    data = db.read_bytes() + (db.with_name(db.name + ".wal").read_bytes() if db.with_name(db.name + ".wal").exists() else b"")
    return not [k for k in CARRIED if k.encode() in data]


def _dump_parquet(con: duckdb.DuckDBPyConnection, path: Path) -> str:
    rows = con.execute(f"SELECT * FROM read_parquet('{path}')").fetchall()
    return "\n".join(v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v) for r in rows for v in r)


def test_no_planted_key_reaches_the_spool_when_the_database_cannot_be_written(
        tmp_path: Path, confdir: Path, fake: FakeProvider, fake2: FakeProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMTAP_TEST_P2_KEY", ENV)
    db = tmp_path / "llmtap.duckdb"
    recorder = Recorder(db)
    recorder.start()

    def full(*args: object, **kw: object) -> None:
        raise OSError(28, "No space left on device")

    recorder._commit = full  # type: ignore[method-assign]
    try:
        with RunningProxy(_rules(tmp_path, fake, fake2), confdir, sink=recorder) as proxy:
            _traffic(proxy, fake, fake2)
    finally:
        recorder.close()
    spooled = spool_path(db).read_text(encoding="utf-8")
    assert spooled.count('{"call"') == 2 and '{"attempt"' in spooled
    _assert_clean(spooled, "the spool")
    # JSON escaping must not hide a key from the search either.
    _assert_clean(json.dumps(json.loads("[" + ",".join(spooled.splitlines()) + "]"), ensure_ascii=False), "the spool")


def test_headers_mask_every_credential_and_keep_counters() -> None:
    got = redact_headers([
        ("Cookie", f"session={COOKIE}; theme=dark"), ("Set-Cookie", f"sid={SET_COOKIE}; Path=/; HttpOnly"),
        ("Proxy-Authorization", f"Basic {AUTH}"), ("X-Goog-Api-Key", QUERY), ("X-Api-Token", XAUTH),
        ("X-Amz-Security-Token", NESTED), ("OpenAI-Client-Secret", BODY),
        ("x-ratelimit-remaining-tokens", "99000"), ("anthropic-ratelimit-input-tokens-limit", "400000"),
        ("content-type", "application/json"),
    ])
    _assert_clean(json.dumps(got), "the headers")
    assert got["cookie"] == f"session={fingerprint(COOKIE)}; theme={fingerprint('dark')}"
    assert got["set-cookie"] == f"sid={fingerprint(SET_COOKIE)}; Path=/; HttpOnly"
    assert got["x-ratelimit-remaining-tokens"] == "99000" and got["anthropic-ratelimit-input-tokens-limit"] == "400000"
    assert redact_headers(got.items()) == got  # masking twice changes nothing


def test_key_shapes_are_masked_in_any_text_and_prose_is_left_alone() -> None:
    from llmtap.recorder.redact import Scrubber

    text = ("keys: sk-proj-abcdefghijklmnop0123 AIzaSyA1234567890abcdefghijklmnopqrstuv xai-abcdefghijklmnopqrstu1 "
            "gsk_abcdefghijklmnopqrstu1 Authorization: Bearer abc.DEF-123_ghi "
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.sig_nature-1 "
            "https://g/v1?alt=sse&key=AIzaX9&api_key=plain12345678")
    got = Scrubber().text(text)
    for shape in ("abcdefghijklmnop0123", "1234567890abcdefghijklmnopqrstuv", "xai-abcdefghijklmnopqrstu1",
                  "gsk_abcdefghijklmnopqrstu1", "abc.DEF-123_ghi", "eyJzdWIi", "AIzaX9", "plain12345678"):
        assert shape not in got, shape
    assert "alt=sse" in got and "Bearer " in got
    prose = "Use Bearer authentication; the task-management-system-design doc; max_tokens=5; a risk-free plan."
    assert Scrubber().text(prose) == prose


def test_printable_neutralises_terminal_control() -> None:
    from llmtap.recorder.redact import printable

    got = printable(f"error{ESCAPES}\x00\x7f\u2066 → ok …")
    assert got.isprintable() and "→ ok …" in got
    assert "\\x1b" in got and "\\u202e" in got  # shown, not acted on


def test_run_call_line_shows_an_upstream_error_as_printable_text_without_its_key(tmp_path: Path,
                                                                                 fake: FakeProvider) -> None:
    rules = tmp_path / "rules.yaml"
    # A route that gives up on 401: the call line then carries the upstream's error.
    rules.write_text(f"providers:\n  local: {{base_url: '{fake.url}/v1', api: openai}}\n"
                     "routes:\n  - match: {model: '*'}\n    targets: [{provider: local}]\n    retry: {on: [401]}\n")
    fake.script(status(401, body={"error": {"message": f"Incorrect API key provided: {AUTH}{ESCAPES} \x1b]0;pwned\x07",
                                            "type": "invalid_request_error"}}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtap", "run", "--db", str(tmp_path / "calls.duckdb"), "--rules", str(rules),
         "--confdir", str(tmp_path / "ca"), "--proxy", "127.0.0.1:0", "--gateway", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="surrogateescape")
    try:
        err, out = Lines(proc.stderr), Lines(proc.stdout)
        gateway = err.wait_for("gateway").split()[1].split("/<provider>")[0]
        with httpx.Client(timeout=30) as client:
            r = client.post(f"{gateway}/local/chat/completions",
                            headers={"authorization": f"Bearer {AUTH}", # Control bytes an HTTP parser lets through: C1 CSI, a bidi override in UTF-8.
                                     "user-agent": b"agent/1.0\x9b31m\xe2\x80\xae-x"},
                            json={"model": f"gpt\x1b[5m{ESCAPES}", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 401 and AUTH in r.text  # the client gets the upstream's answer as sent
        line = out.wait_for(" 401 ")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert out.ended.wait(10) and err.ended.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Incorrect API key provided" in line and "agent/1.0" in line
    for text in ("".join(out.lines), "".join(err.lines)):
        assert AUTH not in text
        assert all(c.isprintable() or c == "\n" for c in text), repr(text)
    # Recorded by the recorder process, which got the call's secrets with it.
    with duckdb.connect(str(tmp_path / "calls.duckdb"), read_only=True) as con:
        stored = _dump(con)
    assert "Incorrect API key provided" in stored and AUTH not in stored


def test_a_live_view_of_a_call_in_progress_shows_it_masked(tmp_path: Path, confdir: Path, fake: FakeProvider) -> None:
    import threading

    from fakeprovider import slow

    rules = tmp_path / "rules.yaml"
    rules.write_text(f"providers:\n  p1: {{base_url: '{fake.url}/v1', api: openai}}\n")
    # The key comes early; the words after it keep the call streaming while the view is read.
    fake.reply_text = f"Noted {BODY} and {REPLY_SHAPED} " + "padding " * 40
    fake.script(slow(0.25))
    recorder = Recorder(tmp_path / "llmtap.duckdb")
    recorder.start()
    seen: list[dict] = []
    try:
        with RunningProxy(rules, confdir, sink=recorder) as proxy:
            body = json.loads(_request("m"))
            body["stream"] = True
            done = threading.Event()

            def ask() -> None:
                try:
                    with httpx.Client(timeout=60) as client:
                        client.post(f"{proxy.gateway_url}/p1/chat/completions",
                                    headers={"authorization": f"Bearer {AUTH}"}, json=body)
                finally:
                    done.set()

            threading.Thread(target=ask, daemon=True).start()
            seq = 0
            while not done.is_set():
                seq, events = recorder.hub.events_after(seq, 1.0)
                for e in events:
                    if e["kind"] == "progress" and (part := recorder.hub.partial(e["id"])) is not None:
                        seen.append(part)
                if any("padding" in (p["content"] or "") for p in seen):
                    break
            assert done.wait(60)
    finally:
        recorder.close()
    assert any("padding" in (p["content"] or "") for p in seen), "the call ended before a live view saw its key"
    _assert_clean(json.dumps(seen, ensure_ascii=False), "a live view")
    assert any(fingerprint(BODY) in (p["content"] or "") and fingerprint(BODY) in p["response_body"] for p in seen)


def test_stats_prints_a_hostile_model_name_as_printable_text(tmp_path: Path) -> None:
    from llmtap.recorder.record import Call, new_id, utcnow

    db = tmp_path / "llmtap.duckdb"
    recorder = Recorder(db, serve=False)
    recorder.start()
    try:
        call = Call(id=new_id(), started_at=utcnow(), method="POST", url="http://127.0.0.1/v1/chat/completions",
                    api="openai.chat", model_requested="gpt\x1b[2J\x9b\u202e[bold]x[/bold]", status=200, duration_ms=1.0,
                    provider="p1")
        recorder.call_finished(call.finished([]))
    finally:
        recorder.close()
    got = subprocess.run([sys.executable, "-m", "llmtap", "stats", "--db", str(db)], capture_output=True, text=True,
                         timeout=120)
    assert got.returncode == 0, got.stderr
    assert "[bold]x[/bold]" in got.stdout  # shown as written, not taken as markup
    assert all(c.isprintable() or c == "\n" for c in got.stdout), repr(got.stdout)


def test_log_lines_are_printable_and_masked() -> None:
    import io
    import logging

    from llmtap.addons.runner import configure_logging

    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging(stream)
        logging.getLogger("mitmproxy.proxy").warning("upstream said %s for https://g/v1?key=%s: %s",
                                                     SHAPED, QUERY, ESCAPES)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    out = stream.getvalue()
    _assert_clean(out, "a log line")
    assert out.startswith("llmtap: upstream said") and out.count("\n") == 1
    assert all(c.isprintable() for c in out.rstrip("\n")), repr(out)


def test_text_that_is_not_valid_unicode_is_recorded_not_spooled(tmp_path: Path, confdir: Path, fake: FakeProvider) -> None:
    """A header byte that is not UTF-8 and a lone surrogate escaped in JSON (from the client,
    or in the upstream's answer) made DuckDB refuse the whole batch."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"providers:\n  p1: {{base_url: '{fake.url}/v1', api: openai}}\n")
    fake.script(status(200, body='{"id": "c1", "object": "chat.completion", "model": "m", "choices": [{"index": 0, '
                                 '"message": {"role": "assistant", "content": "half an emoji: \\ud83d!"}, '
                                 '"finish_reason": "stop"}]}'))
    db = tmp_path / "llmtap.duckdb"
    recorder = Recorder(db)
    recorder.start()
    try:
        with RunningProxy(rules, confdir, sink=recorder) as proxy:
            with httpx.Client(timeout=30) as client:
                r = client.post(f"{proxy.gateway_url}/p1/chat/completions",
                                headers={"user-agent": b"agent/1.0\x9b", "content-type": "application/json"},
                                content=b'{"model": "m\\ud800", "messages": [{"role": "user", "content": "hi"}]}')
                assert r.status_code == 200
    finally:
        recorder.close()
    assert not spool_path(db).exists()
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT client, model_requested, content, request_body FROM calls").fetchall()
    assert rows == [("agent/1.0\ufffd", "m\ufffd", "half an emoji: \ufffd!",
                     '{"model": "m\\ud800", "messages": [{"role": "user", "content": "hi"}]}')]
