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

Spans are written in OTLP's protobuf wire format here (see "the OTLP wire format" below for why
not as opentelemetry-proto messages, which the tests decode them with) and POSTed with httpx,
rather than through the SDK's span exporter: that one takes only SDK `ReadableSpan`s, whose ids
come from the SDK's random id generator, and retries inside `export()` with sleeps of its own
(up to a minute) that a bounded queue in front of it could not see. Here a batch is one
request, retried on this module's terms (back-off, `Retry-After` on 429/503, a short timeout),
and an unreachable collector costs counted drops and one warning, never the writer.
"""

from __future__ import annotations

import base64
import collections
import functools
import gzip
import hashlib
import json
import logging
import os
import re
import struct
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
_NAMES_TRACEPARENT = re.compile(r'"traceparent"', re.IGNORECASE)
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
_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
# Crockford's base32 (ULIDs) to RFC 4648's, which base64.b32decode reads in C.
_TO_RFC4648 = str.maketrans("0123456789ABCDEFGHJKMNPQRSTVWXYZ", "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


def trace_id_of(call_id: str) -> bytes:
    """The ULID's 128 bits; a call id that is not one (none llmtap makes) is hashed instead."""
    text = call_id.upper()
    if _ULID.fullmatch(text):
        # 26 characters are 130 bits: six zero characters in front make 160, whole bytes.
        value = base64.b32decode("AAAAAA" + text.translate(_TO_RFC4648))[-16:]
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


@functools.lru_cache(maxsize=512)  # a few upstreams, the same URL call after call
def _server(url: str | None) -> tuple[str | None, int | None]:
    if not url:
        return None, None
    try:
        p = urlsplit(url)
        port = p.port or {"https": 443, "http": 80}.get(p.scheme)
    except ValueError:
        return None, None
    return p.hostname, port


@functools.lru_cache(maxsize=512)
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
    headers = row.get("request_headers")
    # Most calls carry no trace context: parse their headers only when one is named.
    out["_parent"] = parent_of(headers) if not isinstance(headers, str) or _NAMES_TRACEPARENT.search(headers) else None
    if content == "full":
        for k in _CONTENT_COLUMNS:
            out[k] = row.get(k)
    return out


def weight(item: Mapping[str, Any]) -> int:
    return 512 + sum(len(v) for k in _CONTENT_COLUMNS if isinstance(v := item.get(k), str))


# -- the OTLP wire format -----------------------------------------------------------------------------
# Spans are written straight to protobuf's wire format rather than built as opentelemetry-proto
# messages: setting a field of a message from Python costs ~1-2 us, ~35 attributes a span, and
# measured in the recorder's process that was ~140 us a call, most of what the export cost (the
# recorder's own work for a call is ~190 us). Here an attribute whose value repeats call after
# call (model, provider, host, status) is encoded once and reused. The messages are OTLP's
# stable 1.x protobuf (opentelemetry/proto/trace/v1/trace.proto, common.proto); the tests decode
# every request llmtap sends with opentelemetry-proto itself.
_U64 = (1 << 64) - 1


def _varint(n: int) -> bytes:
    n &= _U64  # a negative int64 goes as its two's complement, as protobuf does
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: int, payload: bytes) -> bytes:
    """A length-delimited field; `tag` is field << 3 | 2, below 128."""
    return bytes((tag,)) + _varint(len(payload)) + payload


def _any(value: Any) -> bytes:
    """An AnyValue: string 1, bool 2, int 3, double 4, array 5 (of AnyValue strings)."""
    t = type(value)
    if t is str:
        return _ld(0x0A, value.encode("utf-8", "replace"))
    if t is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if t is int:
        return b"\x18" + _varint(value)
    if t is float:
        return b"\x21" + struct.pack("<d", value)
    if t is list or t is tuple:
        return _ld(0x2A, b"".join(_ld(0x0A, _any(str(v))) for v in value))
    return _ld(0x0A, str(value).encode("utf-8", "replace"))


def _kv(key: str, value: Any) -> bytes:
    """A KeyValue (key 1, value 2)."""
    return _ld(0x0A, key.encode()) + _ld(0x12, _any(value))


_CALL_KEYS = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "gen_ai.response.model",
              "gen_ai.request.stream", "gen_ai.response.finish_reasons", "openai.api.type", "error.type",
              "server.address", "server.port", "http.request.method", "http.response.status_code", "url.full",
              "user_agent.original", "llmtap.api", "llmtap.provider", "llmtap.route", "llmtap.model_sent",
              "llmtap.attempts", "llmtap.complete")
