"""The mitmproxy addon: decide where each LLM request goes and hand it to the relay.

Runs on mitmproxy's event loop, so it does only what routing needs: one JSON parse of the
request body (the model decides the route), header redaction, and a plan for the relay.
Everything else -- decoding the response, extraction, DuckDB -- happens in the recorder.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

from mitmproxy import http
from mitmproxy.net import encoding as mitm_encoding
from mitmproxy.net.http import url as mitm_url
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_specs import ReverseMode

from llmtap.addons import rules as rules_mod
from llmtap.addons.relay import HOP_BY_HOP, PLAN_HEADER, Plan, Policy, Relay, Target, error_body
from llmtap.addons.upstream import Origin
from llmtap.dialects import registry
from llmtap.recorder.record import API_OTHER, Call, body_cut_note, detect_api, new_id, utcnow
from llmtap.recorder.redact import collect_secrets, redact_headers, redact_url

log = logging.getLogger("llmtap.routing")

# Credentials a client may carry, in any format; they go only to the provider the client addressed.
AUTH_HEADERS = registry.credential_headers()


def _family(api: str) -> str:
    """Wire family of an `api` value: openai.chat -> openai."""
    return api.split(".", 1)[0]


_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True, slots=True)
class Security:
    """Who may use the listeners, and who may spend the keys named by `key_env`.

    `token` is the llmtap gateway token: a client that sends it as its API key gets each
    target's `key_env` key instead (the token itself never leaves llmtap). None: no client can.
    `allow_origins` are the browser Origins (scheme://host[:port]) that may use the gateway;
    a page from any other Origin is refused, so that a web page cannot spend the user's keys.
    `gateway_hosts` are the names the gateway was told to listen on; with loopback names and
    the address a client connected to, they are the only Host headers the gateway answers
    (a DNS-rebinding page sends its own name).
    """

    token: str | None = None
    allow_origins: frozenset[str] = frozenset()
    gateway_hosts: frozenset[str] = frozenset()

    def is_token(self, value: str) -> bool:
        # Constant time: the token is a password, and the gateway may be reachable by others.
        return self.token is not None and hmac.compare_digest(value.encode("utf-8", "surrogateescape"),
                                                              self.token.encode("utf-8", "surrogateescape"))

    def browser_origin(self, headers: http.Headers) -> str | None:
        """The Origin of a request a web page made that is not explicitly allowed, else None."""
        origin = headers.get("origin")
        if origin is None:
            return None
        return None if origin.strip().rstrip("/").lower() in self.allow_origins else origin


def _addr(address: tuple | None) -> tuple[str, int] | None:
    return (str(address[0]), int(address[1])) if address else None


class Router:
    """mitmproxy addon. `rules` is read on every request, so a reload takes effect at once."""

    def __init__(self, relay: Relay, rules: Callable[[], rules_mod.Rules], security: Security | None = None) -> None:
        self.relay = relay
        self.rules = rules
        self.security = security or Security()
        # Local ends of mitmproxy's own upstream connections: a client connection from one of
        # them is mitmproxy talking to itself (a Host that resolves to this proxy).
        self._outgoing: set[tuple[str, int]] = set()

    # mitmproxy hooks ------------------------------------------------------------------------
    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        local = _addr(data.server.sockname)
        if local is not None:
            self._outgoing.add(local)

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        local = _addr(data.server.sockname)
        if local is not None:
            self._outgoing.discard(local)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # The request bytes were written after server_connected ran for the connection that
        # carries them, so a loop is always known here. mitmproxy refuses a Host naming its
        # own listener, but not a name that merely resolves to it (a rebinding page's name,
        # "127.1"): each hop would open another connection to itself without end.
        if _addr(flow.client_conn.peername) in self._outgoing:
            message = ("llmtap: request loop: the proxy was asked to forward a request to itself "
                       f"(Host {flow.request.host_header!r} resolves to one of llmtap's own listeners)")
            flow.response = http.Response.make(508, message.encode(), {"content-type": "text/plain"})

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        flow.metadata["llmtap_seen"] = True
        try:
            if isinstance(flow.client_conn.proxy_mode, ReverseMode) and self._refuse_gateway(flow):
                return
            self._route(flow)
        except Exception as exc:  # a routing bug must not break the call: pass it through
            log.exception("routing failed; passing the request through unchanged")
            flow.metadata["llmtap_error"] = f"routing failed: {exc!r}"

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Streaming is decided from the request, never the content type: without
        # `stream` set here mitmproxy delivers SSE and NDJSON only when complete, and it gives
        # no warning at all for Ollama's application/x-ndjson.
        if "llmtap_plan" in flow.metadata and flow.response is not None:
            flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        key = flow.metadata.get("llmtap_plan")
        plan = self.relay.drop_plan(key) if key is not None and flow.response is not None else None
        if plan is not None and flow.response is not None:  # the relay refused the request before taking it (a head over its limit)
            plan.call.status = flow.response.status_code
            plan.call.duration_ms = 0.0
            why = " (request head too large: over 1 MiB)" if plan.call.status == 431 else ""
            plan.call.error = f"refused by llmtap's relay with {plan.call.status} before any upstream try{why}"
            self.relay.finished(plan.call, [])

    def error(self, flow: http.HTTPFlow) -> None:
        key = flow.metadata.pop("llmtap_plan", None)
        if key is None:
            if "llmtap_seen" not in flow.metadata and flow.request is not None and flow.error is not None:
                self._record_unread(flow)
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

        # The upstream gets the bytes the client sent (raw_content); the decoded body is read
        # for the model and kept in the record.
        raw = req.raw_content or b""
        body = req.get_content(strict=False) or b""
        content_encoding = req.headers.get("content-encoding", "").strip().lower() or None
        if body is raw or content_encoding == "identity":
            content_encoding = None  # not encoded, or not decodable: nothing to re-encode
        notes: list[str] = []
        model, stream, doc = self._read_body(req.headers.get("content-type", ""), body, api, path, notes)
        client = req.headers.get("user-agent")
        call = Call(
            id=new_id(), started_at=utcnow(), method=req.method, url=redact_url(shown_url), api=api,
            client=client, model_requested=model, stream=stream,
            request_headers=redact_headers(req.headers.items(multi=True)),
            request_body=_kept(body, self.relay.body_limit, notes),
            notes=notes,
        )

        route = None
        if addressed is not None and api != API_OTHER:
            route = rules.match(model=model, host=req.pretty_host if not gateway else addressed.host,
                                path=rest, client=client, api=_family(api))
        client_headers, query, token_auth = self._take_token(list(req.headers.items(multi=True)), query)
        # key_env keys are the user's money: spent for a client that sent the llmtap token, or
        # on a fallback to another provider after the client authenticated to the one it
        # addressed -- never for a web page (a browser through HTTPS_PROXY may send Origin).
        browser = self.security.browser_origin(req.headers) is not None
        keys = _KeyUse(token=token_auth and not browser,
                       fallback=not browser and not token_auth and _has_auth(client_headers, query))
        if token_auth:
            notes.append("client sent the llmtap gateway token: each target got its key_env key")
        targets: list[Target] = []
        if route is not None:
            call.route = route.name
            for t in route.targets:
                provider = rules.providers[t.provider]
                new_model = t.model or model
                targets.append(self._target(provider, addressed, rest, query, client_headers, raw,
                                            content_encoding, doc, model, new_model, api, path, keys))
            policy = _policy(route, rules)
        elif addressed is not None:
            targets.append(self._target(addressed, addressed, rest, query, client_headers, raw,
                                        content_encoding, doc, model, model, api, path, keys))
            policy = _policy(None, rules)
        else:
            # An intercepted host path outside any provider's API: forward it untouched.
            origin = Origin(req.scheme, req.pretty_host, req.port)
            headers = _forward_headers(client_headers, origin, keep_auth=True)
            if raw or any(k == b"content-type" for k, _ in headers):
                headers.append((b"content-length", str(len(raw)).encode()))
            target = split.path + (f"?{query}" if query else "")
            targets.append(Target(None, origin, target, headers, raw, model))
            policy = _policy(None, rules)

        # The targets forward the client's own headers and query, already collected here; what
        # they add is llmtap's: a provider's key_env key and its configured headers.
        secrets = collect_secrets(client_headers, req.path)
        for target_ in targets:
            own = rules.providers.get(target_.provider) if target_.provider else None
            if own is not None:
                secrets |= _added_secrets(own)
        call.secrets = tuple(secrets)
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
        # The relay reads no body: neither send the empty one chunked nor gzip it.
        req.headers.pop("transfer-encoding", None)
        req.headers.pop("content-encoding", None)
        req.content = b""

    @staticmethod
    def _read_body(content_type: str, body: bytes, api: str, path: str,
                   notes: list[str]) -> tuple[str | None, bool | None, dict | None]:
        """(model, stream, parsed JSON object) from a request, as its dialect reads them; notes
        say what could not be read."""
        return registry.get(api).peek(content_type, body, path, notes)

    def _take_token(self, headers: list[tuple[str, str]], query: str) -> tuple[list[tuple[str, str]], str, bool]:
        """(headers, query, sent the token): the llmtap token taken out of wherever the client
        put its API key, so that it is never forwarded."""
        if self.security.token is None:
            return headers, query, False
        found = False
        kept: list[tuple[str, str]] = []
        for name, value in headers:
            key = name.lower()
            if key in AUTH_HEADERS:
                scheme, _, rest = value.strip().partition(" ")
                secret = rest.strip() if key == "authorization" and scheme.lower() == "bearer" else value.strip()
                if self.security.is_token(secret):
                    found = True
                    continue
            kept.append((name, value))
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(k.lower() == "key" and self.security.is_token(v) for k, v in pairs):
                found = True
                query = urlencode([(k, v) for k, v in pairs if not (k.lower() == "key" and self.security.is_token(v))])
        return kept, query, found

    def _target(self, provider: rules_mod.Provider, addressed: rules_mod.Provider | None, rest: str,
                query: str, client_headers: list[tuple[str, str]], body: bytes, content_encoding: str | None,
                doc: dict | None, old_model: str | None, new_model: str | None, api: str, path: str,
                keys: _KeyUse) -> Target:
        origin = Origin(provider.scheme, provider.host, provider.port)
        target_path = provider.base_path + rest
        same = addressed is not None and provider.name == addressed.name
        if not same and query:
            # The client's key in the query belongs to the provider it addressed.
            query = urlencode([(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k.lower() != "key"])
        drop: frozenset[str] = frozenset()
        if new_model != old_model and new_model is not None:
            # Where the model is (the body, or the URL path for Gemini) is the dialect's to say.
            new_doc, target_path = registry.get(api).rewrite_model(doc, target_path, new_model)
            if new_doc is not None and new_doc is not doc:
                body = json.dumps(new_doc, ensure_ascii=False, separators=(",", ":")).encode()
                if content_encoding is not None:
                    # The rewritten body is encoded as the client's was, so body and header agree.
                    # An encoding mitmproxy can decode but not encode: send it decoded and drop
                    # the header, which is just as consistent.
                    try:
                        body = mitm_encoding.encode(body, content_encoding)
                    except ValueError:
                        drop = frozenset({"content-encoding"})
        # With the llmtap token the key is llmtap's to choose, so no other client key rides along.
        headers = _forward_headers(client_headers, origin, keep_auth=same and not keys.token, drop=drop)
        if keys.token or (keys.fallback and not same):
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
        self._answer_own(flow, 404, "unknown_provider", message, url, "openai")

    def _answer_own(self, flow: http.HTTPFlow, status: int, code: str, message: str, url: str, family: str) -> None:
        """Answer the client with llmtap's own error, in its API's error shape, and record it."""
        body = error_body(family, status, message, code)
        flow.response = http.Response.make(status, body, {"content-type": "application/json"})
        req = flow.request
        request_body = req.get_content(strict=False) or b""
        path = urlsplit(req.path).path or "/"
        api = detect_api(req.method, path)
        model, stream, _ = self._read_body(req.headers.get("content-type", ""), request_body, api, path, [])
        notes: list[str] = []
        call = Call(id=new_id(), started_at=utcnow(), method=req.method, url=redact_url(url), api=api,
                    model_requested=model, stream=stream,
                    client=req.headers.get("user-agent"), status=status, duration_ms=0.0,
                    request_headers=redact_headers(flow.request.headers.items(multi=True)),
                    secrets=tuple(collect_secrets(flow.request.headers.items(multi=True), flow.request.path)),
                    request_body=_kept(request_body, self.relay.body_limit, notes),
                    response_headers={"content-type": "application/json"}, response_body=body,
                    error=message, notes=notes)
        self.relay.finished(call, [])

    def _gateway_url(self, flow: http.HTTPFlow) -> str:
        listen = flow.client_conn.sockname
        return f"http://{_fmt_host(listen[0])}:{listen[1]}{flow.request.path}"

    def _family_of(self, flow: http.HTTPFlow) -> str:
        """The API family a gateway request speaks: its provider's, else its path's."""
        req = flow.request
        path = urlsplit(req.path).path or "/"
        provider = self.rules().providers.get(path.lstrip("/").partition("/")[0])
        if provider is not None and provider.api in ("openai", "anthropic", "gemini", "ollama"):
            return provider.api
        return error_family(req.method, path)

    def _refuse_gateway(self, flow: http.HTTPFlow) -> bool:
        """Refuse (403, recorded) a gateway request from a web page or addressed by a foreign
        name; True when refused."""
        req = flow.request
        listen_host, listen_port = flow.client_conn.sockname[:2]
        listen_host = str(listen_host).lower().removeprefix("::ffff:")  # IPv4 on a dual-stack socket
        origin = self.security.browser_origin(req.headers)
        if origin is not None:
            message = (f"llmtap gateway: refused a request a web page sent (Origin: {origin}). The "
                       "gateway spends your API keys, so pages you open may not use it. If this is your "
                       f"own web app, start llmtap with --allow-origin {origin}")
            self._answer_own(flow, 403, "llmtap_origin_refused", message, self._gateway_url(flow), self._family_of(flow))
            return True
        host_header = req.host_header
        if host_header is None:
            return False  # HTTP/1.0 without Host: no browser sends that
        try:
            host, port = mitm_url.parse_authority(host_header, check=True)
        except ValueError:
            host, port = "", None
        host = host.lower().rstrip(".")
        names = _LOOPBACK_NAMES | {listen_host} | self.security.gateway_hosts
        if host in names and (port or 80) == listen_port:
            return False
        message = (f"llmtap gateway: refused Host {host_header!r}: the gateway answers only requests "
                   f"addressed to it by its own name ({', '.join(sorted(names))}, port {listen_port}); "
                   "another name is how a DNS-rebinding web page reaches it. Use a base URL like "
                   f"http://127.0.0.1:{listen_port}/<provider>")
        self._answer_own(flow, 403, "llmtap_host_refused", message, self._gateway_url(flow), self._family_of(flow))
        return True

    def _record_unread(self, flow: http.HTTPFlow) -> None:
        """A request mitmproxy could not read to its end (bad framing, a client gone mid-body):
        it never reached the request hook, so it is recorded here."""
        req = flow.request
        path = urlsplit(req.path).path or "/"
        gateway = isinstance(flow.client_conn.proxy_mode, ReverseMode)
        if gateway:
            url = self._gateway_url(flow)
        else:
            rules = self.rules()
            api = detect_api(req.method, path)
            if (rules.provider_for_url(req.scheme, req.pretty_host, req.port, path, _family(api)) is None
                    and (req.pretty_host.lower(), req.port) not in rules.intercept_addresses()):
                return  # not an LLM API: not ours to record
            url = req.pretty_url
        # mitmproxy's advice to turn its header validation off is not advice for a user of llmtap.
        reason = str(flow.error.msg if flow.error is not None else "").split(" Disable the validate_inbound_headers", 1)[0]
        if "disconnect" in reason.lower() or "peer closed" in reason.lower():
            status, error = 499, f"client disconnected before the request was complete: {reason}"
        else:
            status, error = 400, f"malformed request, refused with 400: {reason}"
        notes: list[str] = []
        call = Call(id=new_id(), started_at=utcnow(), method=req.method, url=redact_url(url),
                    api=detect_api(req.method, path), client=req.headers.get("user-agent"),
                    status=status, duration_ms=0.0,
                    request_headers=redact_headers(req.headers.items(multi=True)),
                    secrets=tuple(collect_secrets(req.headers.items(multi=True), req.path)),
                    request_body=_kept(req.raw_content or b"", self.relay.body_limit, notes), error=error,
                    notes=notes)
        self.relay.finished(call, [])


@dataclass(frozen=True, slots=True)
class _KeyUse:
    """When a target may get its provider's key_env key."""

    token: bool  # the client sent the llmtap token: every target
    fallback: bool  # the client authenticated to the provider it addressed: targets on others


def _added_secrets(provider: rules_mod.Provider) -> set[str]:
    """The credentials llmtap itself may send to `provider`: its key_env key and any secret
    header the rules give it (masked whether or not this call used them)."""
    pairs = list(provider.headers.items())
    key = os.environ.get(provider.key_env) if provider.key_env else None
    if key:
        pairs.append(("authorization", key))
    return collect_secrets(pairs)


def _has_auth(headers: list[tuple[str, str]], query: str) -> bool:
    if any(k.lower() in AUTH_HEADERS for k, _ in headers):
        return True
    return bool(query) and any(k.lower() == "key" and v for k, v in parse_qsl(query, keep_blank_values=True))


def _fmt_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def error_family(method: str, path: str) -> str:
    """The API family whose error shape llmtap answers a request in, from its path alone."""
    family = registry.detect(method, path).family
    return family if family != registry.OTHER else "openai"


def _kept(body: bytes, limit: int, notes: list[str]) -> bytes:
    """What the record keeps of a request body (the upstream still gets all of it)."""
    if len(body) <= limit:
        return body
    notes.append(body_cut_note("request", limit, len(body)))
    return body[:limit]


def _forward_headers(client_headers: list[tuple[str, str]], origin: Origin, *, keep_auth: bool,
                     drop: frozenset[str] = frozenset()) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for name, value in client_headers:
        key = name.lower()
        kb = key.encode()
        if kb in HOP_BY_HOP or key in ("host", "content-length", "accept-encoding", PLAN_HEADER) or key in drop:
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
    """How a provider speaking `api` (rules.yaml's family) is sent a key: its dialect's header."""
    return registry.for_family(api).auth_header(key)


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
