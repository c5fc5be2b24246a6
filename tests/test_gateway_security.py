"""The gateway and the relay as an attacker sees them: web pages, rebinding, stray local clients,
malformed framing, and the keys named by key_env.

Each test starts a real llmtap (mitmproxy + relay) against the fake provider and asserts on what
the fake provider saw -- the only witness of what left llmtap -- and on the recorded call.
"""

from __future__ import annotations

import gzip
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from fakeprovider import FakeProvider, status
from proxyharness import RunningProxy

RULES = """\
providers:
  primary: {{base_url: "{p1}/v1", api: openai, key_env: LLMTAP_TEST_PRIMARY_KEY}}
  backup:  {{base_url: "{p2}/v1", api: openai, key_env: LLMTAP_TEST_BACKUP_KEY}}
  claude:  {{base_url: "{p1}", api: anthropic, key_env: LLMTAP_TEST_CLAUDE_KEY}}
routes:
  - name: smart
    match: {{model: "smart*"}}
    targets:
      - {{provider: primary, model: gpt-4o}}
      - {{provider: backup, model: gpt-4o-backup}}
    retry: {{attempts: 1, backoff_ms: 1, on: [connect, 5xx]}}
"""

TOKEN = "llmtap-test-token-0123456789abcdef"
PRIMARY_KEY = "sk-primary-from-env"
BACKUP_KEY = "sk-backup-from-env"
CHAT = {"model": "plain", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMTAP_TEST_PRIMARY_KEY", PRIMARY_KEY)
    monkeypatch.setenv("LLMTAP_TEST_BACKUP_KEY", BACKUP_KEY)
    monkeypatch.setenv("LLMTAP_TEST_CLAUDE_KEY", "sk-ant-from-env")


@pytest.fixture
def rules_path(tmp_path: Path, fake: FakeProvider, fake2: FakeProvider) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES.format(p1=fake.url, p2=fake2.url))
    return path


@pytest.fixture
def proxy(rules_path: Path, confdir: Path, keys: None) -> Iterator[RunningProxy]:
    p = RunningProxy(rules_path, confdir)
    p.config.gateway_token = TOKEN
    with p:
        yield p