_ATTEMPT_KEYS = ("http.request.method", "url.full", "server.address", "server.port", "http.response.status_code",
                 "error.type", "llmtap.attempt.n", "llmtap.provider", "llmtap.model_sent")
_BLOCKS: dict[tuple, bytes] = {}


def _attr(key: str, value: Any) -> bytes:
    """A span's attribute field (9)."""
    return _ld(0x4A, _kv(key, value))


def _block(keys: tuple[str, ...], values: tuple) -> bytes:
    """The attribute fields of `keys` (values None or "" left out), from a cache: these values
    repeat call after call."""
    ck = (keys, values)
    got = _BLOCKS.get(ck)
    if got is None:
        if len(_BLOCKS) > 4096:  # many distinct models or clients: start over rather than grow
            _BLOCKS.clear()
        got = _BLOCKS[ck] = b"".join(_attr(k, v) for k, v in zip(keys, values) if v is not None and v != "")
    return got


def _span(trace_id: bytes, span_id: bytes, parent: bytes, trace_state: str, name: str, start: int, end: int,
          attrs: list[bytes], error: str | None) -> bytes:
    """A Span: trace_id 1, span_id 2, trace_state 3, parent_span_id 4, name 5, kind 6 (CLIENT),
    start 7 and end 8 (fixed64 ns), attributes 9, status 15 (message 2, code 3: ERROR)."""
    parts = [_ld(0x0A, trace_id), _ld(0x12, span_id)]
    if trace_state:
        parts.append(_ld(0x1A, trace_state.encode()))
    if parent:
        parts.append(_ld(0x22, parent))
    parts += [_ld(0x2A, name.encode("utf-8", "replace")), b"\x30\x03",
              b"\x39" + struct.pack("<Q", start & _U64), b"\x41" + struct.pack("<Q", end & _U64)]
    parts += attrs
    if error is not None:
        parts.append(_ld(0x7A, (_ld(0x12, error.encode("utf-8", "replace")) if error else b"") + b"\x18\x02"))
    return b"".join(parts)


