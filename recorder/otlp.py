"""OpenTelemetry traces over OTLP/HTTP (`llmtap run --otlp URL`, `llmtap export otlp`).

Each finished call becomes one span that follows the OpenTelemetry GenAI semantic conventions
(the inference span: name `{gen_ai.operation.name} {gen_ai.request.model}`, `gen_ai.*`
attributes), with one child span per upstream attempt, so a fallback shows as two children.
The spans are built from committed rows -- what the file holds, already redacted -- in the
recorder's process, never in the proxy's.

Ids are derived, not random: a call's ULID is 128 bits, exactly a trace id, and its span ids
are hashes of it. Exporting a call again (a backfill after an outage) sends the same ids, so a
backend that keys spans by id (Langfuse, Tempo's dedup) keeps one copy. A client that sent a
W3C `traceparent` gets the call's span inside its own trace instead.

Encoding is done here with `opentelemetry-proto`'s messages and POSTed with httpx rather than
through the SDK's span exporter: the SDK's exporter takes only SDK `ReadableSpan`s, whose ids
come from the SDK's random id generator, and retries inside `export()` with sleeps of its own
(up to a minute) that a bounded queue in front of it could not see. Here a batch is one
protobuf message, retried on this module's terms (back-off, `Retry-After` on 429/503, a short
timeout), and an unreachable collector costs counted drops and one warning, never the writer.
"""

from __future__ import annotations

import base64
import collections
import gzip
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

log = logging.getLogger("llmtap.recorder")

TRACES_PATH = "/v1/traces"
CONTENT_MODES = ("none", "full")
DEFAULT_CONTENT_MAX = 32 * 1024  # characters per content attribute (input, output, system)
DEFAULT_TIMEOUT_S = 5.0
QUEUE_CALLS = 20_000  # calls waiting to be sent; beyond it (or QUEUE_CHARS) they are dropped, counted
QUEUE_CHARS = 64 << 20  # text the waiting calls hold (with --otlp-content full: their bodies)
BATCH_CALLS = 256
RETRIES = 5  # per batch, then it is dropped (counted); `llmtap export otlp` sends it again
BACKOFF_MAX_S = 30.0
GATHER_S = 1.0  # how long a span waits for others to go in one request
CLOSE_FLUSH_S = 3.0  # what `close()` gives the queue before counting the rest as dropped

# gen_ai.operation.name by llmtap's dialect; OpenAI Responses is "chat" with openai.api.type.
OPERATIONS = {"openai.chat": "chat", "openai.responses": "chat", "anthropic.messages": "chat",
              "ollama.chat": "chat", "gemini.generate": "generate_content"}
OPENAI_API_TYPE = {"openai.chat": "chat_completions", "openai.responses": "responses"}
# gen_ai.provider.name: the conventions' well-known values by the upstream's host, else by the
# wire format the call spoke (the conventions make the name the discriminator of the format's
# flavour), else llmtap's own provider name.
_HOSTS = (("api.openai.com", "openai"), (".openai.azure.com", "azure.ai.openai"),
          ("api.anthropic.com", "anthropic"), ("generativelanguage.googleapis.com", "gcp.gemini"),
          ("aiplatform.googleapis.com", "gcp.vertex_ai"), ("api.deepseek.com", "deepseek"),
          ("api.groq.com", "groq"), ("api.mistral.ai", "mistral_ai"), ("api.x.ai", "x_ai"),
          ("api.perplexity.ai", "perplexity"), ("api.cohere.com", "cohere"), ("api.cohere.ai", "cohere"),
          ("bedrock-runtime.", "aws.bedrock"), ("openrouter.ai", "openrouter"))
_BY_API = {"openai.chat": "openai", "openai.responses": "openai", "anthropic.messages": "anthropic",
           "gemini.generate": "gcp.gemini", "ollama.chat": "ollama"}
# Output messages' finish_reason in the conventions' words; the span's own
# gen_ai.response.finish_reasons keeps the provider's value, as the conventions' examples do.
_FINISH = {"stop": "stop", "end_turn": "stop", "stop_sequence": "stop", "STOP": "stop", "completed": "stop",
           "length": "length", "max_tokens": "length", "MAX_TOKENS": "length", "incomplete": "length",
           "tool_calls": "tool_call", "tool_use": "tool_call", "function_call": "tool_call",
           "content_filter": "content_filter", "SAFETY": "content_filter", "refusal": "content_filter"}
# Cache counts, read from the answer's last usage object (no column holds them). The keys are
# matched only as JSON keys: a model that writes one in its text has it escaped (\"...\").
_CACHE_READ = re.compile(r'"(?:cache_read_input_tokens|cached_tokens|cachedContentTokenCount|'
                         r'prompt_cache_hit_tokens)"\s*:\s*(\d+)')