def raw_exchange(port: int, data: bytes, timeout: float = 20.0) -> bytes:
    """Send bytes to a listener and read until it closes the connection or a full answer
    with a Content-Length has arrived."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
            head, sep, body = out.partition(b"\r\n\r\n")
            if sep:
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length" and len(body) >= int(value):
                        return out
        return out


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


# -- item 3: the relay's own port ---------------------------------------------------------
def test_relay_refuses_a_planless_request_on_its_head(proxy: RunningProxy) -> None:
    """A local process that finds the relay's port gets nothing, and cannot make llmtap hold a
    body: the refusal arrives although not one byte of the announced 5 GB was sent."""
    port = proxy.proxy.relay.port
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: 5000000000\r\n\r\n")
    answer = raw_exchange(port, head)
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"no valid llmtap plan" in answer


def test_relay_refuses_a_guessed_plan_key(proxy: RunningProxy) -> None:
    port = proxy.proxy.relay.port
    head = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nx-llmtap-plan: 000000000000000000000000\r\ncontent-length: 0\r\n\r\n"
    assert raw_exchange(port, head).startswith(b"HTTP/1.1 403 ")


# -- item 1: who may use the gateway, and who may spend the key_env keys ---------------------
def gateway_port(proxy: RunningProxy) -> int:
    assert proxy.proxy is not None and proxy.proxy.gateway_addr is not None
    return proxy.proxy.gateway_addr[1]


def test_web_page_post_to_the_gateway_is_refused_and_recorded(proxy: RunningProxy, fake: FakeProvider) -> None:
    """What a page at evil.example can send without a CORS preflight: a text/plain POST."""
    port = gateway_port(proxy)
    body = json.dumps(CHAT).encode()
    answer = raw_exchange(port, b"POST /primary/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                b"Origin: http://evil.example\r\nContent-Type: text/plain;charset=UTF-8\r\n"
                                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (port, len(body), body))
    code, doc = status_and_json(answer)
    assert code == 403
    assert "http://evil.example" in doc["error"]["message"] and "--allow-origin" in doc["error"]["message"]
    assert doc["error"]["type"] == "permission_denied"  # the OpenAI error shape an SDK reads
    call, _ = proxy.memory.wait_finished(1)[0]
    assert call.status == 403 and "Origin" in call.error and call.request_body == body
    assert call.model_requested == "plain"
    assert fake.requests == []


def test_web_page_refusal_speaks_the_api_of_the_provider(proxy: RunningProxy, fake: FakeProvider) -> None:
    r = httpx.post(f"{proxy.gateway_url}/claude/v1/messages", timeout=20,
                   headers={"origin": "https://evil.example", "content-type": "text/plain"},
                   content=json.dumps({"model": "claude-x", "max_tokens": 5, "messages": []}))
    assert r.status_code == 403
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "permission_error"
    assert fake.requests == []


def test_allowed_origin_is_served(rules_path: Path, confdir: Path, keys: None, fake: FakeProvider) -> None:
    p = RunningProxy(rules_path, confdir)
    p.config.allow_origins = ("http://localhost:3000",)
    with p:
        r = httpx.post(f"{p.gateway_url}/primary/chat/completions", json=CHAT, timeout=20,
                       headers={"origin": "http://localhost:3000", "authorization": "Bearer sk-own"})
    assert r.status_code == 200
    assert fake.requests[0].headers["authorization"] == "Bearer sk-own"


def test_dns_rebinding_host_is_refused(proxy: RunningProxy, fake: FakeProvider) -> None:
    """A page whose name was rebound to 127.0.0.1 sends its own name as Host (and, for a
    same-origin request, no Origin at all)."""
    port = gateway_port(proxy)
    body = json.dumps(CHAT).encode()
    answer = raw_exchange(port, b"POST /primary/chat/completions HTTP/1.1\r\nHost: evil.example:%d\r\n"
                                b"Content-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                                % (port, len(body), body))
    code, doc = status_and_json(answer)
    assert code == 403 and "evil.example" in doc["error"]["message"]
    call, _ = proxy.memory.wait_finished(1)[0]
    assert call.status == 403 and "Host" in call.error
    assert fake.requests == []


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}"])
def test_own_names_are_served(proxy: RunningProxy, fake: FakeProvider, host: str) -> None:
    port = gateway_port(proxy)
    r = httpx.post(f"{proxy.gateway_url}/primary/chat/completions", json=CHAT, timeout=20,
                   headers={"host": host.format(port=port)})
    assert r.status_code == 200


def test_keyless_request_gets_no_key_from_the_environment(proxy: RunningProxy, fake: FakeProvider) -> None:
    """Any local process could otherwise spend the user's key by leaving its own out."""
    r = httpx.post(f"{proxy.gateway_url}/primary/chat/completions", json=CHAT, timeout=20)
    assert r.status_code == 200  # the fake answers regardless; a real provider says 401
    seen = fake.requests[0].headers
    assert not {"authorization", "x-api-key", "api-key", "x-goog-api-key"} & set(seen)
    assert PRIMARY_KEY not in json.dumps(seen)


def test_keyless_request_through_the_proxy_gets_no_key(proxy: RunningProxy, fake: FakeProvider) -> None:
    with httpx.Client(proxy=proxy.proxy_url, timeout=20) as c:
        assert c.post(f"{fake.url}/v1/chat/completions", json=CHAT).status_code == 200
    assert "authorization" not in fake.requests[0].headers


