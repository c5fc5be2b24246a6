"""What a dialect is (`Dialect`: one wire format, request side and response side), and the
pieces every format's response reader shares: the state an answer accumulates into, text
pieces joined lazily, and one shape for every provider's error.

A dialect module defines a `Dialect` subclass (and a `ResponseReader` subclass for its
answers) and lists its instances in a module-level `DIALECTS` tuple; registry.py finds them
there. Nothing here raises on bad input: a body that is not what its format says is noted.
"""

from __future__ import annotations

import json
from dataclasses import fields
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, overload

from llmtap.dialects.shapes import Request, Response, ResponseError, ToolCall, Usage

# A garbage stream could otherwise produce one note per line.
MAX_NOTES = 20
# Error bodies that are not JSON are kept as their text, up to this many characters.
MAX_ERROR_TEXT = 2000


# --- small helpers every dialect uses ---------------------------------------------------------


def as_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


@overload
def string(v: Any) -> str | None: ...
@overload
def string(v: Any, default: str) -> str: ...
def string(v: Any, default: str | None = None) -> str | None:
    """`v` when it is a string, else `default`: a body's values are not trusted to be typed."""
    return v if isinstance(v, str) else default


def type_of(obj: dict) -> str | None:
    """`obj["type"]`, None when absent; "?" when it is not a string, so that a list or object
    there (which would raise in a lookup) reads as a kind no format has, not as untyped."""
    typ = obj.get("type")
    return typ if typ is None or isinstance(typ, str) else "?"


