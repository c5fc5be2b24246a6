"""The OpenAI Responses API (`/responses`): typed stream events or one `response` object, and
requests whose `input` is a list of typed items (messages, function calls and their outputs,
reasoning). OpenRouter and DeepSeek speak it too, with raw reasoning text next to summaries.
"""

from __future__ import annotations

from typing import Any

from llmtap.dialects import openai_chat
from llmtap.dialects.base import (
    Dialect,
    ResponseReader,
    State,
    Text,
    as_int,
    decimal,
    dig,
    dumps,
    ids_of,
    merge_error,
    norm_error,
    params_of,
    string,
    text_of,
    type_of,
)
from llmtap.dialects.shapes import Message, Part, Request, ToolCall, ToolResult, ToolSpec


class ResponsesReader(ResponseReader):
    """The Responses API: typed events, or one `response` object when not streamed."""

    @classmethod
    def claims(cls, name: str | None, obj: dict) -> bool:
        typ = obj.get("type") or name or ""
        return isinstance(typ, str) and typ.startswith("response.") or obj.get("object") == "response"

    def __init__(self, st: State) -> None:
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
            part = obj.get("summary_index") if typ.endswith("summary_text.done") else ("text", obj.get("content_index"))
            g = self._group(obj.get("item_id"), part)
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
            st.set_model(dig(obj, "response", "model"))
            st.set_id(dig(obj, "response", "id"))
        elif typ in ("response.completed", "response.incomplete", "response.failed"):
            self._response(obj.get("response"))
        elif typ == "error":
            # This event says more than a `response.failed` around it (its `type`): its fields win.
            st.fail(merge_error(norm_error(obj, None), st.error))
        elif name is None and obj.get("object") == "response":
            self._response(obj)

    def _group(self, item_id: Any, part: Any) -> Text:
        key = (item_id, part)
        g = self.st.reasoning_groups.get(key)
        if g is None:
            g = self.st.reasoning_groups[key] = Text()
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
        st.set_id(resp.get("id"))
        for i, item in enumerate(resp.get("output") or ()):
            self._item(item, i)
        usage = resp.get("usage")
        if isinstance(usage, dict):
            st.input_tokens = as_int(usage.get("input_tokens"))
            st.output_tokens = as_int(usage.get("output_tokens"))
            st.total_tokens = as_int(usage.get("total_tokens"))
            st.reasoning_tokens = as_int(dig(usage, "output_tokens_details", "reasoning_tokens"))
            # `input_tokens` counts the cached ones already.
            st.cache_read_tokens = as_int(dig(usage, "input_tokens_details", "cached_tokens"))
            st.cost_usd = decimal(usage.get("cost"))  # OpenRouter
            st.usage_raw = usage
        status = resp.get("status")
        if isinstance(status, str):
            st.finish_reason = status
        if resp.get("error") or status == "failed":
            err = norm_error({"error": resp.get("error") or {"message": "response failed"}}, None)
            # An `error` event before it said more (e.g. `type: insufficient_quota`): keep that.
            st.fail(merge_error(st.error, err) if st.error else err)
        elif status in ("completed", "incomplete"):
            # `incomplete` (max_output_tokens) is a normal end, like `length` elsewhere.
            st.complete = True


# --- the request side ---------------------------------------------------------------------------

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _call(item: dict, args_key: str, kind: str) -> Part:
    args = item.get(args_key)
    call_id = item.get("call_id") or item.get("id")
    return Part("tool_call", tool_call=ToolCall(
        string(call_id), string(item.get("name")),
        args if isinstance(args, str) else ("" if args is None else dumps(args)), kind=kind))


def read_input(items: Any) -> tuple[list[Message], list[str]]:
    """(messages, system prompts) of `input`: a string, or items. Consecutive items the model
    wrote (reasoning, its message, its function calls) are one assistant turn, as they were one
    answer."""
    if isinstance(items, str):
        return [Message("user", (Part("text", text=items),), native_role="user")], []
    out: list[Message] = []
    system: list[str] = []

    def push(role: Any, parts: list[Part], native: Any) -> None:
        if role == "assistant" and out and out[-1].role == "assistant":
            out[-1] = Message("assistant", out[-1].parts + tuple(parts), native_role=out[-1].native_role)
        else:
            out.append(Message(role, tuple(parts), native_role=string(native)))

    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict):
            continue
        typ = type_of(item)
        if typ in (None, "message"):
            native = string(item.get("role"), "user")
            role = _ROLES.get(native, "user")
            parts = openai_chat.content_parts(item.get("content"))
            if role == "system":
                system.append(Message("system", tuple(parts)).text)
            push(role, parts, native)
        elif typ == "function_call":
            push("assistant", [_call(item, "arguments", "function")], "assistant")
        elif typ == "custom_tool_call":
            push("assistant", [_call(item, "input", "custom")], "assistant")
        elif typ == "reasoning":
            texts = [s.get("text") for s in item.get("summary") or () if isinstance(s, dict)]
            texts += [c.get("text") for c in item.get("content") or () if isinstance(c, dict)]
            text = "\n\n".join(t for t in texts if isinstance(t, str) and t)
            push("assistant", [Part("reasoning", text=text or None,
                                    redacted=not text and bool(item.get("encrypted_content")))], "assistant")
        elif typ in ("function_call_output", "custom_tool_call_output"):
            call_id = item.get("call_id")
            push("tool", [Part("tool_result", tool_result=ToolResult(
                string(call_id), text_of(item.get("output"))))], typ)
        elif isinstance(typ, str) and typ.endswith("_call"):  # a built-in tool's call (web_search_call, ...)
            push("assistant", [Part("tool_call", tool_call=ToolCall(
                string(item.get("id")), typ[:-5], dumps(item),
                kind=typ[:-5]))], "assistant")
        else:
            push("user", [Part("other", text=dumps(item))], typ)
    return out, system


def read_tools(tools: Any) -> list[ToolSpec]:
    out: list[ToolSpec] = []
    for t in tools if isinstance(tools, list) else ():
        if not isinstance(t, dict):
            continue
        kind = string(t.get("type"), "function")
        name = string(t.get("name"), kind)
        desc = t.get("description")
        out.append(ToolSpec(name, string(desc), t.get("parameters"), kind=kind))
    return out


_READ = frozenset(("model", "stream", "instructions", "input", "tools", "tool_choice", "user", "prompt_cache_key",
                   "safety_identifier", "previous_response_id", "conversation"))
_IDS = ("previous_response_id", "conversation", "user", "prompt_cache_key", "safety_identifier")


class OpenAIResponses(Dialect):
    name = "openai.responses"
    family = "openai"
    credential_headers = openai_chat.OpenAIChat.credential_headers
    reader = ResponsesReader

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path.endswith("/responses")

    def claims_body(self, doc: dict) -> bool:
        return "input" in doc

    def error_body(self, status: int, message: str, code: str, attempts: list[dict] | None = None) -> bytes:
        return openai_chat.error_body(status, message, code, attempts)

    def parse(self, doc: dict, path: str) -> Request:
        model, stream = self.model_and_stream(doc, path)
        messages, system = read_input(doc.get("input"))
        if isinstance(doc.get("instructions"), str) and doc["instructions"]:
            system.insert(0, doc["instructions"])
        return Request(self.name, model=model, stream=stream, system=tuple(system), messages=tuple(messages),
                       tools=tuple(read_tools(doc.get("tools"))), tool_choice=doc.get("tool_choice"),
                       params=params_of(doc, _READ), ids=ids_of(doc, _IDS))


RESPONSES = OpenAIResponses()
DIALECTS: tuple[Dialect, ...] = (RESPONSES,)
