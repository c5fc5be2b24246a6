"""The routing addon on its own, driven by mitmproxy's test helpers (`tflow`, `tutils`).

A flow goes through `Router.requestheaders` / `request` as mitmproxy would hand it; what the
addon decided is read where it leaves it: the plan the relay is handed (targets, rewritten
bodies, forwarded headers), the flow pointed at the relay, the response it answered itself,
and the events the recorder got. Nothing is served: the relay is never started.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow, tutils

from llmtap.addons.relay import PLAN_HEADER, Plan, Relay
from llmtap.addons.routing import Router, Security
from llmtap.addons.rules import parse_rules
from llmtap.recorder.events import CallFinished, CallStarted
from llmtap.recorder.record import MemorySink

GATEWAY = ("127.0.0.1", 8081)
RULES = """\
providers:
  up: {base_url: "http://127.0.0.1:9/v1", api: openai}
  other: {base_url: "http://127.0.0.1:10/v1", api: openai, key_env: LLMTAP_TEST_OTHER_KEY}
  gem: {base_url: "http://127.0.0.1:11", api: gemini, key_env: LLMTAP_TEST_GEM_KEY}
routes:
  - name: smart-route
    match: {model: "smart*"}
    targets:
      - {provider: up, model: m-rewritten}
      - {provider: other, model: m-fallback}
