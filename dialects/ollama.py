"""Ollama's native API (`/api/chat`): NDJSON streams (whatever the content-type says), one
object per line and the last with `done: true`; requests stream unless they say otherwise.
Its OpenAI-compatible `/v1/chat/completions` is read by openai_chat.py.
"""

from __future__ import annotations

import json
from typing import Any

from llmtap.dialects.base import Dialect, ResponseReader, as_int, dumps, norm_error, params_of, string, sub, text_of
from llmtap.dialects.openai_chat import read_tools
from llmtap.dialects.shapes import Message, Part, Request, ToolCall, ToolResult

_USAGE_KEYS = ("prompt_eval_count", "eval_count", "total_duration", "load_duration", "prompt_eval_duration",
               "eval_duration")


class OllamaReader(ResponseReader):
    """Ollama's native /api/chat: one JSON object per line, the last with `done: true`."""

    sniff_ndjson = True

    @classmethod
    def claims(cls, name: str | None, obj: dict) -> bool:
        return "done" in obj and ("message" in obj or "response" in obj)

    def event(self, name: str | None, obj: Any) -> None:
        st = self.st
        if not isinstance(obj, dict):
            return
        if obj.get("error"):
            st.fail(norm_error(obj, None))
            return
        st.set_model(obj.get("model"))
        msg = sub(obj, "message")
        st.reasoning.add(msg.get("thinking"))
        st.content.add(msg.get("content"))
        for tc in msg.get("tool_calls") or ():
            if not isinstance(tc, dict):
                continue
            fn = sub(tc, "function")
            # Ollama sends each call whole (arguments as an object), never as fragments.
            t = st.tool(("n", len(st.tools)))
            t["id"], t["name"] = tc.get("id"), fn.get("name")
            args = fn.get("arguments")
            t["args"].set(args if isinstance(args, str) else dumps(args if args is not None else {}))
        if obj.get("done") is True:
            if isinstance(obj.get("done_reason"), str):
                st.finish_reason = obj["done_reason"]
            st.input_tokens = as_int(obj.get("prompt_eval_count"))
            st.output_tokens = as_int(obj.get("eval_count"))
            # No usage object: the counts and timings of the last line are the provider's own.
            st.usage_raw = {k: obj[k] for k in _USAGE_KEYS if k in obj}
            st.complete = True


# --- the request side ---------------------------------------------------------------------------

_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_READ = frozenset(("model", "stream", "messages", "tools"))


def error_body(status: int, message: str, code: str, attempts: list[dict] | None = None) -> bytes:
    payload: dict[str, object] = {"error": message}
    if attempts is not None:
        payload["llmtap_attempts"] = attempts
    return json.dumps(payload).encode()


def read_messages(messages: Any) -> tuple[list[Message], list[str]]:
    out: list[Message] = []
    system: list[str] = []
    for m in messages if isinstance(messages, list) else ():
        if not isinstance(m, dict):
            continue
        native = string(m.get("role"), "user")
        role = _ROLES.get(native, "user")
        parts: list[Part] = []
        if isinstance(m.get("thinking"), str) and m["thinking"]:
            parts.append(Part("reasoning", text=m["thinking"]))
        if role == "tool":
            name = m.get("tool_name", m.get("name"))
            call_id = m.get("tool_call_id")
            parts.append(Part("tool_result", tool_result=ToolResult(
                string(call_id), text_of(m.get("content")),
                name=string(name))))
        elif isinstance(m.get("content"), str) and m["content"]:
            parts.append(Part("text", text=m["content"]))
        parts += [Part("image") for _ in m.get("images") or ()]
        for tc in m.get("tool_calls") or ():
            if not isinstance(tc, dict):
                continue
            fn = sub(tc, "function")
            args = fn.get("arguments")
            parts.append(Part("tool_call", tool_call=ToolCall(
                string(tc.get("id")),
                string(fn.get("name")),
                args if isinstance(args, str) else dumps(args if args is not None else {}))))
        msg = Message(role, tuple(parts), native_role=native)  # type: ignore[arg-type]
        if role == "system":
            system.append(msg.text)
        out.append(msg)
    return out, system


class OllamaChat(Dialect):
    name = "ollama.chat"
    family = "ollama"
    stream_default = True
    reader = OllamaReader

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path.endswith("/api/chat")

    def error_body(self, status: int, message: str, code: str, attempts: list[dict] | None = None) -> bytes:
        return error_body(status, message, code, attempts)

    def parse(self, doc: dict, path: str) -> Request:
        model, stream = self.model_and_stream(doc, path)
        messages, system = read_messages(doc.get("messages"))
        return Request(self.name, model=model, stream=stream, system=tuple(system), messages=tuple(messages),
                       tools=tuple(read_tools(doc.get("tools"))), params=params_of(doc, _READ))


CHAT = OllamaChat()
DIALECTS: tuple[Dialect, ...] = (CHAT,)
