"""Anthropic Messages (`/v1/messages`): typed SSE events (`message_start`, content blocks and
their deltas, `message_delta`, `message_stop`) or one `message` object, and requests with a
top-level `system` and content blocks (text, images, thinking, tool_use, tool_result).

Anthropic reports `input_tokens` apart from the cache: `cache_read_input_tokens` and
`cache_creation_input_tokens`. The recorded input is their sum (shapes.Usage's convention).
"""

from __future__ import annotations

import json
from typing import Any

from llmtap.dialects.base import (
    Dialect,
    ResponseReader,
    add_up,
    as_int,
    dig,
    dumps,
    ids_of,
    norm_error,
    params_of,
    string,
    sub,
    text_of,
    type_of,
)
from llmtap.dialects.shapes import Message, Part, Request, Role, ToolCall, ToolResult, ToolSpec


def one_hour_writes(usage: Any) -> int | None:
    """Of an Anthropic usage object's cache writes, those for an hour: `cache_creation`'s
    `ephemeral_1h_input_tokens` (None when it does not say). Also read by `llmtap cost backfill`
    from the usage object kept in `calls.usage_raw`."""
    split = usage.get("cache_creation") if isinstance(usage, dict) else None
    return as_int(split.get("ephemeral_1h_input_tokens")) if isinstance(split, dict) else None


class MessagesReader(ResponseReader):
    """Messages API: typed SSE events, or one `message` object when not streamed."""

    @classmethod
    def claims(cls, name: str | None, obj: dict) -> bool:
        typ = obj.get("type") or name or ""
        return isinstance(typ, str) and (typ.startswith("message") or typ.startswith("content_block") or typ == "ping")

    def _usage(self, usage: dict) -> None:
        """A usage object (message_start's, then message_delta's cumulative counts): merged
        into the raw one, and input counted as shapes.Usage says, cache reads and writes in."""
        st = self.st
        if not usage:
            return
        raw = dict(st.usage_raw) if st.usage_raw else {}
        raw.update(usage)
        st.usage_raw = raw
        st.cache_read_tokens = as_int(raw.get("cache_read_input_tokens"))
        st.cache_write_tokens = as_int(raw.get("cache_creation_input_tokens"))
        st.cache_write_1h_tokens = one_hour_writes(raw)
        st.input_tokens = add_up(as_int(raw.get("input_tokens")), st.cache_read_tokens, st.cache_write_tokens)

    def event(self, name: str | None, obj: Any) -> None:
        st = self.st
        if not isinstance(obj, dict):
            return
        typ = obj.get("type") or name
        if typ == "content_block_delta":
            d = sub(obj, "delta")
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
            msg = sub(obj, "message")
            st.set_model(msg.get("model"))
            st.set_id(msg.get("id"))
            # message_start's output_tokens is a placeholder (1); the real count comes later.
            self._usage(sub(msg, "usage"))
        elif typ == "message_delta":
            if isinstance(dig(obj, "delta", "stop_reason"), str):
                st.finish_reason = obj["delta"]["stop_reason"]
            usage = sub(obj, "usage")
            self._usage(usage)
            if as_int(usage.get("output_tokens")) is not None:
                st.output_tokens = usage["output_tokens"]
        elif typ == "message_stop":
            st.complete = True if st.error is None else False
        elif typ == "error":
            st.fail(norm_error(obj, None))
        elif typ == "message" and name is None:
            st.set_model(obj.get("model"))
            for i, block in enumerate(obj.get("content") or ()):
                self._block(i, block, streamed=False)
            if isinstance(obj.get("stop_reason"), str):
                st.finish_reason = obj["stop_reason"]
            st.set_id(obj.get("id"))
            usage = sub(obj, "usage")
            st.usage_raw = None
            self._usage(usage)
            st.output_tokens = as_int(usage.get("output_tokens"))

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
                t["args"].set(dumps(inp if inp is not None else {}))
            else:
                # The start block carries `input: {}`; the real input follows as deltas.
                t["fallback"] = dumps(inp if inp is not None else {})

    def finalize(self) -> None:
        # A tool_use streamed without any input_json_delta still had an input: `{}`.
        for t in self.st.tools.values():
            if "fallback" in t and not t["args"].value():
                t["args"].set(t["fallback"])