def dig(obj: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return obj


def sub(obj: dict, key: str) -> dict:
    """obj[key] when it is an object, else {}: providers' JSON is not trusted to be well-formed."""
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def dumps(obj: Any) -> str:
    # Compact, like the models' own argument strings.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def add_up(*values: int | None) -> int | None:
    """The sum of the counts the provider gave; None when it gave none of them."""
    given = [v for v in values if v is not None]
    return sum(given) if given else None


def decimal(v: Any) -> Decimal | None:
    """A provider-stated amount (a JSON number or numeric string) as a Decimal, exactly as written."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return None
    try:
        d = Decimal(str(v))
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def text_of(content: Any) -> str:
    """The text parts of a tool result's or a system prompt's content, joined; anything that is
    not text as its compact JSON."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p if isinstance(p, str) else p.get("text") for p in content if isinstance(p, (str, dict))]
        if texts and all(isinstance(t, str) for t in texts):
            return "\n".join(t for t in texts if isinstance(t, str))
    if isinstance(content, dict) and isinstance(content.get("text"), str):
        return content["text"]
    try:
        return dumps(content)
    except (TypeError, ValueError):
        return str(content)


# --- the response side --------------------------------------------------------------------------


class Text:
    """Appended pieces, joined lazily; joining collapses the list so repeated reads stay cheap."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[str] = []

    def add(self, piece: Any) -> None:
        if isinstance(piece, str) and piece:
            self._parts.append(piece)

    def set(self, text: str) -> None:
        self._parts = [text] if text else []

    def value(self) -> str:
        parts = self._parts
        n = len(parts)
        if n > 1:
            # Replace only the pieces joined: a live view may read while another thread feeds.
            parts[:n] = ["".join(parts[:n])]
        return parts[0] if parts else ""


class JsonText(Text):
    """Arguments assembled as an object (Gemini's `partialArgs`), written out as JSON when read:
    writing them out on every piece would cost the square of their length."""

    __slots__ = ("obj", "_json")

    def __init__(self) -> None:
        super().__init__()
        self.obj: Any = {}
        self._json = "{}"

    def put(self, obj: Any) -> None:
        self.obj, self._json = obj, ""

    def touch(self) -> None:
        self._json = ""

    def value(self) -> str:
        if not self._json:
            try:
                self._json = dumps(self.obj)
            except RuntimeError:  # a live view read while another thread added a key
                return "{}"
        return self._json


class State:
    """Everything an answer said so far; a dialect's reader writes into it."""

    def __init__(self) -> None:
        self.reasoning = Text()
        # Responses API summary parts, keyed by (item_id, part); joined with blank lines.
        self.reasoning_groups: dict[tuple, Text] = {}
        self.content = Text()
        self.tools: dict[Any, dict] = {}
        self.model: str | None = None
        self.id: str | None = None
        self.finish_reason: str | None = None
        # Normalised as shapes.Usage says (input includes cache reads and writes, output
        # includes reasoning); `usage_raw` is the provider's own final usage object.
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.reasoning_tokens: int | None = None
        self.total_tokens: int | None = None
        self.cache_read_tokens: int | None = None
        self.cache_write_tokens: int | None = None
        self.cache_write_1h_tokens: int | None = None
        self.cost_usd: Decimal | None = None
        self.usage_raw: dict | None = None
        self.error: dict | None = None
        self.complete: bool | None = None
        self.redacted = 0
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text)
        elif len(self.notes) == MAX_NOTES:
            self.notes.append("further notes omitted")

    def tool(self, key: Any) -> dict:
        t = self.tools.get(key)
        if t is None:
            t = self.tools[key] = {"id": None, "name": None, "args": Text()}
        return t

    def set_model(self, m: Any) -> None:
        if isinstance(m, str) and m:
            self.model = m

    def set_id(self, i: Any) -> None:
        if isinstance(i, str) and i:
            self.id = i

    def fail(self, err: dict) -> None:
        self.error = err
        self.complete = False

    def response(self, api: str, stream: bool | None) -> Response:
        reasoning = self.reasoning.value()
        if self.reasoning_groups:
            items = list(self.reasoning_groups.items())
            # Keys are (item, summary index) or (item, ("text", content index)). OpenRouter and
            # DeepSeek send an item's raw reasoning and a summary of it: the raw text counts, once.
            raw = {k[0] for k, g in items if type(k[1]) is tuple and g.value()}
            groups = [g.value() for k, g in items if type(k[1]) is tuple or k[0] not in raw]
            reasoning = "\n\n".join([g for g in ([reasoning] + groups) if g])
        tools = tuple(ToolCall(t["id"], t["name"], t["args"].value()) for t in list(self.tools.values()))
        error = None
        if self.error:
            error = ResponseError(**{f.name: self.error.get(f.name) for f in fields(ResponseError)})
        usage = Usage(
            input_tokens=self.input_tokens, output_tokens=self.output_tokens,
            reasoning_tokens=self.reasoning_tokens, cache_read_tokens=self.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens, total_tokens=self.total_tokens,
            cost_usd=self.cost_usd, raw=dict(self.usage_raw) if self.usage_raw is not None else None,
            cache_write_1h_tokens=self.cache_write_1h_tokens,
        )
        return Response(
            api=api, stream=stream, complete=self.complete, model=self.model, id=self.id,
            reasoning=reasoning or None, redacted_reasoning_blocks=self.redacted,
            content=self.content.value() or None, tool_calls=tools, finish_reason=self.finish_reason,
            usage=usage, error=error, notes=tuple(self.notes),
        )


def norm_error(obj: Any, status: int | None) -> dict:
    """One shape for every provider's error: OpenAI `{error:{...}}`, Anthropic `{type:error,
    error:{...}}`, Gemini `{error:{code,status,message}}`, Ollama `{error:"text"}`, an event.
    Its keys are shapes.ResponseError's fields."""
    out: dict[str, Any] = {
        "status": status, "type": None, "code": None, "message": None, "request_id": None, "retry_after_seconds": None
    }
    if isinstance(obj, list) and obj:  # Gemini sometimes wraps the error in an array
        obj = obj[0]
    if not isinstance(obj, dict):
        out["message"] = str(obj)[:MAX_ERROR_TEXT]
        return out
    inner = obj.get("error", obj)
    if isinstance(inner, str):
        inner = {"message": inner}
    if not isinstance(inner, dict):
        inner = {"message": str(inner)}
    typ = inner.get("type")
    if not isinstance(typ, str) or typ == "error":
        typ = inner.get("status") if isinstance(inner.get("status"), str) else None
    out["type"] = typ
    out["code"] = inner.get("code")
    msg = inner.get("message")
    out["message"] = msg if isinstance(msg, str) else (None if msg is None else str(msg))
    rid = obj.get("request_id") or inner.get("request_id")
    out["request_id"] = rid if isinstance(rid, str) else None
    return out


def merge_error(first: dict | None, second: dict | None) -> dict:
    """`first`, with the fields it lacks taken from `second`."""
    if not second:
        return dict(first or {})
    if not first:
        return dict(second)
    return {k: (first.get(k) if first.get(k) is not None else second.get(k)) for k in {**second, **first}}


class ResponseReader:
    """Turns parsed JSON objects (one per SSE event / NDJSON line / whole body) into state.
    framing.BodyReader does the framing and decoding and calls these."""

    # Whether the format has an end-of-stream marker, so a stream without one was cut.
    has_terminator = True
    # The format streams NDJSON whatever its content-type says (Ollama).
    sniff_ndjson: ClassVar[bool] = False
    # A reader of a known format (an empty answer body is then worth a note).
    known: ClassVar[bool] = True

    def __init__(self, st: State) -> None:
        self.st = st

    @classmethod
    def claims(cls, name: str | None, obj: dict) -> bool:
        """Whether an event of a call no path classified looks like this format's (the first
        reader to claim it reads the whole answer)."""
        return False

    def event(self, name: str | None, obj: Any) -> None:
        raise NotImplementedError

    def done(self) -> None:
        """`data: [DONE]`."""
        self.st.complete = True if self.st.error is None else False

    def whole(self, obj: Any) -> None:
        """A complete non-streamed body that parsed as JSON with a 2xx status."""
        if isinstance(obj, dict) and ("error" in obj and obj.get("error") or obj.get("type") == "error"):
            self.st.fail(norm_error(obj, None))
            return
        self.event(None, obj)
        if self.st.error is None:
            self.st.complete = True

    def finalize(self) -> None:
        """The body ended (called once, before the final state is read)."""


# --- the request side ---------------------------------------------------------------------------


class Dialect:
    """One wire format: how its requests are recognised and read, where its model name is, how
    a key is sent, the error llmtap answers in it, and which reader reads its answers."""

    name: ClassVar[str] = ""  # the `calls.api` value: "openai.chat", ...
    # rules.yaml's `api` of a provider speaking it: openai | anthropic | ollama | gemini. A family
    # shares its error shape and how a key is sent; its first dialect in the registry speaks for it.
    family: ClassVar[str] = ""
    # Headers that may carry a client's credentials in this format.
    credential_headers: ClassVar[frozenset[str]] = frozenset({"authorization"})
    # The format names the model in the URL path, not the body (Gemini).
    model_in_path: ClassVar[bool] = False
    # What a request that does not say `stream` gets (Ollama streams unless told not to).
    stream_default: ClassVar[bool | None] = None
    reader: ClassVar[type[ResponseReader]] = ResponseReader

    def matches(self, method: str, path: str) -> bool:
        """Whether a request is in this format, from its method (upper case) and URL path
        (no query, no trailing slash, any gateway or base prefix)."""
        return False

    def claims_body(self, doc: dict) -> bool:
        """Whether a request body no path classified looks like this format's (for records of
        `other` calls: the UI still shows them as a conversation)."""
        return False

    # -- what routing needs, on the proxy's event loop: cheap -------------------------------------
    def model_from_path(self, path: str) -> str | None:
        return None

    def stream_from_path(self, path: str) -> bool | None:
        return None

    def peek(self, content_type: str, body: bytes, path: str, notes: list[str]) -> tuple[str | None, bool | None, dict | None]:
        """(model, stream, the parsed JSON object) of a request, with one JSON parse; `notes`
        say what could not be read. Never raises."""
        model = self.model_from_path(path) if self.model_in_path else None
        stream = self.stream_from_path(path) if self.model_in_path else None
        doc: dict | None = None
        if body and ("json" in content_type or body[:1] in (b"{", b"[")):
            try:
                parsed = json.loads(body)
            except UnicodeDecodeError:
                notes.append("request body is not UTF-8; passed through unchanged")
            except (ValueError, RecursionError) as exc:
                notes.append(f"request body is not valid JSON ({exc}); passed through unchanged")
            else:
                if isinstance(parsed, dict):
                    doc = parsed
                    if isinstance(parsed.get("model"), str):
                        model = parsed["model"]
                    if isinstance(parsed.get("stream"), bool):
                        stream = parsed["stream"]
                    elif self.stream_default is not None:
                        stream = self.stream_default
        elif body and self.reader.known and not self.model_in_path:
            notes.append(f"request body is not JSON (content-type {content_type or 'none'}); passed through unchanged")
        return model, stream, doc

    def rewrite_model(self, doc: dict | None, path: str, model: str) -> tuple[dict | None, str]:
        """(the body to send, the path to send it to) for another model. A body returned as
        None (or `doc` itself) is sent as the client sent it."""
        return (dict(doc, model=model) if doc is not None else None), path

    def auth_header(self, key: str) -> tuple[bytes, bytes]:
        """The header a provider of this format reads an API key from."""
        return (b"authorization", b"Bearer " + key.encode())

    def error_body(self, status: int, message: str, code: str, attempts: list[dict] | None = None) -> bytes:
        """llmtap's own error, in the shape this format's SDKs read; `attempts` (the upstream
        tries that failed) ride along where the shape has room for them."""
        raise NotImplementedError

    # -- reading a request whole: off the hot path ------------------------------------------------
    def read_request(self, body: bytes | str | dict | None, path: str = "") -> Request:
        """The request as the normalised shape. Never raises: what could not be read is noted."""
        doc, notes = load_body(body)
        model = self.model_from_path(path) if self.model_in_path else None
        stream = self.stream_from_path(path) if self.model_in_path else None
        if doc is None:
            return Request(self.name, model=model, stream=stream, notes=tuple(notes))
        if not isinstance(doc, dict):
            return Request(self.name, model=model, stream=stream, notes=(*notes, "request body is not a JSON object"))
        try:
            return self.parse(doc, path)
        except Exception as exc:  # a shape nobody expected: what the body says at its top
            m = doc.get("model")
            s = doc.get("stream")
            return Request(self.name, model=m if isinstance(m, str) else model,
                           stream=s if isinstance(s, bool) else (stream if stream is not None else self.stream_default),
                           notes=(f"request body could not be read as {self.name}: {type(exc).__name__}: {exc}",))

    def parse(self, doc: dict, path: str) -> Request:
        """`doc` (a JSON object) as a Request; may raise on shapes it did not expect."""
        raise NotImplementedError

    def model_and_stream(self, doc: dict, path: str) -> tuple[str | None, bool | None]:
        model = self.model_from_path(path) if self.model_in_path else None
        stream = self.stream_from_path(path) if self.model_in_path else None
        if isinstance(doc.get("model"), str):
            model = doc["model"]
        if isinstance(doc.get("stream"), bool):
            stream = doc["stream"]
        elif stream is None:
            stream = self.stream_default
        return model, stream


def load_body(body: bytes | str | dict | None) -> tuple[Any, list[str]]:
    """(the parsed body or None, notes): a request body as JSON."""
    if not isinstance(body, (bytes, bytearray, memoryview, str)):
        return body, []
    if not body:
        return None, []
    try:
        return json.loads(bytes(body) if not isinstance(body, str) else body), []
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None, ["request body is not JSON"]


def params_of(doc: dict, read: frozenset[str]) -> dict[str, Any]:
    """The body's other top-level keys, as sent: temperature, max_tokens, ..."""
    return {k: v for k, v in doc.items() if k not in read}


def ids_of(doc: dict, names: tuple[str, ...]) -> dict[str, str]:
    """The identifiers the body carries under these names (dotted for nested: metadata.user_id)."""
    out: dict[str, str] = {}
    for name in names:
        value = dig(doc, *name.split("."))
        if isinstance(value, dict) and isinstance(value.get("id"), str):  # Responses' conversation: {id}
            value = value["id"]
        if isinstance(value, str) and value:
            out[name] = value
    return out
