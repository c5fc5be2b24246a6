"""The proxy end to end: real mitmproxy, real relay, real SDK clients, fake providers.

Each test starts its own llmtap on ports from the OS with a rules.yaml pointing at fake
providers on 127.0.0.1, and asserts what a user would see: the answer, the model that was
actually asked, the fallback chain, and the record handed to the recorder.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import httpx2
import openai
import pytest

from fakeprovider import FakeProvider, cut, reset, slow, stall, status
from proxyharness import RunningProxy


def free_port() -> int:
    """A port nobody listens on: bound by the OS, then released."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


RULES = """\
providers:
  primary:  {{base_url: "{p1}/v1", api: openai, key_env: LLMTAP_TEST_PRIMARY_KEY}}
  backup:   {{base_url: "{p2}/v1", api: openai, key_env: LLMTAP_TEST_BACKUP_KEY}}
  deadhost: {{base_url: "http://127.0.0.1:{dead}/v1", api: openai}}
  claude:   {{base_url: "{p1}", api: anthropic}}
  claude2:  {{base_url: "{p2}", api: anthropic}}
  llama:    {{base_url: "{p1}", api: ollama}}
  llama2:   {{base_url: "{p2}", api: ollama}}
  gem:      {{base_url: "{p1}", api: gemini}}
routes:
  - name: smart
    match: {{model: "smart*"}}
    targets:
      - {{provider: primary, model: gpt-4o}}
      - {{provider: backup, model: openai/gpt-4o}}
    retry: {{attempts: 1, backoff_ms: 1, on: [connect, timeout, 429, 5xx]}}
    timeout: {{connect_s: 2, first_byte_s: 1}}
  - name: dead-first
    match: {{model: "dead*"}}
    targets:
      - {{provider: deadhost, model: gpt-4o}}
      - {{provider: backup, model: gpt-4o-backup}}
    retry: {{attempts: 1, backoff_ms: 1, on: [connect, timeout, 5xx]}}
  - name: intercepted
    match: {{model: "gpt-4o-mini", host: api.openai.com}}
    targets:
      - {{provider: primary}}
  - name: claude
    match: {{model: "claude*"}}
    targets:
      - {{provider: claude}}
      - {{provider: claude2, model: claude-backup}}
    retry: {{attempts: 1, backoff_ms: 1, on: [connect, 5xx, 529]}}
  - name: local
    match: {{model: "local*"}}
    targets:
      - {{provider: llama, model: qwen3}}
      - {{provider: llama2, model: qwen3-backup}}
    retry: {{attempts: 1, backoff_ms: 1, on: [connect, 5xx]}}
  - name: gem
    match: {{model: "gem-fast"}}
    targets:
      - {{provider: gem, model: gemini-2.5-flash}}
"""


@pytest.fixture
def rules_path(tmp_path: Path, fake: FakeProvider, fake2: FakeProvider) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES.format(p1=fake.url, p2=fake2.url, dead=free_port()))
    return path


@pytest.fixture
def proxy(rules_path: Path, confdir: Path) -> Iterator[RunningProxy]:
    with RunningProxy(rules_path, confdir) as p:
        yield p


def oai(proxy: RunningProxy, provider: str = "primary", key: str = "sk-client-key-1234") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.gateway_url}/{provider}", api_key=key, max_retries=0, timeout=20)


def ask(client: openai.OpenAI, model: str, stream: bool = False) -> tuple[str, str]:
    """(answer text, model the upstream reported)."""
    msgs = [{"role": "user", "content": "How many holes after five folds?"}]
    if not stream:
        r = client.chat.completions.create(model=model, messages=msgs)
        return r.choices[0].message.content or "", r.model
    text, reported = [], ""
    for chunk in client.chat.completions.create(model=model, messages=msgs, stream=True):
        reported = chunk.model or reported
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
    return "".join(text), reported


# -- routing ------------------------------------------------------------------------------
def test_model_is_rewritten_by_the_matching_route(proxy: RunningProxy, fake: FakeProvider) -> None:
    text, reported = ask(oai(proxy), "smart-1")
    assert text == fake.reply_text
    assert reported == "gpt-4o"  # the upstream was asked for the route's model
    assert fake.requests[0].json["model"] == "gpt-4o"
    call, attempts = proxy.memory.wait_finished(1)[0]
    assert (call.model_requested, call.model_sent, call.provider, call.route) == ("smart-1", "gpt-4o", "primary", "smart")
    assert call.status == 200 and call.attempts == 1 and len(attempts) == 1