"""
TOKEN = "llmtap-test-token-0123456789abcdef"


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


@pytest.fixture
def relay(sink: MemorySink) -> Iterator[Relay]:
    relay = Relay(sink)
    relay.port = 47001  # as if started: where the addon points a planned flow
    yield relay


def router(relay: Relay, security: Security | None = None) -> Router:
    rules = parse_rules(RULES)
    return Router(relay, lambda: rules, security)


def gateway_flow(path: str, body: dict | bytes, *, headers: dict[str, str] | None = None,
                 host: str = "127.0.0.1:8081") -> http.HTTPFlow:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"host": host, "content-type": "application/json", "user-agent": "unit/1.0", **(headers or {})}
    req = tutils.treq(method=b"POST", scheme=b"http", host="127.0.0.1", port=8081, path=path.encode(),
                      authority=b"", headers=http.Headers([(k.encode(), v.encode()) for k, v in hdrs.items()]),
                      content=content)
    flow = tflow.tflow(req=req)
    flow.client_conn.proxy_mode = ProxyMode.parse(f"reverse:http://127.0.0.1:47001@{GATEWAY[0]}:{GATEWAY[1]}")
    flow.client_conn.sockname = GATEWAY
    flow.client_conn.peername = ("127.0.0.1", 50000)
    return flow


def route(r: Router, flow: http.HTTPFlow) -> Plan | None:
    r.requestheaders(flow)
    r.request(flow)
    key = flow.metadata.get("llmtap_plan")
    return r.relay._plans.get(key) if key is not None else None


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k.lower() == name]


def test_a_matching_route_plans_its_targets_with_the_model_rewritten(relay: Relay, sink: MemorySink) -> None:
    flow = gateway_flow("/up/chat/completions", {"model": "smart-1", "stream": True, "messages": []},
                        headers={"authorization": "Bearer sk-client-key-0123456789"})
    plan = route(router(relay), flow)
    assert plan is not None
    assert [(t.provider, t.model) for t in plan.targets] == [("up", "m-rewritten"), ("other", "m-fallback")]
    first, second = plan.targets
    assert first.url == "http://127.0.0.1:9/v1/chat/completions"
    assert json.loads(first.body)["model"] == "m-rewritten" and json.loads(second.body)["model"] == "m-fallback"
    assert header(first.headers, b"content-length") == [str(len(first.body)).encode()]
    # The client's key goes to the provider it addressed, never to the other one.
    assert header(first.headers, b"authorization") == [b"Bearer sk-client-key-0123456789"]
    assert header(second.headers, b"authorization") == []
    # The flow now goes to the relay, carrying the plan's key and no body.
    assert (flow.request.host, flow.request.port) == ("127.0.0.1", 47001)
    assert flow.request.headers[PLAN_HEADER] == flow.metadata["llmtap_plan"] and flow.request.content == b""
    # The recorder was told the start, once, with what routing knew.
    (start,) = sink.started
    assert isinstance(start, CallStarted) and start is plan.call
    assert (start.route, start.model_requested, start.stream, start.api) == ("smart-route", "smart-1", True,
                                                                            "openai.chat")
    assert start.url == "http://127.0.0.1:8081/up/chat/completions"
    assert "sk-client-key-0123456789" in start.secrets
    assert "sk-client-key-0123456789" not in json.dumps(dict(start.request_headers))
    assert sink.finished == []


def test_an_unmatched_model_goes_to_the_addressed_provider_unchanged(relay: Relay, sink: MemorySink) -> None:
    body = b'{"model": "plain-1",  "messages": []}'  # odd spacing: the bytes are forwarded as sent
    plan = route(router(relay), gateway_flow("/other/chat/completions", body))
    assert plan is not None
    (target,) = plan.targets
    assert (target.provider, target.model, target.body) == ("other", "plain-1", body)
    assert sink.started[0].route is None


def test_a_web_pages_origin_is_refused_with_403_and_recorded(relay: Relay, sink: MemorySink) -> None:
    flow = gateway_flow("/up/chat/completions", {"model": "smart-1", "messages": []},
                        headers={"origin": "https://evil.example", "authorization": "Bearer sk-client-key-0123456789"})
    assert route(router(relay), flow) is None
    assert flow.response is not None and flow.response.status_code == 403
    assert "--allow-origin https://evil.example" in json.loads(flow.response.content)["error"]["message"]
    assert relay._plans == {} and sink.started == []
    ((call, attempts),) = sink.finished
    assert isinstance(call, CallFinished) and call.status == 403 and attempts == []
    assert "refused a request a web page sent" in (call.error or "")
    assert "sk-client-key-0123456789" in call.secrets  # masked wherever it is stored


def test_an_allowed_origin_is_routed(relay: Relay, sink: MemorySink) -> None:
    flow = gateway_flow("/up/chat/completions", {"model": "smart-1", "messages": []},
                        headers={"origin": "http://localhost:3000"})
    plan = route(router(relay, Security(allow_origins=frozenset({"http://localhost:3000"}))), flow)
    assert plan is not None and flow.response is None


def test_a_foreign_host_is_refused_as_dns_rebinding(relay: Relay, sink: MemorySink) -> None:
    flow = gateway_flow("/up/chat/completions", {"model": "smart-1", "messages": []}, host="rebind.example:8081")
    assert route(router(relay), flow) is None
    assert flow.response is not None and flow.response.status_code == 403
    ((call, _),) = sink.finished
    assert call.status == 403 and "refused Host 'rebind.example:8081'" in (call.error or "")


def test_the_gateway_token_is_taken_out_and_each_target_gets_its_key_env_key(
        relay: Relay, sink: MemorySink, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMTAP_TEST_OTHER_KEY", "sk-other-env-key-0123456789")
    flow = gateway_flow("/up/chat/completions", {"model": "smart-1", "messages": []},
                        headers={"authorization": f"Bearer {TOKEN}"})
    plan = route(router(relay, Security(token=TOKEN)), flow)
    assert plan is not None
    for target in plan.targets:
        assert TOKEN.encode() not in b"".join(k + v for k, v in target.headers)
    up, other = plan.targets
    assert header(up.headers, b"authorization") == []  # `up` has no key_env: no key at all
    assert header(other.headers, b"authorization") == [b"Bearer sk-other-env-key-0123456789"]
    start = sink.started[0]
    assert "sk-other-env-key-0123456789" in start.secrets
    assert any("llmtap gateway token" in n for n in start.notes)


def test_the_gateway_token_in_the_query_is_taken_out_too(relay: Relay, sink: MemorySink,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMTAP_TEST_GEM_KEY", "AIzaGemEnvKey0123456789abcdefghijklmnop")
    flow = gateway_flow(f"/gem/v1beta/models/g-1:generateContent?alt=sse&key={TOKEN}", {"contents": []})
    plan = route(router(relay, Security(token=TOKEN)), flow)
    assert plan is not None
    (target,) = plan.targets
    assert target.target == "/v1beta/models/g-1:generateContent?alt=sse"
    assert header(target.headers, b"x-goog-api-key") == [b"AIzaGemEnvKey0123456789abcdefghijklmnop"]
    assert sink.started[0].model_requested == "g-1" and TOKEN not in sink.started[0].url


def test_a_wrong_token_is_forwarded_as_the_clients_own_key(relay: Relay, sink: MemorySink,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMTAP_TEST_OTHER_KEY", "sk-other-env-key-0123456789")
    flow = gateway_flow("/up/chat/completions", {"model": "smart-1", "messages": []},
                        headers={"authorization": "Bearer not-the-token-0123456789"})
    plan = route(router(relay, Security(token=TOKEN)), flow)
    assert plan is not None
    assert header(plan.targets[0].headers, b"authorization") == [b"Bearer not-the-token-0123456789"]


def test_an_unknown_gateway_provider_is_answered_404_naming_those_that_exist(relay: Relay, sink: MemorySink) -> None:
    flow = gateway_flow("/nosuch/chat/completions", {"model": "smart-1", "messages": []})
    assert route(router(relay), flow) is None
    assert flow.response is not None and flow.response.status_code == 404
    message = json.loads(flow.response.content)["error"]["message"]
    assert "'nosuch'" in message and "up" in message and "other" in message
    ((call, _),) = sink.finished
    assert call.status == 404 and call.model_requested == "smart-1"


def test_a_body_that_is_not_json_passes_unchanged_with_a_note(relay: Relay, sink: MemorySink) -> None:
    plan = route(router(relay), gateway_flow("/up/chat/completions", b"{not json"))
    assert plan is not None and plan.targets[0].body == b"{not json"
    assert any("not valid JSON" in n for n in sink.started[0].notes)


def test_a_flow_mitmproxy_failed_before_the_relay_is_still_recorded(relay: Relay, sink: MemorySink) -> None:
    r = router(relay)
    flow = gateway_flow("/up/chat/completions", {"model": "smart-1", "messages": []})
    plan = route(r, flow)
    assert plan is not None
    flow.error = tflow.terr("connection refused")
    r.error(flow)
    ((call, _),) = sink.finished
    assert call.start is plan.call and call.status == 502 and "proxy error before the relay" in (call.error or "")
    assert relay._plans == {}