# --- the request side ---------------------------------------------------------------------------

_MEDIA = {"image": "image", "document": "file", "search_result": "other"}


def _blocks(content: Any) -> list[Part]:
    if isinstance(content, str):
        return [Part("text", text=content)] if content else []
    parts: list[Part] = []
    for b in content if isinstance(content, list) else ():
        if not isinstance(b, dict):
            continue
        typ = type_of(b)
        if typ == "text":
            parts.append(Part("text", text=string(b.get("text"))))
        elif typ == "thinking":
            parts.append(Part("reasoning", text=string(b.get("thinking"))))
        elif typ == "redacted_thinking":
            parts.append(Part("reasoning", redacted=True))
        elif typ in ("tool_use", "server_tool_use"):
            inp = b.get("input")
            parts.append(Part("tool_call", tool_call=ToolCall(
                string(b.get("id")),
                string(b.get("name")),
                dumps(inp if inp is not None else {}), kind="function" if typ == "tool_use" else "server")))
        elif typ == "tool_result" or (isinstance(typ, str) and typ.endswith("_tool_result")):
            call_id = b.get("tool_use_id")
            err = b.get("is_error")
            parts.append(Part("tool_result", tool_result=ToolResult(
                string(call_id), text_of(b.get("content")),
                is_error=err if isinstance(err, bool) else None)))
        elif typ in _MEDIA:
            media = dig(b, "source", "media_type")
            parts.append(Part(_MEDIA[typ], media_type=string(media)))  # type: ignore[arg-type]
        else:
            parts.append(Part("other", text=dumps(b)))
    return parts


_READ = frozenset(("model", "stream", "system", "messages", "tools", "tool_choice"))


class AnthropicMessages(Dialect):
    name = "anthropic.messages"
    family = "anthropic"
    credential_headers = frozenset({"x-api-key", "authorization"})
    reader = MessagesReader

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path.endswith("/messages") and not path.endswith("/threads/messages")

    def claims_body(self, doc: dict) -> bool:
        # Chat Completions has `messages` too: Anthropic's own marks are a top-level `system`
        # or content blocks of its kinds.
        if not isinstance(doc.get("messages"), list):
            return False
        if "system" in doc:
            return True
        return any(isinstance(m, dict) and isinstance(m.get("content"), list)
                   and any(isinstance(b, dict) and b.get("type") in ("tool_use", "tool_result", "thinking")
                           for b in m["content"]) for m in doc["messages"])

    def auth_header(self, key: str) -> tuple[bytes, bytes]:
        return (b"x-api-key", key.encode())

    def error_body(self, status: int, message: str, code: str, attempts: list[dict] | None = None) -> bytes:
        kind = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error"}.get(status, "api_error")
        payload: dict[str, object] = {"type": "error", "error": {"type": kind, "message": message}}
        if attempts is not None:
            payload["llmtap_attempts"] = attempts
        return json.dumps(payload).encode()

    def parse(self, doc: dict, path: str) -> Request:
        model, stream = self.model_and_stream(doc, path)
        system_value = doc.get("system")
        if isinstance(system_value, str):
            system = [system_value] if system_value else []
        else:
            system = [p.text for p in _blocks(system_value) if p.kind == "text" and p.text]
        messages: list[Message] = []
        for m in doc.get("messages") or ():
            if not isinstance(m, dict):
                continue
            native = string(m.get("role"), "user")
            role: Role = "assistant" if native == "assistant" else "user"
            messages.append(Message(role, tuple(_blocks(m.get("content"))), native_role=native))
        tools: list[ToolSpec] = []
        for t in doc.get("tools") or ():
            if not isinstance(t, dict):
                continue
            typ = t.get("type")
            kind = typ if isinstance(typ, str) and typ != "custom" else "function"
            name = string(t.get("name"), kind)
            desc = t.get("description")
            tools.append(ToolSpec(name, string(desc), t.get("input_schema"), kind=kind))
        return Request(self.name, model=model, stream=stream, system=tuple(system), messages=tuple(messages),
                       tools=tuple(tools), tool_choice=doc.get("tool_choice"), params=params_of(doc, _READ),
                       ids=ids_of(doc, ("metadata.user_id",)))


MESSAGES = AnthropicMessages()
DIALECTS: tuple[Dialect, ...] = (MESSAGES,)