def test_llmtap_token_is_swapped_for_the_key_and_never_forwarded(proxy: RunningProxy, fake: FakeProvider) -> None:
    client = openai.OpenAI(base_url=f"{proxy.gateway_url}/primary", api_key=TOKEN, max_retries=0, timeout=20)
    client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}])
    seen = fake.requests[0]
    assert seen.headers["authorization"] == f"Bearer {PRIMARY_KEY}"
    assert TOKEN not in json.dumps(seen.headers) and TOKEN.encode() not in seen.body
    call, _ = proxy.memory.wait_finished(1)[0]
    assert TOKEN not in json.dumps(call.request_headers) and TOKEN not in call.url


def test_llmtap_token_as_anthropic_key(proxy: RunningProxy, fake: FakeProvider) -> None:
    r = httpx.post(f"{proxy.gateway_url}/claude/v1/messages", timeout=20, headers={"x-api-key": TOKEN},
                   json={"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    seen = fake.requests[0].headers
    assert seen["x-api-key"] == "sk-ant-from-env" and "authorization" not in seen


def test_llmtap_token_through_the_proxy(proxy: RunningProxy, fake: FakeProvider) -> None:
    with httpx.Client(proxy=proxy.proxy_url, timeout=20) as c:
        c.post(f"{fake.url}/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {TOKEN}"})
    assert fake.requests[0].headers["authorization"] == f"Bearer {PRIMARY_KEY}"


def test_a_wrong_token_is_passed_on_as_the_clients_own_key(proxy: RunningProxy, fake: FakeProvider) -> None:
    httpx.post(f"{proxy.gateway_url}/primary/chat/completions", json=CHAT, timeout=20,
               headers={"authorization": f"Bearer {TOKEN}x"})
    assert fake.requests[0].headers["authorization"] == f"Bearer {TOKEN}x"


def test_fallback_after_client_authenticated_gets_the_other_providers_key(
        proxy: RunningProxy, fake: FakeProvider, fake2: FakeProvider) -> None:
    fake.script_for_model("gpt-4o", status(503))
    httpx.post(f"{proxy.gateway_url}/primary/chat/completions", timeout=20,
               json=dict(CHAT, model="smart-1"), headers={"authorization": "Bearer sk-client-own"})
    assert fake.requests[0].headers["authorization"] == "Bearer sk-client-own"
    assert fake2.wait_requests(1)[0].headers["authorization"] == f"Bearer {BACKUP_KEY}"


def test_fallback_of_a_keyless_request_gets_no_key(proxy: RunningProxy, fake: FakeProvider, fake2: FakeProvider) -> None:
    fake.script_for_model("gpt-4o", status(503))
    httpx.post(f"{proxy.gateway_url}/primary/chat/completions", json=dict(CHAT, model="smart-2"), timeout=20)
    assert "authorization" not in fake2.wait_requests(1)[0].headers


def test_web_page_through_the_proxy_never_gets_a_key_from_the_environment(
        proxy: RunningProxy, fake: FakeProvider, fake2: FakeProvider) -> None:
    """A browser using HTTPS_PROXY sends Origin on a page's cross-origin fetch: forwarded with
    the page's own key, but a fallback spends none of the user's."""
    fake.script_for_model("gpt-4o", status(503))
    with httpx.Client(proxy=proxy.proxy_url, timeout=20) as c:
        c.post(f"{fake.url}/v1/chat/completions", json=dict(CHAT, model="smart-3"),
               headers={"origin": "http://evil.example", "authorization": "Bearer sk-page"})
    assert fake.requests[0].headers["authorization"] == "Bearer sk-page"
    assert "authorization" not in fake2.wait_requests(1)[0].headers


def test_a_name_that_resolves_to_the_proxy_is_no_endless_loop(proxy: RunningProxy, fake: FakeProvider) -> None:
    """'127.1' is 127.0.0.1 but not a name mitmproxy recognises as itself (neither is a
    rebinding page's name): each hop used to open another connection to itself."""
    assert proxy.proxy is not None and proxy.proxy.proxy_addr is not None
    port = proxy.proxy.proxy_addr[1]
    answer = raw_exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.1:%d\r\n"
                                b"Origin: http://evil.example\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}" % port)
    assert answer.startswith(b"HTTP/1.1 508 ")
    assert fake.requests == []


