"""Google Gemini (`/v1beta/models/MODEL:generateContent` and `:streamGenerateContent`): the
model is in the URL path; every streamed chunk is a whole GenerateContentResponse (SSE with
`alt=sse`, else one JSON array); requests hold `contents` of `parts`, `systemInstruction` and
`tools` of `functionDeclarations` (camelCase or snake_case, both accepted by Google).
"""

from __future__ import annotations

import json
import re
from typing import Any

from llmtap.dialects.base import (
    Dialect,
    JsonText,
    ResponseReader,
    State,
    add_up,
    as_int,
    dig,
    dumps,
    norm_error,
    params_of,
    string,
    text_of,
)
from llmtap.dialects.shapes import Message, Part, Request, ToolCall, ToolResult, ToolSpec

_MODEL = re.compile(r"(/models/)([^/:]+)(:[A-Za-z]+)")


class GeminiReader(ResponseReader):
    """generateContent / streamGenerateContent: every chunk is a whole GenerateContentResponse."""

    @classmethod
    def claims(cls, name: str | None, obj: dict) -> bool:
        return "candidates" in obj or "usageMetadata" in obj

    def __init__(self, st: State) -> None:
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
            st.fail(norm_error(obj, None))
            return
        st.set_model(obj.get("modelVersion"))
        cands = obj.get("candidates") or ()
        for cand in cands[:1]:  # candidateCount > 1 would interleave answers
            if not isinstance(cand, dict):
                continue
            for part in dig(cand, "content", "parts") or ():
                if not isinstance(part, dict):
                    continue
                (st.reasoning if part.get("thought") is True else st.content).add(part.get("text"))
                fc = part.get("functionCall")
                if isinstance(fc, dict):
                    self._function_call(fc)
            if isinstance(cand.get("finishReason"), str):
                st.finish_reason = cand["finishReason"]
                st.complete = True
        block = dig(obj, "promptFeedback", "blockReason")
        if isinstance(block, str) and not cands:
            st.finish_reason = block
            st.complete = True
        usage = obj.get("usageMetadata")
        if isinstance(usage, dict):
            # Cumulative and repeated on every chunk: the last one wins, field by field.
            # promptTokenCount counts the cached content already; Gemini bills thoughts as
            # output but counts them apart from candidatesTokenCount: the output is both.
            st.input_tokens = as_int(usage.get("promptTokenCount"))
            st.reasoning_tokens = as_int(usage.get("thoughtsTokenCount"))
            st.output_tokens = add_up(as_int(usage.get("candidatesTokenCount")), st.reasoning_tokens)
            st.total_tokens = as_int(usage.get("totalTokenCount"))
            st.cache_read_tokens = as_int(usage.get("cachedContentTokenCount"))
            st.usage_raw = usage

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
            t["args"] = JsonText()
        args: JsonText = t["args"]
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


# --- the request side ---------------------------------------------------------------------------

_ROLES = {"user": "user", "model": "assistant", "function": "tool", "system": "system"}
_READ = frozenset(("contents", "systemInstruction", "system_instruction", "tools", "toolConfig", "tool_config",
                   "model", "stream"))


def _get(obj: dict, camel: str, snake: str) -> Any:
    return obj.get(camel, obj.get(snake))