def test_streamed_answer_passes_through_with_rewrite(proxy: RunningProxy, fake: FakeProvider) -> None:
    text, reported = ask(oai(proxy), "smart-2", stream=True)
    assert text == fake.reply_text and reported == "gpt-4o"
    call, _ = proxy.memory.wait_finished(1)[0]
    assert call.stream is True and b"[DONE]" in call.response_body


def test_unmatched_request_goes_where_addressed_unchanged(proxy: RunningProxy, fake: FakeProvider) -> None:
    text, reported = ask(oai(proxy), "plain-model")
    assert reported == "plain-model" and text == fake.reply_text
    req = fake.requests[0]
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-client-key-1234"
    call, _ = proxy.memory.wait_finished(1)[0]
    assert call.route is None and call.model_sent == "plain-model"


def test_client_key_never_reaches_another_provider(proxy: RunningProxy, fake: FakeProvider, fake2: FakeProvider,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMTAP_TEST_BACKUP_KEY", "sk-backup-from-env")
    fake.script_for_model("gpt-4o", status(503))
    ask(oai(proxy), "smart-key")
    assert fake.requests[0].headers["authorization"] == "Bearer sk-client-key-1234"
    backup_req = fake2.wait_requests(1)[0]
    assert backup_req.headers["authorization"] == "Bearer sk-backup-from-env"
    call, _ = proxy.memory.wait_finished(1)[0]
    assert "sk-client-key-1234" not in json.dumps(call.request_headers)


# -- fallbacks ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "failure, expect",
    [
        (status(503), "503"),
        (status(429, headers={"retry-after": "0"}), "429"),
        (reset(), "connect"),
        (stall(5), "timeout"),
    ],
    ids=["503", "429", "reset", "first-byte-timeout"],
)
def test_falls_back_when_primary_fails_before_first_byte(proxy: RunningProxy, fake: FakeProvider,
                                                         fake2: FakeProvider, failure, expect: str) -> None:
    fake.script_for_model("gpt-4o", failure)
    text, reported = ask(oai(proxy), "smart-fb", stream=True)
    assert text == fake2.reply_text
    assert reported == "openai/gpt-4o"
    assert fake2.requests[0].json["model"] == "openai/gpt-4o"
    call, attempts = proxy.memory.wait_finished(1)[0]
    assert call.status == 200 and call.attempts == 2 and call.provider == "backup"
    first = attempts[0]
    assert first.provider == "primary"
    assert expect in f"{first.status} {first.error}"


def test_falls_back_when_primary_refuses_connections(proxy: RunningProxy, fake2: FakeProvider) -> None:
    text, reported = ask(oai(proxy), "dead-1")
    assert reported == "gpt-4o-backup"
    call, attempts = proxy.memory.wait_finished(1)[0]
    assert attempts[0].error.startswith("connect") and attempts[1].status == 200


def test_no_fallback_after_first_byte(proxy: RunningProxy, fake: FakeProvider, fake2: FakeProvider) -> None:
    fake.script_for_model("gpt-4o", cut(after_events=2))
    with pytest.raises((openai.APIError, httpx2.HTTPError, httpx.HTTPError)):
        ask(oai(proxy), "smart-cut", stream=True)
    call, attempts = proxy.memory.wait_finished(1)[0]
    assert fake2.requests == []  # the client already had bytes: no second answer spliced in
    assert call.status == 200 and len(attempts) == 1
    assert "cut" in call.error and call.response_body  # what arrived is kept


def test_all_targets_failing_returns_last_upstream_error(proxy: RunningProxy, fake: FakeProvider,
                                                         fake2: FakeProvider) -> None:
    fake.script_for_model("gpt-4o", status(503))
    fake2.script_for_model("openai/gpt-4o", status(502, body={"error": {"message": "backup is down", "type": "server_error"}}))
    with pytest.raises(openai.InternalServerError) as err:
        ask(oai(proxy), "smart-down")
    assert err.value.status_code == 502 and "backup is down" in str(err.value)
    call, attempts = proxy.memory.wait_finished(1)[0]
    assert [a.status for a in attempts] == [503, 502] and "all 2 attempts failed" in call.error


def test_no_upstream_answer_gives_502_listing_attempts(proxy: RunningProxy, fake2: FakeProvider) -> None:
    fake2.script_for_model("gpt-4o-backup", reset())
    with pytest.raises(openai.InternalServerError) as err:
        ask(oai(proxy), "dead-2")
    body = err.value.body
    assert err.value.status_code == 502
    assert "no upstream answered" in str(err.value)
    assert [a["provider"] for a in body["attempts"]] == ["deadhost", "backup"]


