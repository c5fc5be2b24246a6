"""Reasoning, answer text, tool calls, usage and finish reason from LLM response bytes.

Pure and incremental: an `Extractor` is fed the body exactly as the network delivered it (any
split, compressed or not) and can report what it knows at any moment, so the same code serves
the live view of a call in progress and the record written when it ends. Only the standard
library is imported; the optional `brotli` and zstd decoders are imported lazily. However much a
body expands, no more of it than the limit is ever decoded (see `_Decoder`).

Every dialect's rules follow recorded wire transcripts (tests/fixtures/wire, each with the
values it must give): where each provider puts reasoning text, which token count means what,
and what ends a stream normally.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

from llmtap.recorder.record import (
    API_ANTHROPIC_MESSAGES,
    API_GEMINI_GENERATE,
    API_OLLAMA_CHAT,
    API_OPENAI_CHAT,
    API_OPENAI_RESPONSES,
    API_OTHER,
    DEFAULT_BODY_LIMIT,
    body_cut_note,
    size_text,
)
from llmtap.recorder.record import detect_api as _detect_api_from_path

# SSE bytes that may wait unread (see `Extractor.sse_pending`).
_SSE_BATCH = 64 * 1024
# A garbage stream could otherwise produce one note per line.
_MAX_NOTES = 20
# Error bodies that are not JSON are kept as their text, up to this many characters.
_MAX_ERROR_TEXT = 2000

Headers = dict[str, str] | list[tuple[str, str]] | None


def detect_api(method: str, path: str, body: bytes = b"") -> str:
    """The wire dialect of a request, decided from its method and URL path (any prefix).

    `body` is accepted so callers can pass what they have; the path alone decides, so that a
    request whose body is not JSON is still classified. Never raises.
    """
    try:
        return _detect_api_from_path(method or "", path or "")
    except Exception:
        return API_OTHER


@dataclass
class Extraction:
    """What one response said, as far as it could be understood."""

    stream: bool | None = None
    complete: bool | None = None
    reasoning: str | None = None  # None when the model produced none
    content: str | None = None
    tool_calls: list[dict] | None = None  # [{"id", "name", "arguments"}], arguments verbatim
    model: str | None = None  # what the upstream reports, not the alias asked for
    finish_reason: str | None = None  # the provider's own value, not normalised
    input_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    total_tokens: int | None = None
    # {status, type, code, message, request_id, retry_after_seconds}
    error: dict | None = None
    redacted_reasoning_blocks: int = 0
    notes: list[str] = field(default_factory=list)


class _Text:
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


class _JsonText(_Text):
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
                self._json = _dumps(self.obj)
            except RuntimeError:  # a live view read while another thread added a key
                return "{}"
        return self._json


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _dig(obj: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return obj


def _dumps(obj: Any) -> str:
    # Compact, like the models' own argument strings.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class _State:
    """Everything accumulated so far; dialect handlers write into it."""

    def __init__(self) -> None:
        self.reasoning = _Text()
        # Responses API summary parts, keyed by (item_id, part); joined with blank lines.
        self.reasoning_groups: dict[tuple, _Text] = {}
        self.content = _Text()
        self.tools: dict[Any, dict] = {}
        self.model: str | None = None
        self.finish_reason: str | None = None
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.reasoning_tokens: int | None = None
        self.total_tokens: int | None = None
        self.error: dict | None = None
        self.complete: bool | None = None
        self.redacted = 0
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        if len(self.notes) < _MAX_NOTES:
            self.notes.append(text)
        elif len(self.notes) == _MAX_NOTES:
            self.notes.append("further notes omitted")

    def tool(self, key: Any) -> dict:
        t = self.tools.get(key)
        if t is None:
            t = self.tools[key] = {"id": None, "name": None, "args": _Text()}
        return t

    def set_model(self, m: Any) -> None:
        if isinstance(m, str) and m:
            self.model = m

    def fail(self, err: dict) -> None:
        self.error = err
        self.complete = False

    def extraction(self, stream: bool | None) -> Extraction:
        reasoning = self.reasoning.value()
        if self.reasoning_groups:
            items = list(self.reasoning_groups.items())
            # Keys are (item, summary index) or (item, ("text", content index)). OpenRouter and
            # DeepSeek send an item's raw reasoning and a summary of it: the raw text counts, once.
            raw = {k[0] for k, g in items if type(k[1]) is tuple and g.value()}
            groups = [g.value() for k, g in items if type(k[1]) is tuple or k[0] not in raw]
            reasoning = "\n\n".join([g for g in ([reasoning] + groups) if g])
        tools = [
            {"id": t["id"], "name": t["name"], "arguments": t["args"].value()} for t in list(self.tools.values())
        ]
        return Extraction(
            stream=stream,
            complete=self.complete,
            reasoning=reasoning or None,
            content=self.content.value() or None,
            tool_calls=tools or None,
            model=self.model,
            finish_reason=self.finish_reason,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            reasoning_tokens=self.reasoning_tokens,
            total_tokens=self.total_tokens,
            error=dict(self.error) if self.error else None,
            redacted_reasoning_blocks=self.redacted,
            notes=list(self.notes),
        )


def _norm_error(obj: Any, status: int | None) -> dict:
    """One shape for every provider's error: OpenAI `{error:{...}}`, Anthropic `{type:error,
    error:{...}}`, Gemini `{error:{code,status,message}}`, Ollama `{error:"text"}`, an event."""
    out: dict[str, Any] = {
        "status": status, "type": None, "code": None, "message": None, "request_id": None, "retry_after_seconds": None
    }
    if isinstance(obj, list) and obj:  # Gemini sometimes wraps the error in an array
        obj = obj[0]
    if not isinstance(obj, dict):
        out["message"] = str(obj)[:_MAX_ERROR_TEXT]
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


def _sub(obj: dict, key: str) -> dict:
    """obj[key] when it is an object, else {}: providers' JSON is not trusted to be well-formed."""
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def _merge_error(first: dict | None, second: dict | None) -> dict:
    """`first`, with the fields it lacks taken from `second`."""
    if not second:
        return dict(first or {})
    if not first:
        return dict(second)
    return {k: (first.get(k) if first.get(k) is not None else second.get(k)) for k in {**second, **first}}


# --- dialects -------------------------------------------------------------------------------


class _Dialect:
    """Turns parsed JSON objects (one per SSE event / NDJSON line / whole body) into state."""

    # Whether the dialect has an end-of-stream marker, so a stream without one was cut.
    has_terminator = True

    def __init__(self, st: _State) -> None:
        self.st = st

    def event(self, name: str | None, obj: Any) -> None:
        raise NotImplementedError

    def done(self) -> None:
        """`data: [DONE]`."""
        self.st.complete = True if self.st.error is None else False

    def whole(self, obj: Any) -> None:
        """A complete non-streamed body that parsed as JSON with a 2xx status."""
        if isinstance(obj, dict) and ("error" in obj and obj.get("error") or obj.get("type") == "error"):
            self.st.fail(_norm_error(obj, None))
            return
        self.event(None, obj)
        if self.st.error is None:
            self.st.complete = True


# Keys of a choice and of its delta that `_OpenAIChat.event` may take a shortcut past: each is
# either read there the way `_event` / `_message` read it, or read by neither. A key the general
# walk starts to read must leave these sets or be handled in the shortcut too.
_PLAIN_CHOICE = frozenset(("index", "delta", "finish_reason", "logprobs", "native_finish_reason", "stop_reason"))
_PLAIN_DELTA = frozenset(("content", "role", "refusal", "reasoning", "reasoning_content"))


class _OpenAIChat(_Dialect):
    """Chat Completions and its many compatible servers (OpenRouter, DeepSeek, vLLM, ...)."""

    def event(self, name: str | None, obj: Any) -> None:
        # Nearly every event of a stream is one choice whose delta holds a piece of text: take
        # those without the general walk, which costs several times more per event.
        if type(obj) is dict:
            choices = obj.get("choices")
            if type(choices) is list and len(choices) == 1:
                choice = choices[0]
                if type(choice) is dict and choice.keys() <= _PLAIN_CHOICE:
                    delta = choice.get("delta")
                    if type(delta) is dict and delta.keys() <= _PLAIN_DELTA and choice.get("index", 0) in (0, None) \
                            and not obj.get("error") and type(obj.get("usage")) is not dict:
                        content = delta.get("content")
                        if content is None or type(content) is str:
                            st = self.st
                            st.set_model(obj.get("model"))
                            # Of the mirrored reasoning fields the first with text counts, as in `_message`.
                            reasoning = delta.get("reasoning")
                            if not (type(reasoning) is str and reasoning):
                                reasoning = delta.get("reasoning_content")
                            if reasoning:
                                st.reasoning.add(reasoning)
                            if content:
                                st.content.add(content)
                            if isinstance(choice.get("finish_reason"), str):
                                st.finish_reason = choice["finish_reason"]
                            return
        self._event(obj)

    def _event(self, obj: Any) -> None:
        st = self.st
        if not isinstance(obj, dict):
            return
        if obj.get("error"):
            # OpenRouter reports upstream failures in-band, next to a `finish_reason: error`.
            st.fail(_norm_error(obj, None))
        st.set_model(obj.get("model"))
        usage = obj.get("usage")
        if isinstance(usage, dict):
            # DeepSeek puts usage on the finish_reason chunk, OpenAI on a choice-less one.
            st.input_tokens = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
            st.output_tokens = _int(usage.get("completion_tokens", usage.get("output_tokens")))
            st.total_tokens = _int(usage.get("total_tokens"))
            st.reasoning_tokens = _int(_dig(usage, "completion_tokens_details", "reasoning_tokens"))
        for choice in obj.get("choices") or ():
            # n > 1 would interleave unrelated answers; record the first one only.
            if not isinstance(choice, dict) or choice.get("index", 0) not in (0, None):
                continue
            msg = choice.get("delta")
            if not isinstance(msg, dict):
                msg = choice.get("message")
            answered = isinstance(msg, dict) and self._message(msg, is_delta="delta" in choice)
            if not answered:
                # Legacy /completions. Some gateways mirror each token in both `text` and
                # `delta.content`: the one token is counted once.
                st.content.add(choice.get("text"))
            if isinstance(choice.get("finish_reason"), str):
                st.finish_reason = choice["finish_reason"]

    def _message(self, msg: dict, is_delta: bool) -> bool:
        """Reads one delta or message; True when it carried answer text."""
        st = self.st
        # Providers mirror one text in several fields (OpenRouter: reasoning + reasoning_details,
        # some vLLM builds: reasoning + reasoning_content); take the first that carries text.
        for key in ("reasoning", "reasoning_content"):
            text = msg.get(key)
            if isinstance(text, str) and text:
                st.reasoning.add(text)
                break
        else:
            for d in msg.get("reasoning_details") or ():
                if isinstance(d, dict):
                    st.reasoning.add(d.get("text") if d.get("type") != "reasoning.summary" else d.get("summary"))
        for d in msg.get("reasoning_details") or ():
            # Encrypted reasoning exists but cannot be read: count it like a redacted block.
            if isinstance(d, dict) and d.get("type") == "reasoning.encrypted":
                st.redacted += 1
        content = msg.get("content")
        answered = False
        if isinstance(content, list):  # some compatible servers send content parts
            for part in content:
                if not isinstance(part, dict):
                    continue
                ptype = part.get("type")
                if ptype in (None, "text", "output_text"):
                    text = part.get("text")
                    answered = answered or (isinstance(text, str) and bool(text))
                    st.content.add(text)
                elif ptype == "thinking":
                    # Mistral's thinking models: the reasoning is a part holding its own text parts.
                    inner = part.get("thinking")
                    if isinstance(inner, str):
                        st.reasoning.add(inner)
                    elif isinstance(inner, list):
                        for sub in inner:
                            if isinstance(sub, dict) and sub.get("type") in (None, "text"):
                                st.reasoning.add(sub.get("text"))
        else:
            answered = isinstance(content, str) and bool(content)
            st.content.add(content)
        for pos, tc in enumerate(msg.get("tool_calls") or ()):
            if not isinstance(tc, dict):
                continue
            idx = tc.get("index")
            if not isinstance(idx, int):
                idx = pos if not is_delta else self._unindexed(tc.get("id"))
            t = st.tool(("i", idx))
            if tc.get("id"):
                t["id"] = tc["id"]
            fn = _sub(tc, "function")
            if fn.get("name"):
                t["name"] = fn["name"]
            args = fn.get("arguments")
            if isinstance(args, str):
                t["args"].add(args)
            elif args is not None:
                t["args"].add(_dumps(args))
        return answered

    def _unindexed(self, call_id: Any) -> int:
        """Servers that omit `index`: a new id starts a call, a bare fragment continues the last."""
        for key, t in self.st.tools.items():
            if call_id and t["id"] == call_id:
                return key[1]
        last = len(self.st.tools) - 1
        return last + 1 if call_id or last < 0 else last


class _OpenAIResponses(_Dialect):
    """The Responses API: typed events, or one `response` object when not streamed."""

    def __init__(self, st: _State) -> None:
        super().__init__(st)
        self._content_keys: set[tuple] = set()
        # (id, type) of the item first streamed at each output index: the full items of
        # `response.completed` may carry other ids (OpenRouter) and must not count twice.
        self._at: dict[Any, tuple[Any, str]] = {}

    def event(self, name: str | None, obj: Any) -> None:
        st = self.st
        if not isinstance(obj, dict):
            return
        typ = obj.get("type") or name
        if typ == "response.reasoning_summary_text.delta":
            if type(oi := obj.get("output_index")) is int and oi not in self._at:
                self._at[oi] = (obj.get("item_id"), "reasoning")
            self._group(obj.get("item_id"), obj.get("summary_index")).add(obj.get("delta"))
        elif typ == "response.reasoning_text.delta":
            if type(oi := obj.get("output_index")) is int and oi not in self._at:
                self._at[oi] = (obj.get("item_id"), "reasoning")
            self._group(obj.get("item_id"), ("text", obj.get("content_index"))).add(obj.get("delta"))
        elif typ == "response.output_text.delta":
            if type(oi := obj.get("output_index")) is int and oi not in self._at:
                self._at[oi] = (obj.get("item_id"), "message")
            self._content_keys.add((obj.get("item_id"), obj.get("content_index")))
            st.content.add(obj.get("delta"))
        elif typ == "response.function_call_arguments.delta":
            if type(oi := obj.get("output_index")) is int and oi not in self._at:
                self._at[oi] = (obj.get("item_id"), "function_call")
            st.tool(obj.get("item_id"))["args"].add(obj.get("delta"))
        elif typ in ("response.reasoning_summary_text.done", "response.reasoning_text.done"):
            # `done` repeats the whole text: use it only where no delta arrived.
            sub = obj.get("summary_index") if typ.endswith("summary_text.done") else ("text", obj.get("content_index"))
            g = self._group(obj.get("item_id"), sub)
            if not g.value() and isinstance(obj.get("text"), str):
                g.set(obj["text"])
        elif typ == "response.output_text.done":
            key = (obj.get("item_id"), obj.get("content_index"))
            if key not in self._content_keys:
                self._content_keys.add(key)
                st.content.add(obj.get("text"))
        elif typ in ("response.output_item.added", "response.output_item.done"):
            self._item(obj.get("item"), obj.get("output_index"))
        elif typ in ("response.created", "response.in_progress"):
            st.set_model(_dig(obj, "response", "model"))
        elif typ in ("response.completed", "response.incomplete", "response.failed"):
            self._response(obj.get("response"))
        elif typ == "error":
            # This event says more than a `response.failed` around it (its `type`): its fields win.
            st.fail(_merge_error(_norm_error(obj, None), st.error))
        elif name is None and obj.get("object") == "response":
            self._response(obj)

    def _group(self, item_id: Any, sub: Any) -> _Text:
        key = (item_id, sub)
        g = self.st.reasoning_groups.get(key)
        if g is None:
            g = self.st.reasoning_groups[key] = _Text()
        return g

    def _item(self, item: Any, index: Any = None) -> None:
        """An output item in full: fills whatever its deltas did not (or a non-streamed body)."""
        if not isinstance(item, dict):
            return
        iid, typ = item.get("id"), item.get("type")
        if type(index) is int and isinstance(typ, str):
            seen = self._at.get(index)
            if seen is None:
                self._at[index] = (iid, typ)
            elif seen[1] == typ:
                iid = seen[0]  # the item streamed at this index, whatever id it is given now
        if typ == "reasoning":
            if any(k[0] == iid and g.value() for k, g in list(self.st.reasoning_groups.items())):
                # Streamed already: the full item repeats it (its summary, its raw text, or both).
                return
            for i, s in enumerate(item.get("summary") or ()):
                g = self._group(iid, i)
                if isinstance(s, dict) and not g.value() and isinstance(s.get("text"), str):
                    g.set(s["text"])
            for i, c in enumerate(item.get("content") or ()):
                if isinstance(c, dict) and c.get("type") == "reasoning_text":
                    g = self._group(iid, ("text", i))
                    if not g.value() and isinstance(c.get("text"), str):
                        g.set(c["text"])
        elif typ == "message":
            for i, c in enumerate(item.get("content") or ()):
                if isinstance(c, dict) and c.get("type") == "output_text" and (iid, i) not in self._content_keys:
                    self._content_keys.add((iid, i))
                    self.st.content.add(c.get("text"))
        elif typ == "function_call":
            t = self.st.tool(iid)
            t["id"] = item.get("call_id") or t["id"] or iid
            t["name"] = item.get("name") or t["name"]
            if not t["args"].value() and isinstance(item.get("arguments"), str):
                t["args"].set(item["arguments"])

    def _response(self, resp: Any) -> None:
        st = self.st
        if not isinstance(resp, dict):
            return
        st.set_model(resp.get("model"))
        for i, item in enumerate(resp.get("output") or ()):
            self._item(item, i)
        usage = resp.get("usage")
        if isinstance(usage, dict):
            st.input_tokens = _int(usage.get("input_tokens"))
            st.output_tokens = _int(usage.get("output_tokens"))
            st.total_tokens = _int(usage.get("total_tokens"))
            st.reasoning_tokens = _int(_dig(usage, "output_tokens_details", "reasoning_tokens"))
        status = resp.get("status")
        if isinstance(status, str):
            st.finish_reason = status
        if resp.get("error") or status == "failed":
            err = _norm_error({"error": resp.get("error") or {"message": "response failed"}}, None)
            # An `error` event before it said more (e.g. `type: insufficient_quota`): keep that.
            st.fail(_merge_error(st.error, err) if st.error else err)
        elif status in ("completed", "incomplete"):
            # `incomplete` (max_output_tokens) is a normal end, like `length` elsewhere.
            st.complete = True


class _AnthropicMessages(_Dialect):
    """Messages API: typed SSE events, or one `message` object when not streamed."""

    def event(self, name: str | None, obj: Any) -> None:
        st = self.st
        if not isinstance(obj, dict):
            return
        typ = obj.get("type") or name
        if typ == "content_block_delta":
            d = _sub(obj, "delta")
            dt = d.get("type")
            if dt == "text_delta":
                st.content.add(d.get("text"))
            elif dt == "thinking_delta":
                st.reasoning.add(d.get("thinking"))
            elif dt == "input_json_delta":
                t = st.tools.get(obj.get("index"))
                if t is not None:
                    t["args"].add(d.get("partial_json"))
            # signature_delta and citations_delta carry no text of their own.
        elif typ == "content_block_start":
            self._block(obj.get("index"), obj.get("content_block"), streamed=True)
        elif typ == "message_start":
            msg = _sub(obj, "message")
            st.set_model(msg.get("model"))
            # message_start's output_tokens is a placeholder (1); the real count comes later.
            st.input_tokens = _int(_dig(msg, "usage", "input_tokens"))
        elif typ == "message_delta":
            if isinstance(_dig(obj, "delta", "stop_reason"), str):
                st.finish_reason = obj["delta"]["stop_reason"]
            usage = _sub(obj, "usage")
            if _int(usage.get("input_tokens")) is not None:
                st.input_tokens = usage["input_tokens"]
            if _int(usage.get("output_tokens")) is not None:
                st.output_tokens = usage["output_tokens"]
        elif typ == "message_stop":
            st.complete = True if st.error is None else False
        elif typ == "error":
            st.fail(_norm_error(obj, None))
        elif typ == "message" and name is None:
            st.set_model(obj.get("model"))
            for i, block in enumerate(obj.get("content") or ()):
                self._block(i, block, streamed=False)
            if isinstance(obj.get("stop_reason"), str):
                st.finish_reason = obj["stop_reason"]
            usage = _sub(obj, "usage")
            st.input_tokens = _int(usage.get("input_tokens"))
            st.output_tokens = _int(usage.get("output_tokens"))

    def _block(self, index: Any, block: Any, *, streamed: bool) -> None:
        st = self.st
        if not isinstance(block, dict):
            return
        typ = block.get("type")
        if typ == "thinking":
            st.reasoning.add(block.get("thinking"))
        elif typ == "redacted_thinking":
            st.redacted += 1
        elif typ == "text":
            st.content.add(block.get("text"))
        elif typ in ("tool_use", "server_tool_use"):
            t = st.tool(index)
            t["id"], t["name"] = block.get("id"), block.get("name")
            inp = block.get("input")
            if not streamed:
                t["args"].set(_dumps(inp if inp is not None else {}))
            else:
                # The start block carries `input: {}`; the real input follows as deltas.
                t["fallback"] = _dumps(inp if inp is not None else {})

    def finalize(self) -> None:
        # A tool_use streamed without any input_json_delta still had an input: `{}`.
        for t in self.st.tools.values():
            if "fallback" in t and not t["args"].value():
                t["args"].set(t["fallback"])


class _Ollama(_Dialect):
    """Ollama's native /api/chat: one JSON object per line, the last with `done: true`."""

    def event(self, name: str | None, obj: Any) -> None:
        st = self.st
        if not isinstance(obj, dict):
            return
        if obj.get("error"):
            st.fail(_norm_error(obj, None))
            return
        st.set_model(obj.get("model"))
        msg = _sub(obj, "message")
        st.reasoning.add(msg.get("thinking"))
        st.content.add(msg.get("content"))
        for tc in msg.get("tool_calls") or ():
            if not isinstance(tc, dict):
                continue
            fn = _sub(tc, "function")
            # Ollama sends each call whole (arguments as an object), never as fragments.
            t = st.tool(("n", len(st.tools)))
            t["id"], t["name"] = tc.get("id"), fn.get("name")
            args = fn.get("arguments")
            t["args"].set(args if isinstance(args, str) else _dumps(args if args is not None else {}))
        if obj.get("done") is True:
            if isinstance(obj.get("done_reason"), str):
                st.finish_reason = obj["done_reason"]
            st.input_tokens = _int(obj.get("prompt_eval_count"))
            st.output_tokens = _int(obj.get("eval_count"))
            st.complete = True


class _Gemini(_Dialect):
    """generateContent / streamGenerateContent: every chunk is a whole GenerateContentResponse."""

    def __init__(self, st: _State) -> None:
        super().__init__(st)
        # A call whose arguments are still streaming (`streamFunctionCallArguments`): its parts
        # say `willContinue: true`, and the first part without it closes the call.
        self._open: dict | None = None

    def event(self, name: str | None, obj: Any) -> None:
        st = self.st
        if isinstance(obj, list):  # streamGenerateContent without alt=sse: a JSON array
            for o in obj:
                self.event(name, o)
            return
        if not isinstance(obj, dict):
            return
        if obj.get("error"):
            st.fail(_norm_error(obj, None))
            return
        st.set_model(obj.get("modelVersion"))
        cands = obj.get("candidates") or ()
        for cand in cands[:1]:  # candidateCount > 1 would interleave answers
            if not isinstance(cand, dict):
                continue
            for part in _dig(cand, "content", "parts") or ():
                if not isinstance(part, dict):
                    continue
                (st.reasoning if part.get("thought") is True else st.content).add(part.get("text"))
                fc = part.get("functionCall")
                if isinstance(fc, dict):
                    self._function_call(fc)
            if isinstance(cand.get("finishReason"), str):
                st.finish_reason = cand["finishReason"]
                st.complete = True
        block = _dig(obj, "promptFeedback", "blockReason")
        if isinstance(block, str) and not cands:
            st.finish_reason = block
            st.complete = True
        usage = obj.get("usageMetadata")
        if isinstance(usage, dict):
            # Cumulative and repeated on every chunk: the last one wins, field by field.
            st.input_tokens = _int(usage.get("promptTokenCount"))
            st.output_tokens = _int(usage.get("candidatesTokenCount"))
            st.reasoning_tokens = _int(usage.get("thoughtsTokenCount"))
            st.total_tokens = _int(usage.get("totalTokenCount"))

    def _function_call(self, fc: dict) -> None:
        """A whole call, or one piece of a streamed one: `{name, willContinue}`, then pieces with
        `partialArgs`, then a piece without `willContinue` (often `{}`) that closes it."""
        st, t = self.st, self._open
        name, more = fc.get("name"), fc.get("willContinue") is True
        if t is not None and name and t["name"] and name != t["name"]:
            t = None  # a new call began before the last one was closed
        if t is None:
            if not (name or fc.get("args") is not None or fc.get("partialArgs") or more):
                return  # a stray closing piece
            t = st.tool(("n", len(st.tools)))
            t["args"] = _JsonText()
        args: _JsonText = t["args"]
        if fc.get("id"):
            t["id"] = fc["id"]
        if name:
            t["name"] = name
        if fc.get("args") is not None and fc["args"] != {}:
            args.put(fc["args"])
        for pa in fc.get("partialArgs") or ():
            if isinstance(pa, dict) and isinstance(args.obj, dict):
                _put_partial_arg(args.obj, pa)
                args.touch()
        self._open = t if more else None


def _json_path(path: Any) -> list[str | int] | None:
    """The steps of an RFC 9535 path as Gemini writes them (`$.a.b[0]`, `$['a b']`); None
    for anything else."""
    if not isinstance(path, str) or path[:1] != "$":
        return None
    steps: list[str | int] = []
    pos = 1
    while pos < len(path):
        m = _PATH_STEP.match(path, pos)
        if m is None:
            return None
        name, index, single, double = m.groups()
        steps.append(int(index) if index is not None else next(x for x in (name, single, double) if x is not None))
        pos = m.end()
    return steps


_PATH_STEP = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]|\['([^']*)'\]|\[\"([^\"]*)\"\]")


def _put_partial_arg(root: dict, pa: dict) -> None:
    """One `partialArgs` entry into the arguments built so far. A string continues the string
    already at its path: long values arrive in several pieces for the same path."""
    if "stringValue" in pa:
        value: Any = pa["stringValue"]
    elif "numberValue" in pa:
        value = pa["numberValue"]
    elif "boolValue" in pa:
        value = pa["boolValue"]
    elif "nullValue" in pa:
        value = None
    else:
        return
    # Any: an int step indexes a list and a str step a dict, as the loop checks before each use.
    steps: list[Any] | None = _json_path(pa.get("jsonPath"))
    if not steps:
        return
    node: Any = root
    for i, step in enumerate(steps):
        if isinstance(step, int):
            if not isinstance(node, list) or step > len(node) + 1024:
                return
            node.extend([None] * (step + 1 - len(node)))
        elif not isinstance(node, dict):
            return
        if i == len(steps) - 1:
            old = node[step] if isinstance(node, list) else node.get(step)
            node[step] = old + value if isinstance(old, str) and isinstance(value, str) else value
            return
        child = node[step] if isinstance(node, list) else node.get(step)
        if not isinstance(child, (dict, list)):
            child = [] if isinstance(steps[i + 1], int) else {}
            node[step] = child
        node = child


class _Auto(_Dialect):
    """For paths no dialect claims: picks one from the first object that looks familiar."""

    has_terminator = False

    def __init__(self, st: _State) -> None:
        super().__init__(st)
        self.inner: _Dialect | None = None

    def _pick(self, name: str | None, obj: Any) -> _Dialect | None:
        o = obj[0] if isinstance(obj, list) and obj else obj
        if not isinstance(o, dict):
            return None
        typ = o.get("type") or name or ""
        if "choices" in o:
            return _OpenAIChat(self.st)
        if "candidates" in o or "usageMetadata" in o:
            return _Gemini(self.st)
        if typ.startswith("message") or typ.startswith("content_block") or typ == "ping":
            return _AnthropicMessages(self.st)
        if typ.startswith("response.") or o.get("object") == "response":
            return _OpenAIResponses(self.st)
        if "done" in o and ("message" in o or "response" in o):
            return _Ollama(self.st)
        return None

    def event(self, name: str | None, obj: Any) -> None:
        if self.inner is None:
            self.inner = self._pick(name, obj)
            if self.inner is None:
                return
            self.has_terminator = True
        self.inner.event(name, obj)

    def whole(self, obj: Any) -> None:
        inner = self._pick(None, obj)
        if inner is not None:
            inner.whole(obj)
        elif isinstance(obj, dict) and obj.get("error"):
            self.st.fail(_norm_error(obj, None))
        else:
            self.st.complete = True


_DIALECTS: dict[str, type[_Dialect]] = {
    API_OPENAI_CHAT: _OpenAIChat,
    API_OPENAI_RESPONSES: _OpenAIResponses,
    API_ANTHROPIC_MESSAGES: _AnthropicMessages,
    API_OLLAMA_CHAT: _Ollama,
    API_GEMINI_GENERATE: _Gemini,
}


# --- framing --------------------------------------------------------------------------------


class _Lines:
    """Splits bytes on LF, keeping only the unfinished tail (as pieces, never re-scanned)."""

    def __init__(self) -> None:
        self._tail: list[bytes] = []

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        start = 0
        while (i := data.find(b"\n", start)) >= 0:
            piece = data[start:i]
            if self._tail:
                self._tail.append(piece)
                piece = b"".join(self._tail)
                self._tail = []
            out.append(piece[:-1] if piece.endswith(b"\r") else piece)
            start = i + 1
        if start < len(data):
            self._tail.append(data[start:])
        return out

    def rest(self) -> bytes:
        rest = b"".join(self._tail)
        self._tail = []
        return rest[:-1] if rest.endswith(b"\r") else rest


def _text(line: bytes, st: _State, where: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        st.note(f"{where} is not valid UTF-8")
        return line.decode("utf-8", errors="replace")


# The C scanner behind `json.loads`, called without its two whitespace regexes and Python
# frames. It also says where the value ended, which tells whether it was the whole payload.
# (Events are parsed one by one, not joined into one JSON array: payloads that are not JSON
# alone can be JSON together, `[1` and `2]`, and one C call for many saved only ~10%.)
_scan_json = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # set in __init__, not in typeshed


def _loads(text: str | bytes) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except (ValueError, RecursionError):
        return False, None


# Decoded bytes asked of one content-coding at a time: what a bomb can expand to in one call.
_DECODE_STEP = 256 * 1024


def decoded_cap_note(limit: int, encoding: str, received: int) -> str:
    """The note of a body whose decoded form was cut at `limit` (the recorder and the extractor
    say it in the same words, so a row carries it once)."""
    return (f"response body is over {size_text(limit)} once decoded ({encoding}, {size_text(received)} "
            f"as received): the record keeps and reads the first {size_text(limit)}; the rest is not stored")


def _brotli_bounded(obj: Any) -> bool:
    """The brotli module can cap one call's output (Brotli 1.2 and later)."""
    return "output_buffer_limit" in (getattr(obj.process, "__doc__", None) or "")


class _Layer:
    """One content-coding being undone, giving at most `max_out` bytes per call, so that no
    single call expands a bomb; `more` says output is waiting without new input."""

    def __init__(self, enc: str, obj: Any, kind: str) -> None:
        self.enc, self.obj, self.kind = enc, obj, kind
        self.pending = b""  # input given but not taken yet

    @property
    def more(self) -> bool:
        if self.kind == "zstd":
            return not self.obj.needs_input and not self.obj.eof
        if self.kind == "br":
            return bool(self.pending) or not self.obj.can_accept_more_data()
        return bool(self.pending)

    def step(self, data: bytes, max_out: int) -> bytes:
        obj = self.obj
        if self.kind == "zlib":
            if obj.eof:
                return b""  # trailing bytes after the stream end, as zlib.decompress ignores them
            out = obj.decompress(self.pending + data if self.pending else data, max_out)
            self.pending = obj.unconsumed_tail
            return out
        if self.kind == "zstd":
            if obj.eof:
                return b""
            return obj.decompress(data, max_out)
        if self.kind == "br":
            if self.pending or data:
                self.pending += data
            if not obj.can_accept_more_data():
                return obj.process(b"", output_buffer_limit=max_out)
            data, self.pending = self.pending, b""
            return obj.process(data, output_buffer_limit=max_out)
        # "br-pieces": a brotli module without output_buffer_limit is given a byte at a time
        data = self.pending + data if self.pending else data
        view, at, made, parts = memoryview(data), 0, 0, []
        while at < len(data) and made < max_out:
            piece = obj.process(view[at:at + 1])
            at += 1
            if piece:
                parts.append(piece)
                made += len(piece)
        self.pending = data[at:]
        return b"".join(parts)

    def finished(self) -> bool:
        if self.kind == "zlib" or self.kind == "zstd":
            return bool(self.obj.eof)
        return bool(self.obj.is_finished())


class _Decoder:
    """Undoes content-encoding chunk by chunk, never giving (or making) more than it is asked
    for: a few hundred KiB of gzip can expand to gigabytes. Once `dead`, the body cannot be read."""

    def __init__(self, encodings: list[str], st: _State) -> None:
        self.st = st
        self.encodings = list(reversed(encodings))  # the last encoding applied is undone first
        self.steps: list[_Layer | None] = [None] * len(self.encodings)  # made on first data
        self.dead = False
        self.started = False

    def _make(self, enc: str, first: bytes) -> _Layer | None:
        if enc in ("gzip", "x-gzip"):
            return _Layer(enc, zlib.decompressobj(wbits=47), "zlib")  # 32+15: gzip or zlib header, auto-detected
        if enc == "deflate":
            # RFC 9110 says zlib-wrapped, but many servers send raw deflate.
            wrapped = first[:1] == b"\x1f" or (first[:1] and first[0] & 0x0F == 8)
            return _Layer(enc, zlib.decompressobj(wbits=47 if wrapped else -15), "zlib")
        if enc == "br":
            try:
                import brotli  # mitmproxy depends on it; optional for this module
            except Exception:
                self.st.note("br body could not be decoded: the brotli module is not installed")
                return None
            obj = brotli.Decompressor()
            return _Layer(enc, obj, "br" if _brotli_bounded(obj) else "br-pieces")
        if enc == "zstd":
            try:
                from compression import zstd  # type: ignore[import-not-found]  # Python 3.14
            except ImportError:
                try:
                    from backports import zstd  # type: ignore[import-not-found,no-redef]  # mitmproxy's, before 3.14
                except ImportError:
                    self.st.note("zstd body could not be decoded: no zstd module (Python 3.14, or backports.zstd)")
                    return None
            return _Layer(enc, zstd.ZstdDecompressor(), "zstd")
        self.st.note(f"body has content-encoding {enc!r}, which is not understood")
        return None

    def _pull(self, i: int, data: bytes, budget: int) -> bytes:
        """Give layer `i` `data` and run what it makes through the layers after it: at most
        `budget` bytes of the last layer's output."""
        if self.steps[i] is None:
            if not data:
                return b""
            self.steps[i] = self._make(self.encodings[i], data)
            if self.steps[i] is None:
                self.dead = True
                return b""
        layer = self.steps[i]
        assert layer is not None
        out: list[bytes] = []
        made = 0
        last = i + 1 == len(self.steps)
        while made < budget and not self.dead:
            before = len(layer.pending)
            piece = layer.step(data, budget - made if last else _DECODE_STEP)
            data = b""
            moved = bool(piece) or len(layer.pending) != before
            if not last and (piece or self._waiting(i + 1)):
                piece = self._pull(i + 1, piece, budget - made)
            if piece:
                out.append(piece)
                made += len(piece)
            elif not (layer.more and moved):
                break
        return b"".join(out)

    def _waiting(self, i: int) -> bool:
        """Layer `i` or one after it holds output that needs no new input."""
        return any(s is not None and s.more for s in self.steps[i:])

    def feed(self, data: bytes, budget: int) -> bytes:
        """The decoded bytes of `data` (and of what earlier calls left), at most `budget`."""
        if self.dead or not data:
            return b""
        original, first = data, not self.started
        self.started = True
        if not self.encodings:
            return data[:budget]
        try:
            return self._pull(0, data, budget)
        except Exception:
            enc = self.encodings[0]
            if first and original.lstrip()[:1] in (b"{", b"[", b"d", b"e", b":"):
                # Decoded already somewhere upstream while the header stayed: read it plain.
                self.st.note(f"content-encoding says {enc} but the body is plain; read as is")
                self.encodings, self.steps = [], []
                return original[:budget]
            self.st.note(f"{enc} body could not be decoded")
            self.dead = True
            return b""

    def flush(self, budget: int) -> bytes:
        """What is still waiting in the layers, at most `budget` bytes."""
        if self.dead or not self.steps or self.steps[0] is None:
            return b""
        try:
            return self._pull(0, b"", budget)
        except Exception:
            self.st.note(f"{self.encodings[0]} body could not be decoded")
            self.dead = True
            return b""

    def truncated(self) -> str | None:
        """The coding whose stream stopped before its end, if any (a layer no byte reached
        has nothing to say)."""
        if self.dead:
            return None
        for enc, layer in zip(self.encodings, self.steps):
            if layer is not None and not layer.finished():
                return enc
        return None


def _headers(headers: Headers) -> dict[str, str]:
    out: dict[str, str] = {}
    items = headers.items() if isinstance(headers, dict) else (headers or ())
    for k, v in items:
        k = str(k).lower()
        out[k] = f"{out[k]}, {v}" if k in out else str(v)
    return out


def _sniff(head: bytes, api: str) -> str:
    """Framing from the first bytes, for bodies labelled application/json or nothing at all."""
    head = head.lstrip()
    if head[:5] in (b"data:", b"event") or head[:1] == b":" or head[:3] == b"id:":
        return "sse"
    if api == API_OLLAMA_CHAT and head[:1] == b"{":
        return "ndjson"  # Ollama streams NDJSON whatever the label says
    return "whole"


class Extractor:
    """Incremental extraction for one response body. No method ever raises."""

    def __init__(self, api: str, status: int | None, headers: Headers, limit: int = DEFAULT_BODY_LIMIT) -> None:
        self.st = _State()
        self.api = api
        self.status = status
        # At most `limit` bytes of the body are read, once decoded; `fed` counts what arrived.
        self.limit = max(0, limit)
        self.taken = 0
        self.fed = 0
        self.capped = False  # the decoded body went over `limit`
        self._finished: Extraction | None = None
        try:
            self.headers = _headers(headers)
        except Exception:
            self.headers = {}
        self.dialect: _Dialect = _DIALECTS.get(api, _Auto)(self.st)
        ctype = self.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        self.declared_ndjson = ctype in ("application/x-ndjson", "application/ndjson", "application/jsonl")
        encs = [e.strip().lower() for e in self.headers.get("content-encoding", "").split(",")]
        encs = [e for e in encs if e and e != "identity"]
        self.decoder = _Decoder(encs, self.st) if encs else None
        self.is_error = isinstance(status, int) and status >= 400
        self.mode = (
            "whole" if self.is_error
            else "sse" if ctype == "text/event-stream"
            else "ndjson" if self.declared_ndjson
            else "sniff"
        )
        # Whole bodies, the bytes read while sniffing, and Ollama's in-case-it-was-not-NDJSON copy.
        self.raw: list[bytes] = []
        self.raw_len = 0
        self.lines = _Lines()  # NDJSON
        # SSE bytes not read yet: reading them per network read would cost more in framing than
        # in the events, so they wait for `snapshot`, `finish` or `_SSE_BATCH` bytes.
        self.sse_pending: list[bytes] = []
        self.sse_pending_len = 0
        # SSE bytes after the last blank line (an event still arriving); see `_sse_feed`.
        self.sse_buf = bytearray()
        self.line_no = 0
        self.sse_event: str | None = None
        self.sse_data: list[str] = []
        self.objects = 0
        self.bad_lines = 0
        self.first_line_bad = False

    def feed(self, chunk: bytes) -> None:
        """Bytes as the network delivered them, in order."""
        if self._finished is not None or not chunk:
            return
        self.fed += len(chunk)
        if self.capped:
            return
        try:
            room = self.limit - self.taken
            # One byte more than there is room for tells a body over the limit from one at it.
            data = self.decoder.feed(bytes(chunk), room + 1) if self.decoder else bytes(chunk[:room + 1])
            self._take(data)
        except Exception as exc:  # a surprise in the body must never reach the proxy
            self.st.note(f"extraction failed: {type(exc).__name__}: {exc}")

    def snapshot(self) -> Extraction:
        """What is known so far; `complete` stays None until the body shows how it ended."""
        if self._finished is not None:
            return self._finished
        try:
            if self.mode == "sse":
                self._sse_catch_up()
            return self.st.extraction(self._stream())
        except Exception as exc:
            return Extraction(notes=[f"extraction failed: {type(exc).__name__}: {exc}"])

    def finish(self) -> Extraction:
        """The body ended: settle `complete` and return the final extraction."""
        if self._finished is None:
            try:
                self._finish()
                inner = self.dialect.inner if isinstance(self.dialect, _Auto) else self.dialect
                if isinstance(inner, _AnthropicMessages):
                    inner.finalize()
            except Exception as exc:
                self.st.note(f"extraction failed: {type(exc).__name__}: {exc}")
            try:
                self._finished = self.st.extraction(self._stream())
            except Exception as exc:
                self._finished = Extraction(notes=[f"extraction failed: {type(exc).__name__}: {exc}"])
        return self._finished

    def _take(self, data: bytes) -> None:
        room = self.limit - self.taken
        if len(data) > room:
            data = data[:room]
            self.capped = True
        self.taken += len(data)
        if data:
            self._consume(data)

    @property
    def cut(self) -> bool:
        """Only the first part of the body was read: it went over the limit once decoded, or
        what arrived is as long as the limit (the record keeps no more of a body as received)."""
        return self.capped or self.fed >= self.limit > 0

    def _stream(self) -> bool | None:
        if self.mode == "sse":
            return True
        if self.mode == "ndjson":
            # A lone object on an application/json Ollama answer was a non-streamed reply.
            return self.declared_ndjson or self.objects > 1
        return False if self.mode == "whole" else None

    def _consume(self, data: bytes) -> None:
        if self.mode == "sniff":
            self.raw.append(data)
            self.raw_len += len(data)
            head = b"".join(self.raw)  # only a few bytes: sniffing stops at the first line
            if len(head.lstrip()) < 6 and b"\n" not in head.lstrip() and self.raw_len < 64:
                return
            self.mode, self.raw, self.raw_len = _sniff(head, self.api), [], 0
            data = head
        if self.mode == "whole":
            self.raw.append(data)
            return
        if self.mode == "sse":
            self.sse_pending.append(data)
            self.sse_pending_len += len(data)
            if self.sse_pending_len >= _SSE_BATCH:
                self._sse_read()
            return
        if not self.declared_ndjson:
            self.raw.append(data)
        for line in self.lines.feed(data):
            self._line(line)

    def _sse_read(self) -> None:
        if self.sse_pending:
            data = b"".join(self.sse_pending)
            self.sse_pending, self.sse_pending_len = [], 0
            self._sse_feed(data)

    def _sse_catch_up(self) -> None:
        """Read everything that arrived, as `feed` did before reading was put off."""
        try:
            self._sse_read()
            self._sse_settle()
        except Exception as exc:  # as in `feed`: noted, and the next bytes are still read
            self.st.note(f"extraction failed: {type(exc).__name__}: {exc}")

    def _sse_feed(self, data: bytes) -> None:
        """Buffer up to the last blank line, then read those whole events at once."""
        buf = self.sse_buf
        start = max(len(buf) - 2, 0)  # a terminator may begin in what was buffered before
        buf += data
        # A blank line is LF LF, or LF CR LF where lines end in CRLF.
        lf, crlf = buf.rfind(b"\n\n", start), buf.rfind(b"\n\r\n", start)
        end = max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
        if end:
            events = bytes(buf[:end])
            del buf[:end]
            self._sse_events(events)

    def _sse_events(self, blob: bytes) -> None:
        """Whole events (`blob` ends with a blank line). The usual shapes, one `data:` line with
        or without an `event:` line before it, skip the line parser; anything else, and an
        event continuing what `_sse_settle` already read, goes through `_line` as before."""
        try:
            text = blob.decode("utf-8")
        except UnicodeDecodeError:
            # The line parser notes each line that is not UTF-8 and still reads the others.
            for line in blob.split(b"\n")[:-1]:
                self._line(line[:-1] if line.endswith(b"\r") else line)
            return
        if "\r" in text:
            # One CR before each LF is part of the line ending; any other CR stays in its line.
            text = text.replace("\r\n", "\n")
        pieces = text.split("\n\n")
        # After the last separator: blank lines (each a no-op event) or nothing.
        tail = pieces.pop()
        if self.sse_data or self.sse_event is not None:
            self._sse_slow(pieces.pop(0))  # the event `_sse_settle` began reading
        # Counters are kept in locals for speed and stored back before the line parser runs.
        line_no, objects = self.line_no, self.objects
        event, scan = self.dialect.event, _scan_json
        for piece in pieces:
            name: str | None = None
            if "\n" not in piece:
                if not piece or piece[0] == ":":  # a blank line, or a keep-alive comment
                    line_no += 2
                    continue
                payload, lines = piece, 2  # its line and the blank line after it
            else:
                head, _, payload = piece.partition("\n")
                if head[:6] == "event:" and "\n" not in payload:
                    name, lines = head[6:].strip(), 3
                else:
                    payload, lines = "", 0  # not a shape taken here: to the line parser
            if payload[:5] == "data:":
                at = 6 if payload[5:6] == " " else 5
                try:
                    obj, end = scan(payload, at)
                except (StopIteration, ValueError, RecursionError):
                    end = -1
                if end == len(payload):
                    line_no += lines
                    objects += 1
                    if name == "error" and isinstance(obj, dict) and "error" not in obj:
                        obj = {"type": "error", "error": obj}
                    event(name, obj)
                    continue
                if payload[at:] == "[DONE]":
                    line_no += lines
                    self.dialect.done()
                    continue
                # Otherwise not exactly one JSON value: `_dispatch` has the rules for those.
            self.line_no, self.objects = line_no, objects
            self._sse_slow(piece)
            line_no, objects = self.line_no, self.objects
        self.line_no, self.objects = line_no, objects
        for text in tail.split("\n")[:-1]:
            self._line(text.encode("utf-8"))

    def _sse_slow(self, piece: str) -> None:
        """One event (its lines, then the blank line that ended it) through the line parser."""
        for line in piece.split("\n"):
            self._line(line.encode("utf-8"))
        self._line(b"")

    def _sse_settle(self) -> None:
        """Read the complete lines of the event still arriving, as the line parser always did,
        so a snapshot shows what they noted; the rest of that event then takes `_sse_slow`."""
        buf = self.sse_buf
        cut = buf.rfind(b"\n") + 1
        if cut:
            lines = bytes(buf[:cut])
            del buf[:cut]
            for line in lines.split(b"\n")[:-1]:
                self._line(line[:-1] if line.endswith(b"\r") else line)

    def _line(self, line: bytes) -> None:
        st = self.st
        self.line_no += 1
        if self.mode == "ndjson":
            if line.strip():
                ok, obj = _loads(line)
                if ok:
                    self.objects += 1
                    self.dialect.event(None, obj)
                else:
                    self.first_line_bad = self.first_line_bad or (self.objects == 0 and self.bad_lines == 0)
                    self.bad_lines += 1
                    st.note(f"line {self.line_no} is not JSON")
            return
        if not line:
            self._dispatch()
        elif line[:1] != b":":  # `:` starts a comment / keep-alive
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self.sse_data.append(_text(value, st, f"line {self.line_no}"))
            elif name == b"event":
                self.sse_event = _text(value, st, f"line {self.line_no}").strip()

    def _dispatch(self, at_end: bool = False) -> None:
        data, name = "\n".join(self.sse_data), self.sse_event
        self.sse_data, self.sse_event = [], None
        if not data.strip():
            return
        ok, obj = _loads(data)
        if not ok and len(data.splitlines()) > 1:
            # Servers that end events with a single newline glue several into one.
            for piece in data.splitlines():
                self._dispatch_one(name, piece, at_end, _loads(piece))
        else:
            self._dispatch_one(name, data, at_end, (ok, obj))

    def _dispatch_one(self, name: str | None, data: str, at_end: bool, parsed: tuple[bool, Any]) -> None:
        ok, obj = parsed
        if data.strip() == "[DONE]":
            self.dialect.done()
        elif not ok:
            if data.strip():
                self.st.note("stream ended inside an event" if at_end else f"line {self.line_no - 1} is not JSON")
        else:
            self.objects += 1
            if name == "error" and isinstance(obj, dict) and "error" not in obj:
                obj = {"type": "error", "error": obj}
            self.dialect.event(name, obj)

    def _finish(self) -> None:
        st = self.st
        if self.decoder is not None and not self.capped:
            self._take(self.decoder.flush(self.limit - self.taken + 1))
        cut = self.cut
        if self.capped and self.decoder is not None and self.decoder.encodings:
            st.note(decoded_cap_note(self.limit, ", ".join(reversed(self.decoder.encodings)), self.fed))
        elif self.capped:
            st.note(body_cut_note("response", self.limit))
        elif self.decoder is not None and not cut and (enc := self.decoder.truncated()) is not None:
            st.note(f"{enc} body is truncated")
        if self.mode == "sniff":
            head = b"".join(self.raw)
            self.mode, self.raw = _sniff(head, self.api), []
            if head:
                self._consume(head)
        dead = self.decoder is not None and self.decoder.dead
        if self.mode == "whole":
            if dead:
                if self.is_error:
                    st.fail(self._error(None, b""))
            else:
                self._whole(b"".join(self.raw), cut)
            return
        if self.mode == "ndjson":
            rest = self.lines.rest()
            if rest.strip() and not cut:
                ok, obj = _loads(rest)
                if ok:
                    self.objects += 1
                    self.dialect.event(None, obj)
                elif self.objects:
                    st.note("stream ended inside a line")
                else:
                    self.first_line_bad = True
            if self.raw and self.first_line_bad and not dead:
                # Not NDJSON after all (e.g. pretty-printed JSON): start over on the whole body.
                notes = [n for n in st.notes if not n.startswith("line ")]
                self.st = _State()
                self.st.notes = notes
                self.dialect = type(self.dialect)(self.st)
                self.mode = "whole"
                self._whole(b"".join(self.raw), cut)
                return
        else:
            self._sse_catch_up()
            rest = bytes(self.sse_buf)
            self.sse_buf.clear()
            rest = rest[:-1] if rest.endswith(b"\r") else rest
            if cut:
                # The event the limit cut is not the stream's: it is left unread.
                self.sse_data, self.sse_event = [], None
            else:
                if rest.strip():
                    self._line(rest)
                self._dispatch(at_end=True)
        if cut:
            return  # how the stream ended is past what was read: `complete` stays unknown
        if st.complete is None and self.dialect.has_terminator:
            # (A dialect picked by no path has no known normal end: `complete` stays unknown.)
            st.complete = False
            if st.error is None and not dead:
                why = "stream ended without its terminator"
                st.note(why if self.objects else "stream carried nothing that was understood")

    def _whole(self, body: bytes, cut: bool = False) -> None:
        st = self.st
        if self.is_error:
            ok, obj = _loads(body) if body.strip() else (False, None)
            if not ok:
                obj = body.decode("utf-8", errors="replace").strip() or None
            st.fail(self._error(obj, body))
            if isinstance(obj, dict):
                st.set_model(obj.get("model"))
            return
        if not body.strip():
            if self.api != API_OTHER:
                st.note("response body is empty")
            return
        ok, obj = _loads(body)
        if ok:
            self.dialect.whole(obj)
            return
        if cut:
            return  # the first part of a document is not one: the note on the cut says enough
        try:
            body.decode("utf-8")
            st.note("response body is not JSON")
        except UnicodeDecodeError:
            st.note("response body is not valid UTF-8 and not JSON")

    def _error(self, obj: Any, body: bytes) -> dict:
        err = _norm_error(obj if obj is not None else {"message": None}, self.status)
        if err["message"] is None and body:
            err["message"] = body.decode("utf-8", errors="replace")[:_MAX_ERROR_TEXT] or None
        if err["request_id"] is None:
            err["request_id"] = self.headers.get("request-id") or self.headers.get("x-request-id")
        err["retry_after_seconds"] = _retry_after(self.headers)
        return err


def _retry_after(headers: dict[str, str]) -> int | float | None:
    for name, scale in (("retry-after", 1.0), ("retry-after-ms", 0.001)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            secs = float(value.strip()) * scale
        except ValueError:
            continue  # an HTTP date: left to whoever needs the wall clock
        return int(secs) if secs == int(secs) else secs
    return None


def make_extractor(
    api: str, *, status: int | None, headers: dict[str, str] | list[tuple[str, str]] | None,
    limit: int = DEFAULT_BODY_LIMIT,
) -> Extractor:
    """An extractor for one response of dialect `api` (see `detect_api`) with these headers,
    reading at most `limit` bytes of the body once decoded."""
    return Extractor(api, status, headers, limit)


def extract(api: str, status: int | None, headers: Headers, body: bytes,
            limit: int = DEFAULT_BODY_LIMIT) -> Extraction:
    """Extraction of a whole body in one call."""
    ex = make_extractor(api, status=status, headers=headers, limit=limit)
    ex.feed(body)
    return ex.finish()


def decode_body(body: bytes, encoding: str, limit: int = DEFAULT_BODY_LIMIT) -> tuple[bytes | None, bool]:
    """`body` with its content-encoding (a list, applied in order) undone: at most `limit`
    bytes, and whether the decoded body goes on past them. None when it cannot be decoded; a
    stream cut short decodes only when the body is as long as `limit` (the record's cut)."""
    encodings = [e.strip().lower() for e in encoding.split(",")]
    encodings = [e for e in encodings if e and e != "identity"]
    if not encodings:
        return body[:limit], len(body) > limit
    decoder = _Decoder(encodings, _State())
    out = decoder.feed(body, limit + 1)
    if len(out) <= limit:
        out += decoder.flush(limit + 1 - len(out))
    if decoder.dead or not decoder.encodings:  # not decodable, or not encoded after all
        return None, False
    if len(out) > limit:
        return out[:limit], True
    if decoder.truncated() is not None and len(body) < limit:
        return None, False
    return out, False


# -- the prompt ---------------------------------------------------------------------------------
# Keys of a request body that hold what the user sent, in every dialect: OpenAI chat, Anthropic
# and Ollama `messages`, Anthropic `system`, Responses `instructions` and `input`, Gemini
# `contents` and `systemInstruction`, Ollama generate and legacy completions `prompt`.
_PROMPT_KEYS = ("system", "systemInstruction", "system_instruction", "instructions", "messages", "input",
                "contents", "prompt")
# Nested values past this depth are not text a person wrote (and a hostile body cannot make the
# walk recurse without end).
_PROMPT_DEPTH = 12


def _prompt_parts(value: Any, out: list[str], depth: int) -> None:
    """The text parts of a message, a content list or a block: strings, `text` of typed parts,
    `content`/`parts` of messages and tool results, `output` of Responses tool outputs. Keys,
    roles, images and tool arguments are left out: they are not what a search looks for."""
    if depth > _PROMPT_DEPTH:
        return
    if isinstance(value, str):
        if value:
            out.append(value)
    elif isinstance(value, list):
        for item in value:
            _prompt_parts(item, out, depth + 1)
    elif isinstance(value, dict):
        text = value.get("text")
        if isinstance(text, str):
            if text:
                out.append(text)
            return
        for key in ("content", "parts"):
            if key in value:
                _prompt_parts(value[key], out, depth + 1)
        if isinstance(value.get("output"), str):  # Responses function_call_output
            _prompt_parts(value["output"], out, depth + 1)


def prompt_text(body: str | bytes | dict | None) -> str | None:
    """What the user sent in a request body -- the system prompt and this turn's messages (see
    _this_turn), text parts only, joined by newlines -- or None when the body is not a JSON
    object or holds no text. The dialect is told by the keys, so a body recorded as `other` is
    read too. Never raises."""
    if not body:
        return None
    try:
        obj = body if isinstance(body, dict) else json.loads(body)  # parsed once by the recorder
    except (ValueError, TypeError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    out: list[str] = []
    try:
        for key in _PROMPT_KEYS:
            if key in obj:
                value = obj[key]
                _prompt_parts(_this_turn(value) if isinstance(value, list) else value, out, 0)
    except Exception:  # a body of some shape nobody expected: what was read so far
        pass
    return "\n".join(out) or None


def _answered(item: Any) -> bool:
    """An item of a history that the model wrote: an assistant / model message, or a
    Responses output item (a function call, reasoning)."""
    if not isinstance(item, dict):
        return False
    return (item.get("role") in ("assistant", "model")
            or item.get("type") in ("function_call", "reasoning", "custom_tool_call"))


def _this_turn(history: list) -> list:
    """The part of a conversation this request added: what follows the model's last turn (the
    user's new message, the tool results), or all of it on a first turn. Agents resend the
    whole history every turn; keeping it all would store and search a Cline task's first
    message once per call of the task, so a search finds the call where it was said."""
    end = len(history)
    while end and _answered(history[end - 1]):  # an assistant prefill ends the history: keep it
        end -= 1
    for i in range(end - 1, -1, -1):
        if _answered(history[i]):
            # The system prompt is sent every turn too, and is what the user set: kept.
            system = [m for m in history[:i] if isinstance(m, dict) and m.get("role") in ("system", "developer")]
            return system + history[i + 1:]
    return history
