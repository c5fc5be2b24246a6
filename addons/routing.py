"""The mitmproxy addon: decide where each LLM request goes and hand it to the relay.

Runs on mitmproxy's event loop, so it does only what routing needs: one JSON parse of the
request body (the model decides the route), header redaction, and a plan for the relay.
Everything else -- decoding the response, extraction, DuckDB -- happens in the recorder.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from llmtap.addons import rules as rules_mod
from llmtap.addons.relay import PLAN_HEADER, HOP_BY_HOP, RECORD_BODY_LIMIT, Plan, Policy, Relay, Target
from llmtap.addons.upstream import Origin
from llmtap.recorder.record import API_OTHER, Call, detect_api, new_id, utcnow
from llmtap.recorder.redact import redact_headers, redact_url

log = logging.getLogger("llmtap.routing")

# Credentials a client may carry; they go only to the provider the client addressed.
AUTH_HEADERS = frozenset({"authorization", "x-api-key", "api-key", "x-goog-api-key"})
_GEMINI_MODEL = re.compile(r"(/models/)([^/:]+)(:[A-Za-z]+)")


def _family(api: str) -> str:
    """Wire family of an `api` value: openai.chat -> openai."""
    return api.split(".", 1)[0]


class Router:
    """mitmproxy addon. `rules` is read on every request, so a reload takes effect at once."""

    def __init__(self, relay: Relay, rules: Callable[[], rules_mod.Rules]) -> None:
        self.relay = relay
        self.rules = rules

    # mitmproxy hooks ------------------------------------------------------------------------
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        try:
            self._route(flow)
        except Exception as exc:  # a routing bug must not break the call: pass it through
            log.exception("routing failed; passing the request through unchanged")
            flow.metadata["llmtap_error"] = f"routing failed: {exc!r}"

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Streaming is decided from the request, never the content type: Ollama's NDJSON
        # would otherwise be buffered whole (FACTS.md).
        if "llmtap_plan" in flow.metadata and flow.response is not None:
            flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        key = flow.metadata.get("llmtap_plan")
        plan = self.relay.drop_plan(key) if key is not None and flow.response is not None else None
        if plan is not None:  # the relay refused the request before taking it (a head over its limit)
            plan.call.status = flow.response.status_code
            plan.call.duration_ms = 0.0
            why = " (request head too large: over 1 MiB)" if plan.call.status == 431 else ""
            plan.call.error = f"refused by llmtap's relay with {plan.call.status} before any upstream try{why}"
            self.relay.finished(plan.call, [])

    def error(self, flow: http.HTTPFlow) -> None:
        key = flow.metadata.pop("llmtap_plan", None)
        if key is None:
            return
        plan = self.relay.drop_plan(key)
        if plan is not None:  # mitmproxy never reached the relay: still record the call
            plan.call.status = 502
            plan.call.duration_ms = 0.0
            plan.call.error = f"proxy error before the relay: {flow.error}"
            self.relay.finished(plan.call, [])

    # routing -------------------------------------------------------------------------------
    def _route(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        rules = self.rules()
        gateway = isinstance(flow.client_conn.proxy_mode, ReverseMode)
        split = urlsplit(req.path)
        path, query = split.path or "/", split.query
        api = detect_api(req.method, path)
        addressed: rules_mod.Provider | None
        if gateway:
            listen = flow.client_conn.sockname
            shown_url = f"http://{listen[0]}:{listen[1]}{req.path}"
            first, _, rest = path.lstrip("/").partition("/")
            addressed = rules.providers.get(first)
            if addressed is None:
                self._answer_unknown_provider(flow, first, rules, shown_url)
                return
            rest = "/" + rest
        else:
            shown_url = req.pretty_url
            found = rules.provider_for_url(req.scheme, req.pretty_host, req.port, path, _family(api))
            if found is None and (req.pretty_host.lower(), req.port) not in rules.intercept_addresses():
                return  # plain-HTTP traffic to a host that is no LLM API: not ours to touch
            addressed, rest = found if found else (None, path)

        body = req.get_content(strict=False) or b""
        notes: list[str] = []
        model, stream, doc = self._read_body(req.headers.get("content-type", ""), body, api, path, notes)
        client = req.headers.get("user-agent")
        call = Call(
            id=new_id(), started_at=utcnow(), method=req.method, url=redact_url(shown_url), api=api,
            client=client, model_requested=model, stream=stream,
            request_headers=redact_headers(req.headers.items(multi=True)),
            request_body=body if len(body) <= RECORD_BODY_LIMIT else body[:RECORD_BODY_LIMIT],
            notes=notes,
        )
        if len(body) > RECORD_BODY_LIMIT:
            notes.append(f"request body over {RECORD_BODY_LIMIT >> 20} MiB: the record keeps the first part")

        route = None
        if addressed is not None and api != API_OTHER:
            route = rules.match(model=model, host=req.pretty_host if not gateway else addressed.host,
                                path=rest, client=client, api=_family(api))
        client_headers = [(k, v) for k, v in req.headers.items(multi=True)]
        targets: list[Target] = []
        if route is not None:
            call.route = route.name
            for t in route.targets:
                provider = rules.providers[t.provider]
                new_model = t.model or model
                targets.append(self._target(provider, addressed, rest, query, client_headers, body, doc,
                                            model, new_model, api, path))
            policy = _policy(route, rules)
        elif addressed is not None:
            targets.append(self._target(addressed, addressed, rest, query, client_headers, body, doc,
                                        model, model, api, path))
            policy = _policy(None, rules)
        else:
            # An intercepted host path outside any provider's API: forward it untouched.
            origin = Origin(req.scheme, req.pretty_host, req.port)
            headers = _forward_headers(client_headers, origin, keep_auth=True)
            targets.append(Target(None, origin, req.path, headers, body, model))
            policy = _policy(None, rules)

        plan = Plan(call=call, method=req.method, targets=targets, policy=policy, api_family=_family(api))
        key = self.relay.add_plan(plan)
        flow.metadata["llmtap_plan"] = key
        flow.metadata["llmtap_call"] = call.id
        try:
            self.relay.sink.call_started(call)
        except Exception:
            log.exception("recorder refused a started call")
        # Point the flow at the relay. The body travels in the plan, not over the socket.
        req.scheme = "http"
        req.host = "127.0.0.1"
        req.port = self.relay.port
        req.headers[PLAN_HEADER] = key
        req.content = b""

    @staticmethod
    def _read_body(content_type: str, body: bytes, api: str, path: str,
                   notes: list[str]) -> tuple[str | None, bool | None, dict | None]:
        """(model, stream, parsed JSON object) from a request; notes say what could not be read."""
        model: str | None = None
        stream: bool | None = None
        doc: dict | None = None
        if api == "gemini.generate":
            m = _GEMINI_MODEL.search(path)
            model = m.group(2) if m else None
            stream = "streamGenerateContent" in path
        if body and ("json" in content_type or body[:1] in (b"{", b"[")):
            try:
                parsed = json.loads(body)
            except UnicodeDecodeError:
                notes.append("request body is not UTF-8; passed through unchanged")
            except ValueError as exc:
                notes.append(f"request body is not valid JSON ({exc}); passed through unchanged")
            else:
                if isinstance(parsed, dict):
                    doc = parsed
                    if isinstance(parsed.get("model"), str):
                        model = parsed["model"]
                    if isinstance(parsed.get("stream"), bool):
                        stream = parsed["stream"]
                    elif api == "ollama.chat":
                        stream = True  # Ollama streams unless told not to
        elif body and api != API_OTHER and api != "gemini.generate":
            notes.append(f"request body is not JSON (content-type {content_type or 'none'}); passed through unchanged")
        return model, stream, doc

    def _target(self, provider: rules_mod.Provider, addressed: rules_mod.Provider | None, rest: str,
                query: str, client_headers: list[tuple[str, str]], body: bytes, doc: dict | None,
                old_model: str | None, new_model: str | None, api: str, path: str) -> Target:
        origin = Origin(provider.scheme, provider.host, provider.port)
        target_path = provider.base_path + rest
        same = addressed is not None and provider.name == addressed.name
        if not same and query:
            # The client's key in the query belongs to the provider it addressed.
            query = urlencode([(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k.lower() != "key"])
        if new_model != old_model and new_model is not None:
            if api == "gemini.generate":
                target_path = _GEMINI_MODEL.sub(lambda m: f"{m.group(1)}{new_model}{m.group(3)}", target_path, count=1)
            elif doc is not None:
                doc = dict(doc, model=new_model)
                body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        headers = _forward_headers(client_headers, origin, keep_auth=same)
        has_auth = any(k.lower() in AUTH_HEADERS for k, _ in client_headers)
        if not same or not has_auth:
            key = os.environ.get(provider.key_env) if provider.key_env else None
            if key:
                headers.append(_auth_header(provider.api, key))
        for k, v in provider.headers.items():
            headers.append((k.lower().encode(), v.encode()))
        if body or any(k == b"content-type" for k, _ in headers):
            headers.append((b"content-length", str(len(body)).encode()))
        return Target(provider.name, origin, target_path + (f"?{query}" if query else ""), headers, body, new_model)

    def _answer_unknown_provider(self, flow: http.HTTPFlow, name: str, rules: rules_mod.Rules, url: str) -> None:
        known = ", ".join(sorted(rules.providers))
        message = (f"llmtap gateway: no provider named {name!r}. Use a base URL like "
                   f"http://HOST:PORT/<provider>/..., with <provider> one of: {known}")
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                     "code": "unknown_provider"}}).encode()
        flow.response = http.Response.make(404, body, {"content-type": "application/json"})
        call = Call(id=new_id(), started_at=utcnow(), method=flow.request.method, url=redact_url(url),
                    client=flow.request.headers.get("user-agent"), status=404, duration_ms=0.0,
                    request_headers=redact_headers(flow.request.headers.items(multi=True)),
                    request_body=flow.request.get_content(strict=False) or b"",
                    response_headers={"content-type": "application/json"}, response_body=body,
                    error=message)
        self.relay.finished(call, [])


def _forward_headers(client_headers: list[tuple[str, str]], origin: Origin, *, keep_auth: bool) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for name, value in client_headers:
        key = name.lower()
        kb = key.encode()
        if kb in HOP_BY_HOP or key in ("host", "content-length", "accept-encoding", PLAN_HEADER):
            continue
        if not keep_auth and key in AUTH_HEADERS:
            continue
        out.append((kb, value.encode("utf-8", "surrogateescape")))
    default = 443 if origin.tls else 80
    host = origin.host if origin.port == default else f"{origin.host}:{origin.port}"
    out.insert(0, (b"host", host.encode()))
    # Plain bytes on the wire make the record exact; the extractor still decodes gzip/br.
    out.append((b"accept-encoding", b"identity"))
    return out


def _auth_header(api: str, key: str) -> tuple[bytes, bytes]:
    if api == "anthropic":
        return (b"x-api-key", key.encode())
    if api == "gemini":
        return (b"x-goog-api-key", key.encode())
    return (b"authorization", b"Bearer " + key.encode())


def _policy(route: rules_mod.Route | None, rules: rules_mod.Rules) -> Policy:
    if route is None:
        # No rule: one attempt where the client addressed it, as if llmtap were not there --
        # so no first-byte limit a slow non-streamed reasoning call could hit.
        return Policy(attempts=1, on_connect=False, on_timeout=False, first_byte_s=3600.0)
    retry, timeout = route.retry, route.timeout
    return Policy(
        attempts=retry.attempts,
        backoff_ms=retry.backoff_ms,
        on_connect=retry.retries_connect,
        on_timeout=retry.retries_timeout,
        statuses=retry.retries_status,
        retry_after_cap_s=retry.retry_after_cap_s,
        connect_s=timeout.connect_s,
        first_byte_s=timeout.first_byte_s,
    )