def test_anthropic_sdk_streams_thinking_through_fallback(proxy: RunningProxy, fake: FakeProvider,
                                                         fake2: FakeProvider) -> None:
    fake.script_for_model("claude-sonnet", status(529, body={"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
    client = anthropic.Anthropic(base_url=f"{proxy.gateway_url}/claude", api_key="sk-ant-client", max_retries=0)
    with client.messages.stream(model="claude-sonnet", max_tokens=1024,
                                thinking={"type": "enabled", "budget_tokens": 512},
                                messages=[{"role": "user", "content": "fold paper"}]) as s:
        message = s.get_final_message()
    kinds = [b.type for b in message.content]
    assert "thinking" in kinds and "text" in kinds
    assert message.model == "claude-backup"
    call, attempts = proxy.memory.wait_finished(1)[0]
    assert [a.status for a in attempts] == [529, 200]
    assert fake2.requests[0].headers.get("x-api-key") is None  # the client's key stayed home


# -- streaming and disconnects -------------------------------------------------------------
@contextlib.contextmanager
def plain_stream(proxy: RunningProxy) -> Iterator[httpx.Response]:
    """A streamed chat call through the gateway with no route: the raw bytes as they arrive."""
    with httpx.Client(timeout=20) as c, c.stream(
        "POST", f"{proxy.gateway_url}/primary/chat/completions",
        json={"model": "plain", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    ) as r:
        yield r


def test_stream_reaches_client_before_upstream_finishes(proxy: RunningProxy, fake: FakeProvider) -> None:
    fake.script(slow(0.05, chunks=40))
    with plain_stream(proxy) as r:
        chunks = r.iter_raw()
        first = next(chunks)
        # The upstream is still writing (40 events, 50 ms apart): had anything buffered the
        # stream, the first read would hold it whole, [DONE] included.
        assert b"data:" in first and b"[DONE]" not in first
        rest = b"".join(chunks)
    assert rest.rstrip().endswith(b"[DONE]")


def test_client_disconnect_closes_upstream(proxy: RunningProxy, fake: FakeProvider) -> None:
    fake.script(slow(0.2, chunks=200))
    with plain_stream(proxy) as r:
        next(r.iter_raw())
    # Leaving the block closed the client connection mid-stream.
    fake.wait_disconnects(1, timeout=10)
    call, _ = proxy.memory.wait_finished(1)[0]
    assert "disconnect" in (call.error or "")


# -- bad input passes through untouched ----------------------------------------------------
@pytest.mark.parametrize(
    "body, ctype, note",
    [
        (b'{"model": "smart-x", "messages": [', "application/json", "not valid JSON"),
        (b"model=smart&text=\xff\xfe", "application/x-www-form-urlencoded", "not JSON"),
    ],
    ids=["malformed-json", "non-json"],
)
def test_bad_request_body_passes_through_unchanged(proxy: RunningProxy, fake: FakeProvider,
                                                   body: bytes, ctype: str, note: str) -> None:
    r = httpx.post(f"{proxy.gateway_url}/primary/chat/completions", content=body,
                   headers={"content-type": ctype}, timeout=20)
    assert fake.requests[0].body == body
    assert r.status_code != 502  # the upstream's own answer, not a proxy failure
    call, _ = proxy.memory.wait_finished(1)[0]
    assert call.request_body == body
    assert any(note in n for n in call.notes)


def test_unknown_gateway_provider_says_which_exist(proxy: RunningProxy) -> None:
    r = httpx.post(f"{proxy.gateway_url}/nosuch/chat/completions", json={"model": "x"}, timeout=20)
    assert r.status_code == 404
    msg = r.json()["error"]["message"]
    assert "nosuch" in msg and "primary" in msg and "openrouter" in msg
    call, _ = proxy.memory.wait_finished(1)[0]
    assert call.status == 404


def test_unknown_endpoint_on_a_provider_is_forwarded_and_recorded(proxy: RunningProxy, fake: FakeProvider) -> None:
    r = httpx.get(f"{proxy.gateway_url}/primary/files/abc", timeout=20)
    assert r.status_code == 404  # the fake's own answer, untouched
    assert fake.requests[0].path == "/v1/files/abc"
    call, _ = proxy.memory.wait_finished(1)[0]
    assert call.api == "other" and call.status == 404


# -- proxy listener ------------------------------------------------------------------------
def test_proxy_listener_decrypts_llm_hosts_and_routes(proxy: RunningProxy, fake: FakeProvider) -> None:
    http_client = httpx2.Client(proxy=proxy.proxy_url, verify=str(proxy.ca), timeout=20)
    client = openai.OpenAI(api_key="sk-intercepted", max_retries=0, http_client=http_client)
    text, reported = ask(client, "gpt-4o-mini", stream=True)
    assert text == fake.reply_text and reported == "gpt-4o-mini"
    assert fake.requests[0].path == "/v1/chat/completions"
    call, _ = proxy.memory.wait_finished(1)[0]
    assert call.url == "https://api.openai.com/v1/chat/completions"
    assert call.route == "intercepted" and call.provider == "primary"


def test_ollama_ndjson_streams_through_plain_http_proxy_and_fallback(proxy: RunningProxy, fake: FakeProvider,
                                                                     fake2: FakeProvider) -> None:
    fake.script_for_model("qwen3", status(503))
    fake2.script(slow(0.05, chunks=30))
    with httpx.Client(proxy=proxy.proxy_url, timeout=20) as c, c.stream(
        "POST", f"{fake.url}/api/chat", json={"model": "local-smart", "messages": [{"role": "user", "content": "hi"}]},
    ) as r:
        lines = r.iter_lines()
        first = json.loads(next(lines))
        # NDJSON is not buffered: the first line arrives while the upstream is still writing.
        assert first["done"] is False and first["model"] == "qwen3-backup"
        last = json.loads(list(lines)[-1])
    assert last["done"] is True
    call, attempts = proxy.memory.wait_finished(1)[0]
    assert call.api == "ollama.chat" and call.route == "local"
    assert [(a.provider, a.status) for a in attempts] == [("llama", 503), ("llama2", 200)]


def test_gemini_model_in_the_path_is_rewritten(proxy: RunningProxy, fake: FakeProvider) -> None:
    r = httpx.post(f"{proxy.gateway_url}/gem/v1beta/models/gem-fast:streamGenerateContent?alt=sse&key=AIza-client",
                   json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}, timeout=20)
    assert r.status_code == 200 and r.text.startswith("data:")
    assert fake.requests[0].path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=AIza-client"
    call, _ = proxy.memory.wait_finished(1)[0]
    assert call.model_requested == "gem-fast" and call.model_sent == "gemini-2.5-flash"
    assert "AIza-client" not in call.url  # the key in the query is redacted in the record


def _self_signed_server():
    """A TLS server on 127.0.0.1 with a certificate of its own (not llmtap's CA)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not-an-llm.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return key, cert, cert.public_bytes(serialization.Encoding.DER)


def test_non_llm_tls_host_passes_as_raw_tunnel(proxy: RunningProxy, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key, cert, der = _self_signed_server()
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(100)
            tls.sendall(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.proxy.proxy_addr[1])) as raw:
            raw.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            assert b" 200 " in raw.recv(1000)
            client_ctx = ssl.create_default_context()
            client_ctx.check_hostname = False
            client_ctx.verify_mode = ssl.CERT_NONE
            with client_ctx.wrap_socket(raw, server_hostname="not-an-llm.test") as tls:
                assert tls.getpeercert(binary_form=True) == der  # the host's own certificate
                tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert b"204" in tls.recv(1000)
    finally:
        t.join(10)
        srv.close()
    assert proxy.memory.finished == [] and proxy.memory.started == []  # nothing recorded


# -- rules reload and start-up -------------------------------------------------------------
def test_rules_reload_on_change_and_bad_edit_keeps_last_good(proxy: RunningProxy, rules_path: Path,
                                                              fake: FakeProvider) -> None:
    old = proxy.proxy.rules.current
    text = rules_path.read_text().replace("{provider: primary, model: gpt-4o}", "{provider: primary, model: gpt-4.1}")
    rules_path.write_text(text + "\n")
    _wait_for(lambda: proxy.proxy.rules.current is not old)
    _, reported = ask(oai(proxy), "smart-reloaded")
    assert reported == "gpt-4.1"
    good = proxy.proxy.rules.current
    rules_path.write_text(text + "\nroutes_typo: 1\n")
    _wait_for(lambda: proxy.proxy.rules._stamp == proxy.proxy.rules._stat())
    assert proxy.proxy.rules.current is good
    _, reported = ask(oai(proxy), "smart-still")
    assert reported == "gpt-4.1"


def _wait_for(cond, timeout: float = 10.0) -> None:
    done = threading.Event()
    deadline = threading.Timer(timeout, done.set)
    deadline.start()
    try:
        while not cond():
            if done.wait(0.02):
                raise TimeoutError("condition not met")
    finally:
        deadline.cancel()


def test_busy_port_is_one_clear_startup_error(tmp_path: Path, confdir: Path, rules_path: Path) -> None:
    from llmtap.addons.runner import StartupError

    blocker = socket.create_server(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    try:
        p = RunningProxy(rules_path, confdir)
        p.config.gateway = ("127.0.0.1", port)
        with pytest.raises(StartupError) as err:
            p.__enter__()
        assert "--gateway" in str(err.value) and str(port) in str(err.value)
    finally:
        blocker.close()