_CACHE_WRITE = re.compile(r'"cache_creation_input_tokens"\s*:\s*(\d+)')
_RESPONSE_ID = re.compile(r'"(?:id|responseId)"\s*:\s*"([^"\\]{1,200})"')
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
EDGE = 4096  # of an answer's text, the head (its id) and the tail (its final usage) are kept

# Row columns a span never needs (bodies as raw bytes, response headers).
_HEAVY = ("request_body", "response_body", "request_body_raw", "response_body_raw", "response_headers",
          "request_headers", "content", "reasoning", "tool_calls", "prompt")
_CONTENT_COLUMNS = ("request_body", "content", "reasoning", "tool_calls", "prompt")


class OtlpError(ValueError):
    """A setting is wrong; the message names the flag or variable and the fix."""


# -- settings ---------------------------------------------------------------------------------------
def traces_url(base: str, what: str = "--otlp") -> str:
    """The traces endpoint for a base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is read: `/v1/traces`
    appended to its path."""
    parts = urlsplit(base.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OtlpError(f"{what} {base!r}: expected an http:// or https:// URL, e.g. "
                        f"http://127.0.0.1:4318 (OTLP/HTTP's port; spans go to URL{TRACES_PATH})")
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + TRACES_PATH))


def resolve(url: str | None = None, content: str | None = None, content_max: int | None = None,
            environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`Options.otlp` from the flags and the standard OTEL_* variables: {} when tracing is off.
    Headers are not in it: they carry credentials, so the process that sends reads them from
    its environment, and they never appear on a command line."""
    env = os.environ if environ is None else environ
    from_env = not url
    if url:
        endpoint = traces_url(url)
    elif env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        endpoint = env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"].strip()
        traces_url(endpoint, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")  # checked, used as given
    elif env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        endpoint = traces_url(env["OTEL_EXPORTER_OTLP_ENDPOINT"], "OTEL_EXPORTER_OTLP_ENDPOINT")
    else:
        return {}
    if not url and (env.get("OTEL_SDK_DISABLED", "").lower() == "true"
                    or env.get("OTEL_TRACES_EXPORTER", "").lower() == "none"):
        return {}
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "").lower()
    if protocol and protocol != "http/protobuf":
        raise OtlpError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: llmtap sends OTLP/HTTP with protobuf "
                        "only; set it to http/protobuf (or unset it) and point the endpoint at the "
                        "collector's HTTP port (4318)")
    if content is None:
        capture = env.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "").lower()
        content = "full" if capture in ("true", "span_only", "span_and_event") else "none"
    # The options cross to the recorder's process on its command line, where any local user can
    # read them: an endpoint from a variable (which may hold user:password@ or a ?token=) is
    # named there only as shown(), and the process reads the variable itself.
    return {"endpoint": shown(endpoint) if from_env else endpoint, "from_env": from_env,
            "content": content, "content_max": content_max or DEFAULT_CONTENT_MAX}


def endpoint_of(options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> str:
    """The endpoint to POST to, as `resolve` found it (from the environment again, see there)."""
    return _env_endpoint(environ) if options.get("from_env") else str(options["endpoint"])


def _env_endpoint(environ: Mapping[str, str] | None) -> str:
    env = os.environ if environ is None else environ
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"].strip()
    return traces_url(env["OTEL_EXPORTER_OTLP_ENDPOINT"], "OTEL_EXPORTER_OTLP_ENDPOINT")


def parse_headers(text: str, what: str) -> dict[str, str]:
    """OTEL_EXPORTER_OTLP_HEADERS: `key=value,key2=value2`, values URL-encoded."""
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            # The value may be a credential: the message names the key only.
            raise OtlpError(f"{what}: expected key=value pairs separated by commas, e.g. "
                            f"{what}=\"Authorization=Basic%20...\"; {key.strip()[:40]!r} has no '='")
        out[unquote(key.strip()).lower()] = unquote(value.strip())
    return out


def env_headers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    headers: dict[str, str] = {}
    for name in ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"):  # the latter wins
        if env.get(name):
            headers.update(parse_headers(env[name], name))
    return headers


def _env_timeout(env: Mapping[str, str]) -> float:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        if env.get(name):
            try:
                return max(0.1, float(env[name]) / 1000)  # milliseconds, per the specification
            except ValueError:
                log.warning("llmtap otlp: %s=%r is not a number of milliseconds; using %.0f s", name,
                            env[name], DEFAULT_TIMEOUT_S)
    return DEFAULT_TIMEOUT_S


def shown(url: str) -> str:
    """A collector URL for messages: no user:password, no query (either may hold a token)."""
    p = urlsplit(url)
    host = p.hostname or ""
    return f"{p.scheme}://{host}{':' + str(p.port) if p.port else ''}{p.path}"


# -- ids ---------------------------------------------------------------------------------------------
_CROCKFORD = {c: i for i, c in enumerate("0123456789ABCDEFGHJKMNPQRSTVWXYZ")}


def trace_id_of(call_id: str) -> bytes:
    """The ULID's 128 bits; a call id that is not one (none llmtap makes) is hashed instead."""
    text = call_id.upper()
    if len(text) == 26 and all(c in _CROCKFORD for c in text) and text[0] in "01234567":
        n = 0
        for c in text:
            n = n * 32 + _CROCKFORD[c]
        value = n.to_bytes(16, "big")
        if any(value):
            return value
    return hashlib.blake2b(call_id.encode(), digest_size=16, person=b"llmtap-trace").digest()


def span_id_of(call_id: str, attempt: int | None = None) -> bytes:
    key = call_id if attempt is None else f"{call_id}/attempt/{attempt}"
    sid = hashlib.blake2b(key.encode(), digest_size=8, person=b"llmtap-span").digest()
    return sid if any(sid) else b"\x00" * 7 + b"\x01"


def parent_of(request_headers: Any) -> tuple[bytes, bytes, str] | None:
    """(trace id, parent span id, tracestate) from a recorded W3C traceparent, if valid."""
    headers = request_headers
    if isinstance(headers, str):
        try:
            headers = json.loads(headers)
        except ValueError:
            return None
    if not isinstance(headers, dict):
        return None
    lower = {str(k).lower(): v for k, v in headers.items()}
    value = lower.get("traceparent")
    if not isinstance(value, str):
        return None
    m = _TRACEPARENT.match(value.strip().lower())
    if m is None or m.group(1) == "ff":
        return None
    trace, parent = bytes.fromhex(m.group(2)), bytes.fromhex(m.group(3))
    if not any(trace) or not any(parent):
        return None
    state = lower.get("tracestate")
    return trace, parent, state if isinstance(state, str) else ""


# -- spans -------------------------------------------------------------------------------------------
def _nanos(when: Any) -> int:
    if isinstance(when, str):
        when = datetime.fromisoformat(when)
    if not isinstance(when, datetime):
        return 0
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


def _end(start: Any, duration_ms: Any) -> int:
    begin = _nanos(start)
    return begin + int(duration_ms * 1_000_000) if isinstance(duration_ms, (int, float)) else begin


def _server(url: str | None) -> tuple[str | None, int | None]:
    if not url:
        return None, None
    try:
        p = urlsplit(url)
        port = p.port or {"https": 443, "http": 80}.get(p.scheme)
    except ValueError:
        return None, None
    return p.hostname, port


def provider_name(api: str, provider: str | None, upstream_url: str | None) -> str | None:
    host = (_server(upstream_url)[0] or "").lower()
    for suffix, name in _HOSTS:
        if host == suffix.lstrip(".") or host.endswith(suffix) or (suffix.endswith(".") and host.startswith(suffix)):
            return name
    if api in _BY_API:
        return _BY_API[api]
    return provider


def _operation(api: str, url: str) -> str | None:
    if api in OPERATIONS:
        return OPERATIONS[api]
    path = urlsplit(url).path if url else ""
    if path.endswith("/embeddings") or path.endswith(":embedContent") or path.endswith("/api/embed"):
        return "embeddings"
    if path.endswith("/completions") and not path.endswith("/chat/completions"):
        return "text_completion"
    return None


def _last_int(pattern: re.Pattern[str], *texts: str | None) -> int | None:
    for text in reversed(texts):  # the tail holds the final usage
        if text:
            found = pattern.findall(text)
            if found:
                return int(found[-1])
    return None


def slim(row: Mapping[str, Any], content: str) -> dict[str, Any]:
    """What a span needs of a committed row: all but the bodies, of the answer its edges (id,
    final usage), and with content on, the texts messages are made of. Called on the writer
    thread, so it copies a few KB, never a body."""
    out = {k: v for k, v in row.items() if k not in _HEAVY}
    body = row.get("response_body")
    if isinstance(body, str):
        out["_head"], out["_tail"] = body[:EDGE], (body[-EDGE:] if len(body) > EDGE else "")
    out["_parent"] = parent_of(row.get("request_headers"))
    if content == "full":
        for k in _CONTENT_COLUMNS:
            out[k] = row.get(k)
    return out


def weight(item: Mapping[str, Any]) -> int:
    return 512 + sum(len(v) for k in _CONTENT_COLUMNS if isinstance(v := item.get(k), str))


class SpanBuilder:
    """Rows (slimmed) -> OTLP protobuf spans. `content` "none" or "full"; `content_max` caps each
    content attribute, in characters."""

    def __init__(self, content: str = "none", content_max: int = DEFAULT_CONTENT_MAX) -> None:
        from opentelemetry.proto.common.v1 import common_pb2
        from opentelemetry.proto.trace.v1 import trace_pb2

        self.content = content
        self.content_max = max(256, content_max)
        self._pb, self._common = trace_pb2, common_pb2

    # attributes
    def _kv(self, key: str, value: Any) -> Any:
        kv = self._common.KeyValue(key=key)
        v = kv.value
        if isinstance(value, bool):
            v.bool_value = value
        elif isinstance(value, int):
            v.int_value = value
        elif isinstance(value, float):
            v.double_value = value
        elif isinstance(value, (list, tuple)):
            for item in value:
                v.array_value.values.add(string_value=str(item))
        else:
            v.string_value = str(value)
        return kv

    def _attrs(self, span: Any, attrs: Iterable[tuple[str, Any]]) -> None:
        span.attributes.extend(self._kv(k, v) for k, v in attrs if v is not None and v != "")

    def spans(self, call: Mapping[str, Any], attempts: Sequence[Mapping[str, Any]]) -> list[Any]:
        pb = self._pb
        cid = str(call["id"])
        parent = call.get("_parent")
        trace_id = parent[0] if parent else trace_id_of(cid)
        span_id = span_id_of(cid)
        api, url, method = str(call.get("api") or "other"), str(call.get("url") or ""), str(call.get("method") or "")
        last = max(attempts, key=lambda a: a.get("n") or 0) if attempts else None
        upstream = last.get("url") if last else None
        op = _operation(api, url)
        model = call.get("model_requested") or call.get("model_sent")
        span = pb.Span(trace_id=trace_id, span_id=span_id, kind=pb.Span.SPAN_KIND_CLIENT,
                       start_time_unix_nano=_nanos(call.get("started_at")),
                       end_time_unix_nano=_end(call.get("started_at"), call.get("duration_ms")))
        if parent:
            span.parent_span_id, span.trace_state = parent[1], parent[2]
        # The conventions' inference span is CLIENT: llmtap makes the call to the model on the
        # client's behalf. A call that is no model call (a model list) is a plain HTTP span.
        span.name = f"{op} {model}" if op and model else (op or f"{method} {urlsplit(url).path or '/'}".strip())
        status = call.get("status")
        error_type = self._error_type(status, call.get("error"), call.get("complete"))
        address, port = _server(upstream)
        head, tail = call.get("_head"), call.get("_tail")
        input_tokens, output_tokens = call.get("input_tokens"), call.get("output_tokens")
        cache_read, cache_write = call.get("cache_read_tokens"), call.get("cache_write_tokens")
        if op is not None and cache_read is None and cache_write is None and call.get("usage_raw") is None:
            # A row recorded before llmtap had the cache columns (m004): read them from the
            # answer's last usage. Anthropic then counted them apart from input_tokens; the
            # conventions' input tokens include them, as the columns since m004 do.
            cache_read, cache_write = _last_int(_CACHE_READ, head, tail), _last_int(_CACHE_WRITE, head, tail)
            if api == "anthropic.messages" and isinstance(input_tokens, int):
                input_tokens += (cache_read or 0) + (cache_write or 0)
        response_id = None
        if op is not None and isinstance(status, int) and status < 400 and head:
            m = _RESPONSE_ID.search(head)
            response_id = m.group(1) if m else None
        finish = call.get("finish_reason")
        ttfb = call.get("ttfb_ms")
        self._attrs(span, [
            ("gen_ai.operation.name", op),
            ("gen_ai.provider.name", provider_name(api, call.get("provider"), upstream) if op else None),
            ("gen_ai.request.model", model if op else None),
            ("gen_ai.response.model", call.get("model_reported")),
            ("gen_ai.response.id", response_id),
            ("gen_ai.request.stream", True if call.get("stream") else None),
            ("gen_ai.conversation.id", call.get("session_id")),
            # The general registry's name for it, which Langfuse and Phoenix group sessions by.
            ("session.id", call.get("session_id")),
            ("gen_ai.usage.input_tokens", input_tokens),
            ("gen_ai.usage.output_tokens", output_tokens),
            ("gen_ai.usage.reasoning.output_tokens", call.get("reasoning_tokens")),
            ("gen_ai.usage.cache_read.input_tokens", cache_read),
            ("gen_ai.usage.cache_creation.input_tokens", cache_write),
            ("gen_ai.response.finish_reasons", [finish] if finish else None),
            ("gen_ai.response.time_to_first_chunk",
             float(ttfb) / 1000 if call.get("stream") and isinstance(ttfb, (int, float)) else None),
            ("openai.api.type", OPENAI_API_TYPE.get(api)),
            ("error.type", error_type),
            ("server.address", address), ("server.port", port),
            ("http.request.method", method), ("http.response.status_code", status),
            ("url.full", url), ("user_agent.original", call.get("client")),
            ("llmtap.call.id", cid), ("llmtap.api", api), ("llmtap.provider", call.get("provider")),
            ("llmtap.route", call.get("route")), ("llmtap.model_sent", call.get("model_sent")),
            ("llmtap.attempts", call.get("attempts")), ("llmtap.complete", call.get("complete")),
            ("llmtap.ttfb_ms", float(ttfb) if isinstance(ttfb, (int, float)) else None),
        ])
        if self.content == "full" and op is not None:
            self._content(span, call, api)
        self._status(span, error_type, call.get("error") or (f"HTTP {status}" if error_type == str(status) else None))
        out = [span]
        for a in sorted(attempts, key=lambda a: a.get("n") or 0):
            out.append(self._attempt(trace_id, span_id, cid, method, a))
        return out

    def _attempt(self, trace_id: bytes, parent: bytes, cid: str, method: str, a: Mapping[str, Any]) -> Any:
        pb = self._pb
        n = int(a.get("n") or 0)
        span = pb.Span(trace_id=trace_id, span_id=span_id_of(cid, n), parent_span_id=parent,
                       kind=pb.Span.SPAN_KIND_CLIENT, name=method or "HTTP",
                       start_time_unix_nano=_nanos(a.get("started_at")),
                       end_time_unix_nano=_end(a.get("started_at"), a.get("duration_ms")))
        status = a.get("status")
        error_type = self._error_type(status, a.get("error"), None)
        address, port = _server(a.get("url"))
        ttfb = a.get("ttfb_ms")
        # HTTP client attributes only: gen_ai.* here would count the call's model call once per
        # attempt in backends that bill generations (Langfuse).
        self._attrs(span, [
            ("http.request.method", method), ("url.full", a.get("url")),
            ("server.address", address), ("server.port", port),
            ("http.response.status_code", status), ("error.type", error_type),
            ("llmtap.attempt.n", n), ("llmtap.provider", a.get("provider")),
            ("llmtap.model_sent", a.get("model_sent")),
            ("llmtap.ttfb_ms", float(ttfb) if isinstance(ttfb, (int, float)) else None),
        ])
        self._status(span, error_type, a.get("error") or (f"HTTP {status}" if error_type == str(status) else None))
        return span

    @staticmethod
    def _error_type(status: Any, error: Any, complete: Any) -> str | None:
        if isinstance(status, int) and status >= 400:
            return str(status)  # the conventions' example: the status code as the error's class
        if error or complete is False:
            return "_OTHER"
        return None

    def _status(self, span: Any, error_type: str | None, message: Any) -> None:
        if error_type is not None:
            span.status.code = self._pb.Status.STATUS_CODE_ERROR
            if message:
                span.status.message = str(message)[:1024]

    # content
    def _content(self, span: Any, call: Mapping[str, Any], api: str) -> None:
        system, messages, tools = self._input(call, api)
        output = self._output(call)
        truncated = False
        for key, value in (("gen_ai.system_instructions", system), ("gen_ai.input.messages", messages),
                           ("gen_ai.output.messages", output), ("gen_ai.tool.definitions", tools)):
            if not value:
                continue
            text, cut = capped_json(value, self.content_max, key in ("gen_ai.input.messages", "gen_ai.output.messages"))
            truncated = truncated or cut
            span.attributes.append(self._kv(key, text))
        if truncated:
            span.attributes.append(self._kv("llmtap.content.truncated", True))

    def _input(self, call: Mapping[str, Any], api: str) -> tuple[list[dict], list[dict], list[dict]]:
        body = call.get("request_body")
        if isinstance(body, str):
            from llmtap.dialects.registry import read_request

            try:  # the request as its own dialect reads it (shapes.Request)
                req = read_request(api, body, urlsplit(str(call.get("url") or "")).path)
            except Exception:  # a body no dialect reads: the prompt column below
                req = None
            if req is not None and req.messages:
                messages = [_message(m) for m in req.messages]
                in_history = any(m["role"] == "system" for m in messages)
                system = [] if in_history else [{"type": "text", "content": s} for s in req.system]
                tools = [{"type": t.kind, "name": t.name, **({"description": t.description} if t.description else {}),
                          **({"parameters": t.parameters} if t.parameters is not None else {})} for t in req.tools]
                return system, messages, tools
        # A body no dialect reads (cut by --max-body, not JSON): what this call added, as text
        # (llmtap's `prompt` column: the system prompt and the new messages), as one user turn.
        prompt = call.get("prompt")
        return [], ([{"role": "user", "parts": [{"type": "text", "content": prompt}]}] if prompt else []), []

    @staticmethod
    def _output(call: Mapping[str, Any]) -> list[dict]:
        parts: list[dict] = []
        if call.get("reasoning"):
            parts.append({"type": "reasoning", "content": call["reasoning"]})
        if call.get("content"):
            parts.append({"type": "text", "content": call["content"]})
        calls = call.get("tool_calls")
        if isinstance(calls, str):
            try:
                calls = json.loads(calls)
            except ValueError:
                calls = None
        for tc in calls if isinstance(calls, list) else []:
            if isinstance(tc, dict):
                parts.append({"type": "tool_call", "id": tc.get("id"), "name": tc.get("name"),
                              "arguments": _arguments(tc.get("arguments"))})
        if not parts:
            return []
        finish = call.get("finish_reason")
        return [{"role": "assistant", "parts": parts,
                 "finish_reason": _FINISH.get(finish, finish) if finish else ("error" if call.get("error") else "stop")}]


def _arguments(text: Any) -> Any:
    if isinstance(text, str):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _message(m: Any) -> dict:
    parts: list[dict] = []
    for p in m.parts:
        if p.kind in ("text", "reasoning"):
            parts.append({"type": p.kind, "content": p.text or ""})
        elif p.kind == "tool_call" and p.tool_call is not None:
            parts.append({"type": "tool_call", "id": p.tool_call.id, "name": p.tool_call.name,
                          "arguments": _arguments(p.tool_call.arguments)})
        elif p.kind == "tool_result" and p.tool_result is not None:
            parts.append({"type": "tool_call_response", "id": p.tool_result.call_id,
                          "response": p.tool_result.content})
        else:  # media: its kind and type, never its bytes
            parts.append({"type": p.kind, **({"mime_type": p.media_type} if p.media_type else {})})
    out: dict[str, Any] = {"role": m.role, "parts": parts}
    if m.name:
        out["name"] = m.name
    return out


def _mark(n: int) -> str:
    return f"…[llmtap: {n} more characters not exported]"


def capped_json(value: list[dict], cap: int, messages: bool) -> tuple[str, bool]:
    """`value` as JSON within `cap` characters, keeping the structure: long texts are cut with a
    mark saying how much was left out; when even that does not fit, the oldest messages give
    way to one part saying how many. (JSON, valid, either way.)"""
    text = json.dumps(value, ensure_ascii=False)
    if len(text) <= cap:
        return text, False
    items = [dict(v) for v in value]
    parts = [p for item in items for p in (item.get("parts", []) if messages else [item])]
    # Share the room among the texts, the long ones cut to what the short ones leave.
    texts = [p for p in parts if isinstance(p.get("content"), str)]
    budget = max(64, (cap - (len(text) - sum(len(p["content"]) for p in texts))) // max(1, len(texts)))
    for p in texts:
        c = p["content"]
        if len(c) > budget:
            p["content"] = c[:budget] + _mark(len(c) - budget)
    text = json.dumps(items, ensure_ascii=False)
    dropped = 0
    while len(text) > cap and len(items) > 1:
        items.pop(0)
        dropped += 1
        head = [{"role": "user", "parts": [{"type": "text", "content": f"[llmtap: {dropped} earlier "
                                            "messages not exported]"}]}] if messages else []
        text = json.dumps(head + items, ensure_ascii=False)
    if len(text) > cap:  # one part alone still too long (many tool arguments): plain, marked
        text = json.dumps([{"role": "user", "parts": [{"type": "text", "content": text[:cap // 2] + _mark(len(text) - cap // 2)}]}]
                          if messages else [{"type": "text", "content": text[:cap // 2] + _mark(len(text) - cap // 2)}],
                          ensure_ascii=False)
    return text, True


def resource_attributes(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The resource every span comes from: service.name ($OTEL_SERVICE_NAME, default llmtap) and
    $OTEL_RESOURCE_ATTRIBUTES (`key=value,...`, e.g. Phoenix's openinference.project.name)."""
    from llmtap import __version__

    env = os.environ if environ is None else environ
    attrs = {"service.name": "llmtap", "service.version": __version__, "telemetry.sdk.name": "llmtap"}
    for item in (env.get("OTEL_RESOURCE_ATTRIBUTES") or "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attrs[unquote(key.strip())] = unquote(value.strip())
    if env.get("OTEL_SERVICE_NAME"):
        attrs["service.name"] = env["OTEL_SERVICE_NAME"]
    return attrs


def encode(spans: list[Any], resource: Mapping[str, str] | None = None) -> bytes:
    """One ExportTraceServiceRequest for `spans`."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    from opentelemetry.proto.common.v1 import common_pb2

    from llmtap import __version__

    req = trace_service_pb2.ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    for k, v in (resource or resource_attributes({})).items():
        rs.resource.attributes.append(common_pb2.KeyValue(key=k, value=common_pb2.AnyValue(string_value=v)))
    ss = rs.scope_spans.add()
    ss.scope.name, ss.scope.version = "llmtap", __version__
    ss.spans.extend(spans)
    return req.SerializeToString()


# -- sending -----------------------------------------------------------------------------------------
class Rejected(Exception):
    """The collector refused the batch for good (4xx other than 429): sending again is no use."""


class Sender:
    """POSTs encoded batches to one traces endpoint, with retries on its own terms."""

    def __init__(self, endpoint: str, headers: Mapping[str, str] | None = None, timeout_s: float | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        import httpx

        env = os.environ if environ is None else environ
        self.endpoint = endpoint
        self.headers = {"content-type": "application/x-protobuf", "user-agent": "llmtap-otlp",
                        **(env_headers(env) if headers is None else dict(headers))}
        parts = urlsplit(endpoint)
        if parts.username and "authorization" not in self.headers:  # user:pass@ in the URL
            creds = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self.headers["authorization"] = "Basic " + base64.b64encode(creds).decode()
        self.gzip = (env.get("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION")
                     or env.get("OTEL_EXPORTER_OTLP_COMPRESSION") or "").lower() == "gzip"
        self.timeout_s = timeout_s if timeout_s is not None else _env_timeout(env)
        self.resource = resource_attributes(env)
        # trust_env=False: HTTPS_PROXY may well point at llmtap itself, and the collector is
        # addressed directly.
        self._client = httpx.Client(timeout=httpx.Timeout(self.timeout_s, connect=min(2.0, self.timeout_s)),
                                    trust_env=False)

    def post(self, body: bytes, timeout_s: float | None = None) -> tuple[bool, float | None, str]:
        """(sent, retry after seconds or None, why not). Raises Rejected for a final refusal."""
        import httpx

        headers = dict(self.headers)
        if self.gzip:
            body = gzip.compress(body, 6)
            headers["content-encoding"] = "gzip"
        try:
            r = self._client.post(self.endpoint, content=body, headers=headers,
                                  timeout=httpx.USE_CLIENT_DEFAULT if timeout_s is None else timeout_s)
        except httpx.HTTPError as exc:
            return False, None, f"{type(exc).__name__}: {exc}"
        if r.status_code < 300:
            self._partial(r.content)
            return True, None, ""
        why = f"HTTP {r.status_code}"
        if r.status_code in (429, 502, 503, 504):
            return False, _retry_after(r.headers.get("retry-after")), why
        hint = " (check OTEL_EXPORTER_OTLP_HEADERS: the collector wants credentials)" if r.status_code in (401, 403) else ""
        raise Rejected(f"{why}{hint}: {r.text[:200]!r}")

    def _partial(self, content: bytes) -> None:
        if not content:
            return
        try:
            from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

            resp = trace_service_pb2.ExportTraceServiceResponse.FromString(content)
        except Exception:
            return
        if resp.partial_success.rejected_spans:
            log.warning("llmtap otlp: the collector at %s rejected %d spans: %s", shown(self.endpoint),
                        resp.partial_success.rejected_spans, resp.partial_success.error_message[:200])

    def send(self, body: bytes, deadline: float | None = None, stop: threading.Event | None = None,
             failed: Callable[[str], None] | None = None) -> str | None:
        """Send with back-off until sent (None), or the reason it was given up (retries used up,
        the deadline, or `stop` set while waiting). `failed` hears of the first failed try."""
        delay = 0.5
        why = ""
        for attempt in range(RETRIES + 1):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0.05:
                return why or "no time left"
            ok, after, why = self.post(body, None if remaining is None else min(self.timeout_s, remaining))
            if ok:
                return None
            if attempt == 0 and failed is not None:
                failed(why)
            wait = min(BACKOFF_MAX_S, after if after is not None else delay)
            delay = min(BACKOFF_MAX_S, delay * 2)
            if deadline is not None and time.monotonic() + wait > deadline:
                return why
            if stop is not None:
                if stop.wait(wait):
                    return why
            else:
                time.sleep(wait)
        return why

    def close(self) -> None:
        self._client.close()


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.now(when.tzinfo)).total_seconds())


class OtlpService:
    """The recorder service: committed rows -> a bounded queue -> batches on a thread of its
    own. `committed()` only slims and enqueues; a full queue drops the call, counted, said
    once per outage."""

    def __init__(self, options: Mapping[str, Any], environ: Mapping[str, str] | None = None,
                 queue_calls: int = QUEUE_CALLS, queue_chars: int = QUEUE_CHARS) -> None:
        self.content = str(options.get("content") or "none")
        self.builder = SpanBuilder(self.content, int(options.get("content_max") or DEFAULT_CONTENT_MAX))
        self.sender = Sender(endpoint_of(options, environ), environ=environ)
        self.queue_calls, self.queue_chars = queue_calls, queue_chars
        self._queue: collections.deque[tuple[dict, list[dict], int]] = collections.deque()
        self._chars = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.sent = 0  # calls exported
        self.dropped = 0  # calls not exported: queue full, batches given up, left at close
        self._said_drop = False
        self._failing: str | None = None  # why the collector is not taking spans, while it is not
        self._in_flight = 0  # calls of the batch being sent
        self._thread = threading.Thread(target=self._run, name="llmtap-otlp", daemon=True)
        self._thread.start()

    def committed(self, calls: list[dict[str, Any]], attempts: list[dict[str, Any]]) -> None:
        by_call: dict[str, list[dict]] = {}
        for a in attempts:
            by_call.setdefault(a["call_id"], []).append(dict(a))
        dropped = 0
        with self._lock:
            for row in calls:
                item = slim(row, self.content)
                w = weight(item)
                if len(self._queue) >= self.queue_calls or self._chars + w > self.queue_chars:
                    dropped += 1
                    continue
                self._queue.append((item, by_call.get(row["id"], []), w))
                self._chars += w
        if dropped:
            self._dropped(dropped, "the queue of spans waiting for the collector is full")
        self._wake.set()

    def _dropped(self, n: int, why: str) -> None:
        self.dropped += n
        if not self._said_drop:
            self._said_drop = True
            log.warning("llmtap otlp: %s; calls are dropped from the traces (counted; recording goes on). "
                        "`llmtap export otlp --since ...` sends them once the collector at %s takes them.",
                        why, shown(self.sender.endpoint))

    def _take(self, n: int) -> list[tuple[dict, list[dict], int]]:
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
            self._chars -= sum(w for _, _, w in batch)
        return batch

    def _encode(self, batch: list[tuple[dict, list[dict], int]]) -> bytes:
        spans: list[Any] = []
        for call, attempts, _ in batch:
            try:
                spans.extend(self.builder.spans(call, attempts))
            except Exception:  # one odd row costs its own span, never the batch
                log.exception("llmtap otlp: cannot make a span of call %s", call.get("id"))
        return encode(spans, self.sender.resource)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if len(self._queue) < BATCH_CALLS:
                # Let the writer's commits (every 250 ms) gather into one request: fewer, larger
                # POSTs cost the recorder's process, which shares the CPUs with the proxy, less.
                self._stop.wait(GATHER_S)
            while not self._stop.is_set():
                batch = self._take(BATCH_CALLS)
                if not batch:
                    break
                self._ship(batch, None)

    def _failed(self, why: str) -> None:
        if self._failing is None:
            self._failing = why
            log.warning("llmtap otlp: the collector at %s does not take spans (%s); tried again with back-off, "
                        "recording goes on", shown(self.sender.endpoint), why)

    def _ship(self, batch: list[tuple[dict, list[dict], int]], deadline: float | None) -> None:
        self._in_flight = len(batch)
        try:
            why = self.sender.send(self._encode(batch), deadline, self._stop if deadline is None else None,
                                   self._failed)
        except Rejected as exc:
            why = str(exc)
        except Exception as exc:  # never let the thread die: the next batch may go through
            log.exception("llmtap otlp: sending a batch failed")
            why = str(exc)
        finally:
            self._in_flight = 0
        if why is None:
            self.sent += len(batch)
            if self._failing is not None:
                log.warning("llmtap otlp: the collector at %s takes spans again (%d calls dropped so far)",
                            shown(self.sender.endpoint), self.dropped)
                self._failing, self._said_drop = None, False
            return
        self._failed(why)
        self._dropped(len(batch), f"the collector at {shown(self.sender.endpoint)} did not take a batch ({why})")

    def close(self) -> None:
        """Send what is queued for up to CLOSE_FLUSH_S, count the rest as dropped, and say so."""
        self._stop.set()
        self._wake.set()
        self._thread.join(CLOSE_FLUSH_S)
        deadline = time.monotonic() + CLOSE_FLUSH_S
        while time.monotonic() < deadline and not self._thread.is_alive():
            batch = self._take(BATCH_CALLS)
            if not batch:
                break
            if self._failing is not None:  # no collector: do not spend the stop on it
                self._dropped(len(batch), "the proxy stopped")
                continue
            self._ship(batch, deadline)
        # A batch still on its way when the stop is over (a collector slower than the flush)
        # is as good as lost: the process ends.
        left = len(self._take(len(self._queue))) + (self._in_flight if self._thread.is_alive() else 0)
        if left:
            self._dropped(left, "the proxy stopped before they were sent")
        if self.dropped:
            log.warning("llmtap otlp: %d calls were not exported to %s (%d were); `llmtap export otlp --since ...` "
                        "sends them again", self.dropped, shown(self.sender.endpoint), self.sent)
        self.sender.close()


def backfill(rows: Iterable[tuple[dict, list[dict]]], options: Mapping[str, Any],
             progress: Callable[[int], None] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """`llmtap export otlp`: send `rows` (full rows and their attempts) in batches; returns the
    calls sent. Raises OtlpError when the collector does not take a batch."""
    content = str(options.get("content") or "none")
    builder = SpanBuilder(content, int(options.get("content_max") or DEFAULT_CONTENT_MAX))
    sender = Sender(endpoint_of(options, environ), environ=environ)
    sent = 0
    batch: list[Any] = []
    n = 0

    def flush() -> None:
        nonlocal batch, sent
        if not batch:
            return
        try:
            why = sender.send(encode(batch, sender.resource))
        except Rejected as exc:
            why = str(exc)
        if why is not None:
            raise OtlpError(f"the collector at {shown(sender.endpoint)} did not take the spans ({why}); "
                            f"{sent} calls were sent before. Sending again is safe: the spans keep their ids")
        sent += n
        batch = []

    try:
        for call, attempts in rows:
            batch.extend(builder.spans(slim(call, content), attempts))
            n += 1
            if n % BATCH_CALLS == 0:
                flush()
                n = 0
                if progress:
                    progress(sent)
        flush()
        if progress:
            progress(sent)
    finally:
        sender.close()
    return sent