def _parts(parts: Any) -> list[Part]:
    out: list[Part] = []
    for p in parts if isinstance(parts, list) else ():
        if not isinstance(p, dict):
            continue
        fc = _get(p, "functionCall", "function_call")
        fr = _get(p, "functionResponse", "function_response")
        media = _get(p, "inlineData", "inline_data") or _get(p, "fileData", "file_data")
        if isinstance(p.get("text"), str):
            out.append(Part("reasoning" if p.get("thought") is True else "text", text=p["text"]))
        elif isinstance(fc, dict):
            args = fc.get("args")
            out.append(Part("tool_call", tool_call=ToolCall(
                string(fc.get("id")),
                string(fc.get("name")),
                dumps(args if args is not None else {}))))
        elif isinstance(fr, dict):
            out.append(Part("tool_result", tool_result=ToolResult(
                string(fr.get("id")), text_of(fr.get("response")),
                name=string(fr.get("name")))))
        elif isinstance(media, dict):
            mime = _get(media, "mimeType", "mime_type")
            kind = "image" if isinstance(mime, str) and mime.startswith("image/") else \
                "audio" if isinstance(mime, str) and mime.startswith("audio/") else "file"
            out.append(Part(kind, media_type=string(mime)))  # type: ignore[arg-type]
        else:
            out.append(Part("other", text=dumps(p)))
    return out


class GeminiGenerate(Dialect):
    name = "gemini.generate"
    family = "gemini"
    credential_headers = frozenset({"x-goog-api-key", "authorization"})
    model_in_path = True
    reader = GeminiReader

    def matches(self, method: str, path: str) -> bool:
        if method != "POST" or "/models/" not in path:
            return False
        tail = path.rsplit("/", 1)[-1]
        return tail.endswith(":generateContent") or tail.endswith(":streamGenerateContent")

    def claims_body(self, doc: dict) -> bool:
        return isinstance(doc.get("contents"), list)

    def model_from_path(self, path: str) -> str | None:
        m = _MODEL.search(path)
        return m.group(2) if m else None

    def stream_from_path(self, path: str) -> bool | None:
        return "streamGenerateContent" in path

    def rewrite_model(self, doc: dict | None, path: str, model: str) -> tuple[dict | None, str]:
        return doc, _MODEL.sub(lambda m: f"{m.group(1)}{model}{m.group(3)}", path, count=1)

    def auth_header(self, key: str) -> tuple[bytes, bytes]:
        return (b"x-goog-api-key", key.encode())

    def error_body(self, status: int, message: str, code: str, attempts: list[dict] | None = None) -> bytes:
        state = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 502: "UNAVAILABLE"}.get(status, "UNKNOWN")
        payload: dict[str, object] = {"error": {"code": status, "message": message, "status": state}}
        if attempts is not None:
            payload["llmtap_attempts"] = attempts
        return json.dumps(payload).encode()

    def parse(self, doc: dict, path: str) -> Request:
        model, stream = self.model_and_stream(doc, path)
        si = _get(doc, "systemInstruction", "system_instruction")
        system: list[str] = []
        if isinstance(si, str):
            system.append(si)
        elif isinstance(si, dict):
            text = "\n".join(p.text for p in _parts(si.get("parts")) if p.kind == "text" and p.text)
            if text:
                system.append(text)
        messages: list[Message] = []
        for c in doc.get("contents") or ():
            if not isinstance(c, dict):
                continue
            native = string(c.get("role"), "user")
            messages.append(Message(_ROLES.get(native, "user"), tuple(_parts(c.get("parts"))),  # type: ignore[arg-type]
                                    native_role=native))
        tools: list[ToolSpec] = []
        for t in doc.get("tools") or ():
            if not isinstance(t, dict):
                continue
            decls = _get(t, "functionDeclarations", "function_declarations")
            if isinstance(decls, list):
                for d in decls:
                    if isinstance(d, dict):
                        desc = d.get("description")
                        params = d.get("parameters", d.get("parametersJsonSchema"))
                        tools.append(ToolSpec(str(d.get("name")), string(desc), params))
            else:
                tools += [ToolSpec(k, kind=k) for k in t]  # built-ins: googleSearch, codeExecution, ...
        return Request(self.name, model=model, stream=stream, system=tuple(system), messages=tuple(messages),
                       tools=tuple(tools), tool_choice=_get(doc, "toolConfig", "tool_config"),
                       params=params_of(doc, _READ))


GENERATE = GeminiGenerate()
DIALECTS: tuple[Dialect, ...] = (GENERATE,)