class SpanBuilder:
    """Rows (slimmed) -> OTLP spans (each a Span message's bytes). `content` "none" or "full";
    `content_max` caps each content attribute, in characters."""

    def __init__(self, content: str = "none", content_max: int = DEFAULT_CONTENT_MAX) -> None:
        self.content = content
        self.content_max = max(256, content_max)

    @staticmethod
    def _attrs(attrs: Iterable[tuple[str, Any]]) -> list[bytes]:
        return [_attr(k, v) for k, v in attrs if v is not None and v != ""]

    def spans(self, call: Mapping[str, Any], attempts: Sequence[Mapping[str, Any]]) -> list[bytes]:
        cid = str(call["id"])
        parent = call.get("_parent")
        trace_id = parent[0] if parent else trace_id_of(cid)
        span_id = span_id_of(cid)
        api, url, method = str(call.get("api") or "other"), str(call.get("url") or ""), str(call.get("method") or "")
        last = max(attempts, key=lambda a: a.get("n") or 0) if attempts else None
        upstream = last.get("url") if last else None
        op = _operation(api, url)
        model = call.get("model_requested") or call.get("model_sent")
        # The conventions' inference span is CLIENT: llmtap makes the call to the model on the
        # client's behalf. A call that is no model call (a model list) is a plain HTTP span.
        name = f"{op} {model}" if op and model else (op or f"{method} {urlsplit(url).path or '/'}".strip())
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
        # What repeats call after call (model, provider, host, status, client) is one block,
        # encoded once per distinct combination; what is the call's own is encoded each time.
        attrs = [_block(_CALL_KEYS, (
            op, provider_name(api, call.get("provider"), upstream) if op else None, model if op else None,
            call.get("model_reported"), True if call.get("stream") else None, (finish,) if finish else None,
            OPENAI_API_TYPE.get(api), error_type, address, port, method, status, url, call.get("client"), api,
            call.get("provider"), call.get("route"), call.get("model_sent"), call.get("attempts"),
            call.get("complete")))]
        attrs += self._attrs([
            ("gen_ai.response.id", response_id),
            ("gen_ai.conversation.id", call.get("session_id")),
            # The general registry's name for it, which Langfuse and Phoenix group sessions by.
            ("session.id", call.get("session_id")),
            ("gen_ai.usage.input_tokens", input_tokens),
            ("gen_ai.usage.output_tokens", output_tokens),
            ("gen_ai.usage.reasoning.output_tokens", call.get("reasoning_tokens")),
            ("gen_ai.usage.cache_read.input_tokens", cache_read),
            ("gen_ai.usage.cache_creation.input_tokens", cache_write),
            ("gen_ai.response.time_to_first_chunk",
             float(ttfb) / 1000 if call.get("stream") and isinstance(ttfb, (int, float)) else None),
            ("llmtap.call.id", cid),
            ("llmtap.ttfb_ms", float(ttfb) if isinstance(ttfb, (int, float)) else None),
        ])
        if self.content == "full" and op is not None:
            attrs += self._content(call, api)
        out = [_span(trace_id, span_id, parent[1] if parent else b"", parent[2] if parent else "", name,
                     _nanos(call.get("started_at")), _end(call.get("started_at"), call.get("duration_ms")), attrs,
                     self._status(error_type, call.get("error"), status))]
        for a in sorted(attempts, key=lambda a: a.get("n") or 0):
            out.append(self._attempt(trace_id, span_id, cid, method, a))
        return out

    def _attempt(self, trace_id: bytes, parent: bytes, cid: str, method: str, a: Mapping[str, Any]) -> bytes:
        n = int(a.get("n") or 0)
        status = a.get("status")
        error_type = self._error_type(status, a.get("error"), None)
        address, port = _server(a.get("url"))
        ttfb = a.get("ttfb_ms")
        # HTTP client attributes only: gen_ai.* here would count the call's model call once per
        # attempt in backends that bill generations (Langfuse).
        attrs = [_block(_ATTEMPT_KEYS, (method, a.get("url"), address, port, status, error_type, n, a.get("provider"),
                                        a.get("model_sent")))]
        if isinstance(ttfb, (int, float)):
            attrs.append(_attr("llmtap.ttfb_ms", float(ttfb)))
        return _span(trace_id, span_id_of(cid, n), parent, "", method or "HTTP", _nanos(a.get("started_at")),
                     _end(a.get("started_at"), a.get("duration_ms")), attrs, self._status(error_type, a.get("error"), status))

    @staticmethod
    def _error_type(status: Any, error: Any, complete: Any) -> str | None:
        if isinstance(status, int) and status >= 400:
            return str(status)  # the conventions' example: the status code as the error's class
        if error or complete is False:
            return "_OTHER"
        return None

    @staticmethod
    def _status(error_type: str | None, error: Any, status: Any) -> str | None:
        """The span's status message when it ended in an error (then its code is ERROR), else None."""
        if error_type is None:
            return None
        return str(error)[:1024] if error else (f"HTTP {status}" if error_type == str(status) else "")

    # content
    def _content(self, call: Mapping[str, Any], api: str) -> list[bytes]:
        system, messages, tools = self._input(call, api)
        output = self._output(call)
        truncated = False
        out: list[bytes] = []
        for key, value in (("gen_ai.system_instructions", system), ("gen_ai.input.messages", messages),
                           ("gen_ai.output.messages", output), ("gen_ai.tool.definitions", tools)):
            if not value:
                continue
            text, cut = capped_json(value, self.content_max, key in ("gen_ai.input.messages", "gen_ai.output.messages"))
            truncated = truncated or cut
            out.append(_attr(key, text))
        if truncated:
            out.append(_attr("llmtap.content.truncated", True))
        return out

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


def encode(spans: list[bytes], resource: Mapping[str, str] | None = None) -> bytes:
    """One ExportTraceServiceRequest (resource_spans 1) of `spans`: ResourceSpans (resource 1,
    scope_spans 2), ScopeSpans (scope 1: name 1, version 2; spans 2)."""
    from llmtap import __version__

    res = b"".join(_ld(0x0A, _kv(k, v)) for k, v in (resource or resource_attributes({})).items())
    scope = _ld(0x0A, _ld(0x0A, b"llmtap") + _ld(0x12, __version__.encode())) + b"".join(_ld(0x12, sp) for sp in spans)
    return _ld(0x0A, _ld(0x0A, res) + _ld(0x12, scope))


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
            # Retry-After is the least wait (a "0" would make a hot loop of the retries).
            wait = min(BACKOFF_MAX_S, max(after or 0.0, delay))
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
        try:
            # A low priority for this thread alone (Linux: a thread's nice value is its own):
            # when the CPUs are busy, the proxy and the writer come first (~9:1 at nice 10), and
            # the spans wait in the bounded queue. Not 19: on a machine busy with other work
            # too, the export would then hardly run at all.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
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
