"""OpenAI Chat Completions (`/chat/completions`), and the servers that speak it: OpenRouter,
DeepSeek, vLLM, Together, Groq, Mistral, xAI, Azure OpenAI, Ollama's and Gemini's compatible
endpoints. Their differences are read here: reasoning in `reasoning` or `reasoning_content`
(mirrored, sometimes, in `reasoning_details`), Mistral's content as a list of parts with
`thinking` ones, DeepSeek's usage on the finish chunk and its cache counts, OpenRouter's cost.

Wire rules follow recorded transcripts (tests/fixtures/wire, each with the values it must give).
"""

from __future__ import annotations

import json
from typing import Any

from llmtap.dialects.base import (
    Dialect,
    ResponseReader,
    State,
    as_int,
    decimal,
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
from llmtap.dialects.shapes import Message, Part, Request, ToolCall, ToolResult, ToolSpec

# Keys of a choice and of its delta that `ChatReader.event` may take a shortcut past: each is
# either read there the way `_event` / `_message` read it, or read by neither. A key the general
# walk starts to read must leave these sets or be handled in the shortcut too.
_PLAIN_CHOICE = frozenset(("index", "delta", "finish_reason", "logprobs", "native_finish_reason", "stop_reason"))
_PLAIN_DELTA = frozenset(("content", "role", "refusal", "reasoning", "reasoning_content"))


class ChatReader(ResponseReader):
    """Chat Completions and its many compatible servers (OpenRouter, DeepSeek, vLLM, ...)."""

    @classmethod
    def claims(cls, name: str | None, obj: dict) -> bool:
        return "choices" in obj

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
                            if st.id is None:
                                st.set_id(obj.get("id"))
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
            st.fail(norm_error(obj, None))
        st.set_model(obj.get("model"))
        if st.id is None:
            st.set_id(obj.get("id"))
        usage = obj.get("usage")
        if isinstance(usage, dict):
            # DeepSeek puts usage on the finish_reason chunk, OpenAI on a choice-less one.
            read_usage(st, usage)
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
                        for piece in inner:
                            if isinstance(piece, dict) and piece.get("type") in (None, "text"):
                                st.reasoning.add(piece.get("text"))
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
            fn = sub(tc, "function")
            if fn.get("name"):
                t["name"] = fn["name"]
            args = fn.get("arguments")
            if isinstance(args, str):
                t["args"].add(args)
            elif args is not None:
                t["args"].add(dumps(args))
        return answered

    def _unindexed(self, call_id: Any) -> int:
        """Servers that omit `index`: a new id starts a call, a bare fragment continues the last."""
        for key, t in self.st.tools.items():
            if call_id and t["id"] == call_id:
                return key[1]
        last = len(self.st.tools) - 1
        return last + 1 if call_id or last < 0 else last

def read_usage(st: State, usage: dict) -> None:
    """A Chat Completions usage object (DeepSeek puts it on the finish_reason chunk, OpenAI on a
    choice-less last one). `prompt_tokens` already counts the cached tokens."""
    st.input_tokens = as_int(usage.get("prompt_tokens", usage.get("input_tokens")))
    st.output_tokens = as_int(usage.get("completion_tokens", usage.get("output_tokens")))
    st.total_tokens = as_int(usage.get("total_tokens"))
    st.reasoning_tokens = as_int(dig(usage, "completion_tokens_details", "reasoning_tokens"))
    details = sub(usage, "prompt_tokens_details")
    cached = as_int(details.get("cached_tokens"))
    st.cache_read_tokens = cached if cached is not None else as_int(usage.get("prompt_cache_hit_tokens"))  # DeepSeek
    st.cache_write_tokens = as_int(details.get("cache_write_tokens"))  # OpenRouter, for providers that bill writes
    st.cost_usd = decimal(usage.get("cost"))  # OpenRouter: what the call cost, in USD credits
    st.usage_raw = usage


# --- the request side ---------------------------------------------------------------------------

# The part types that are text (a tuple: a "type" a body gives as a list is no text, not an error).
TEXT_KINDS = (None, "text", "input_text", "output_text")
_MEDIA = {"image_url": "image", "input_image": "image", "input_audio": "audio", "file": "file", "input_file": "file"}


def content_parts(content: Any) -> list[Part]:
    """A message's `content`: a string, or a list of typed parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [Part("text", text=content)] if content else []
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        return [Part("other", text=dumps(content))]
    parts: list[Part] = []
    for p in content:
        if isinstance(p, str):
            parts.append(Part("text", text=p))
            continue
        if not isinstance(p, dict):
            continue
        kind = type_of(p)
        if isinstance(p.get("text"), str) and kind in TEXT_KINDS:
            parts.append(Part("text", text=p["text"]))
        elif kind == "refusal":
            parts.append(Part("text", text=string(p.get("refusal"))))
        elif kind == "thinking":  # Mistral
            parts.append(Part("reasoning", text=text_of(p.get("thinking"))))
        elif kind in _MEDIA:
            fmt = dig(p, "input_audio", "format")
            parts.append(Part(_MEDIA[kind], media_type=f"audio/{fmt}" if isinstance(fmt, str) else None))  # type: ignore[arg-type]
        else:
            parts.append(Part("other", text=dumps(p)))
    return parts


def _tool_calls(msg: dict) -> list[Part]:
    out: list[Part] = []
    for tc in msg.get("tool_calls") or ():
        if not isinstance(tc, dict):
            continue
        fn = sub(tc, "function")
        args = fn.get("arguments")
        out.append(Part("tool_call", tool_call=ToolCall(
            string(tc.get("id")),
            string(fn.get("name")),
            args if isinstance(args, str) else ("" if args is None else dumps(args)),
            kind=string(tc.get("type"), "function"))))
    fc = msg.get("function_call")  # the deprecated single call
    if isinstance(fc, dict):
        args = fc.get("arguments")
        out.append(Part("tool_call", tool_call=ToolCall(None, fc.get("name"), args if isinstance(args, str) else "")))
    return out


# Chat roles as the shapes name them (grouping reads them straight from the JSON too: recorder/sessions.py).
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool",
          "function": "tool"}


def read_messages(messages: Any) -> tuple[list[Message], list[str]]:
    """(messages, system prompts) of a Chat Completions `messages` list."""
    out: list[Message] = []
    system: list[str] = []
    for msg in messages if isinstance(messages, list) else ():
        if not isinstance(msg, dict):
            continue
        native = string(msg.get("role"), "user")
        role = ROLES.get(native, "user")
        parts: list[Part] = []
        for key in ("reasoning", "reasoning_content"):
            if isinstance(msg.get(key), str) and msg[key]:
                parts.append(Part("reasoning", text=msg[key]))
                break
        if role == "tool":
            call_id = msg.get("tool_call_id")
            parts.append(Part("tool_result", tool_result=ToolResult(
                string(call_id), text_of(msg.get("content")),
                name=string(msg.get("name")))))
        else:
            parts += content_parts(msg.get("content"))
        parts += _tool_calls(msg)
        m = Message(role, tuple(parts), native_role=native,  # type: ignore[arg-type]
                    name=msg.get("name") if isinstance(msg.get("name"), str) and role != "tool" else None)
        if role == "system":
            system.append(m.text)
        out.append(m)
    return out, system


def read_tools(tools: Any) -> list[ToolSpec]:
    out: list[ToolSpec] = []
    for t in tools if isinstance(tools, list) else ():
        if not isinstance(t, dict):
            continue
        fn: dict = t["function"] if isinstance(t.get("function"), dict) else t  # legacy `functions`: bare
        name = fn.get("name")
        desc = fn.get("description")
        kind = string(t.get("type"), "function")
        out.append(ToolSpec(string(name, kind), string(desc),
                            fn.get("parameters"), kind=kind))
    return out


_READ = frozenset(("model", "stream", "messages", "tools", "functions", "tool_choice", "function_call", "user",
                   "prompt_cache_key", "safety_identifier"))
# Request.ids of this format (grouping reads them straight from the JSON too: recorder/sessions.py).
ID_FIELDS = ("user", "prompt_cache_key", "safety_identifier")


def error_body(status: int, message: str, code: str, attempts: list[dict] | None = None) -> bytes:
    """The OpenAI error shape, which every OpenAI SDK and compatible client reads."""
    kind = {400: "invalid_request_error", 403: "permission_denied", 404: "invalid_request_error",
            502: "upstream_unavailable"}.get(status, "api_error")
    error: dict[str, object] = {"message": message, "type": kind, "param": None, "code": code}
    if attempts is not None:
        error["attempts"] = attempts
    return json.dumps({"error": error}).encode()


class OpenAIChat(Dialect):
    name = "openai.chat"
    family = "openai"
    # `api-key` is Azure OpenAI's.
    credential_headers = frozenset({"authorization", "api-key"})
    reader = ChatReader

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path.endswith("/chat/completions")

    def claims_body(self, doc: dict) -> bool:
        return isinstance(doc.get("messages"), list)

    def error_body(self, status: int, message: str, code: str, attempts: list[dict] | None = None) -> bytes:
        return error_body(status, message, code, attempts)

    def parse(self, doc: dict, path: str) -> Request:
        model, stream = self.model_and_stream(doc, path)
        messages, system = read_messages(doc.get("messages"))
        tools = read_tools(doc.get("tools")) + read_tools(doc.get("functions"))
        choice = doc.get("tool_choice", doc.get("function_call"))
        return Request(self.name, model=model, stream=stream, system=tuple(system), messages=tuple(messages),
                       tools=tuple(tools), tool_choice=choice, params=params_of(doc, _READ), ids=ids_of(doc, ID_FIELDS))


CHAT = OpenAIChat()
DIALECTS: tuple[Dialect, ...] = (CHAT,)