# -- item 13: compressed request bodies ------------------------------------------------------
def test_gzip_body_reaches_the_provider_as_the_client_sent_it(proxy: RunningProxy, fake: FakeProvider) -> None:
    body = gzip.compress(json.dumps(CHAT).encode(), mtime=0)
    r = httpx.post(f"{proxy.gateway_url}/primary/chat/completions", content=body, timeout=20,
                   headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code != 502  # the fake's own answer (it reads no gzip: a 400)
    seen = fake.requests[0]
    assert seen.body == body and seen.headers["content-encoding"] == "gzip"
    call, _ = proxy.memory.wait_finished(1)[0]
    assert call.model_requested == "plain"  # read from the decoded body


def test_gzip_body_with_a_rewritten_model_is_gzip_again(proxy: RunningProxy, fake: FakeProvider) -> None:
    body = gzip.compress(json.dumps(dict(CHAT, model="smart-z")).encode(), mtime=0)
    r = httpx.post(f"{proxy.gateway_url}/primary/chat/completions", content=body, timeout=20,
                   headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code != 502
    seen = fake.requests[0]
    assert seen.headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(seen.body))["model"] == "gpt-4o"
    assert int(seen.headers["content-length"]) == len(seen.body)


# -- item 15: framing mitmproxy cannot read ---------------------------------------------------
_BODY = json.dumps(CHAT).encode()
MALFORMED = {
    "trailers": (b"Transfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n%x\r\n%s\r\n0\r\nx-checksum: 1\r\n\r\n"
                 % (len(_BODY), _BODY), "trailers"),
    "bad-content-length": (b"Content-Length: 12abc\r\n\r\n" + _BODY, "content-length"),
    "bad-chunk-size": (b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + _BODY + b"\r\n0\r\n\r\n", "chunk"),
}


@pytest.mark.parametrize("listener", ["gateway", "proxy"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_gets_a_400_and_a_row(proxy: RunningProxy, fake: FakeProvider, listener: str, case: str) -> None:
    tail, word = MALFORMED[case]
    assert proxy.proxy is not None and proxy.proxy.gateway_addr and proxy.proxy.proxy_addr
    if listener == "gateway":
        port = proxy.proxy.gateway_addr[1]
        head = b"POST /primary/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port
    else:
        port = proxy.proxy.proxy_addr[1]
        hostport = fake.url.removeprefix("http://").encode()
        head = b"POST http://%s/v1/chat/completions HTTP/1.1\r\nHost: %s\r\n" % (hostport, hostport)
    answer = raw_exchange(port, head + b"Content-Type: application/json\r\n" + tail)
    code, doc = status_and_json(answer)
    assert code == 400
    assert word in doc["error"]["message"].lower() and doc["error"]["type"] == "invalid_request_error"
    call, _ = proxy.memory.wait_finished(1)[0]
    assert call.status == 400 and word in call.error.lower() and "malformed" in call.error
    assert call.url.endswith("/chat/completions")
    assert fake.requests == []


# -- the token's home --------------------------------------------------------------------------
def test_generated_token_is_kept_readable_by_the_user_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmtap import paths
    from llmtap.addons.commands import gateway_token

    monkeypatch.delenv("LLMTAP_GATEWAY_TOKEN", raising=False)
    token, path = gateway_token()
    assert path == paths.config_dir() / "gateway-token"
    assert path.stat().st_mode & 0o077 == 0 and len(token) > 40
    assert gateway_token() == (token, path)  # the same token on the next start
    monkeypatch.setenv("LLMTAP_GATEWAY_TOKEN", "llmtap-from-env")
    assert gateway_token() == ("llmtap-from-env", None)
