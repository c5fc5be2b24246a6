"""Reasoning, answer text, tool calls, usage and finish reason from LLM response bytes, as the
recorder's columns want them.

Each wire format is read by its dialect (llmtap.dialects: one module per format, the framing
and decoding shared); this module drives one over a body and gives the result as an
`Extraction`, plus the request's prompt text. Pure and incremental: an `Extractor` is fed the
body exactly as the network delivered it and can report what it knows at any moment, so the
same code serves the live view of a call in progress and the record written when it ends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from llmtap.dialects import registry
from llmtap.dialects.framing import DEFAULT_BODY_LIMIT, Headers, decode_body, decoded_cap_note
from llmtap.dialects.shapes import Response, Usage

__all__ = ["Extraction", "Extractor", "decode_body", "decoded_cap_note", "detect_api", "extract", "make_extractor",
           "json_object", "prompt_text"]


def detect_api(method: str, path: str, body: bytes = b"") -> str:
    """The wire dialect of a request, decided from its method and URL path (any prefix).

    `body` is accepted so callers can pass what they have; the path alone decides, so that a
    request whose body is not JSON is still classified. Never raises.
    """
    return registry.detect(method or "", path or "").name


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
    # Normalised as llmtap.dialects.shapes.Usage says: input includes cache reads and writes,
    # output includes reasoning, in every dialect.
    input_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    total_tokens: int | None = None
    # {status, type, code, message, request_id, retry_after_seconds}
    error: dict | None = None
    redacted_reasoning_blocks: int = 0
    notes: list[str] = field(default_factory=list)
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    # All of it: the counts above, the provider-stated cost (`cost_usd`, OpenRouter's
    # usage.cost) and the provider's final usage object (`raw`), for pricing.
    usage: Usage = field(default_factory=Usage)
    response_id: str | None = None  # the provider's id of the answer (Responses chain by it: sessions)
    # Read of the request with the answer (workers.with_request): `prompt_text` of the body as
    # it crossed (to be masked), and what sessions read of the request and this answer
    # (sessions.Facts; None with sessions off).
    prompt: str | None = None
    facts: Any = None


def extraction(r: Response) -> Extraction:
    """A dialect's Response as the recorder's Extraction."""
    u = r.usage
    err = r.error
    return Extraction(
        stream=r.stream, complete=r.complete, reasoning=r.reasoning, content=r.content,
        tool_calls=[{"id": c.id, "name": c.name, "arguments": c.arguments} for c in r.tool_calls] or None,
        model=r.model, finish_reason=r.finish_reason,
        input_tokens=u.input_tokens, output_tokens=u.output_tokens, reasoning_tokens=u.reasoning_tokens,
        total_tokens=u.total_tokens,
        error=None if err is None else {"status": err.status, "type": err.type, "code": err.code,
                                        "message": err.message, "request_id": err.request_id,
                                        "retry_after_seconds": err.retry_after_seconds},
        redacted_reasoning_blocks=r.redacted_reasoning_blocks, notes=list(r.notes),
        cache_read_tokens=u.cache_read_tokens, cache_write_tokens=u.cache_write_tokens, usage=u,
        response_id=r.id,
    )


class Extractor:
    """Incremental extraction for one response body (the dialect's reader, driven by the
    shared framing). No method ever raises."""

    __slots__ = ("reader", "_finished")

    def __init__(self, api: str, status: int | None, headers: Headers, limit: int = DEFAULT_BODY_LIMIT) -> None:
        self.reader = registry.response_reader(api, status=status, headers=headers, limit=limit)
        self._finished: Extraction | None = None

    def feed(self, chunk: bytes) -> None:
        """Bytes as the network delivered them, in order."""
        self.reader.feed(chunk)

    def snapshot(self) -> Extraction:
        """What is known so far; `complete` stays None until the body shows how it ended."""
        if self._finished is not None:
            return self._finished
        try:
            return extraction(self.reader.snapshot())
        except Exception as exc:
            return Extraction(notes=[f"extraction failed: {type(exc).__name__}: {exc}"])

    def finish(self) -> Extraction:
        """The body ended: settle `complete` and return the final extraction."""
        if self._finished is None:
            try:
                self._finished = extraction(self.reader.finish())
            except Exception as exc:
                self._finished = Extraction(notes=[f"extraction failed: {type(exc).__name__}: {exc}"])
        return self._finished

    @property
    def response(self) -> Response:
        """The answer as the normalised shape (what is known so far, or the final one)."""
        return self.reader.finish() if self._finished is not None else self.reader.snapshot()


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


# What the record says of a call whose client hung up on a whole answer.
CLIENT_LEFT_NOTE = ("the client closed its connection after the answer's end, before llmtap saw the provider's end "
                    "of body; the answer is whole")


def left_after_the_end(client_left: bool, status: int | None, ex: Extraction | None) -> bool:
    """The client closed its connection after its answer had ended as its API ends one (SDKs hang
    up on `[DONE]`, which may cross before the provider's end of body does): the answer it got
    is whole, and the client's leaving is no error. The record and `llmtap run`'s call line
    both decide it here."""
    return client_left and ex is not None and bool(ex.complete) and (status or 0) < 400


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


def json_object(body: str | bytes | None) -> dict | None:
    """`body` parsed, when it is a JSON object; else None. Never raises."""
    if not body:
        return None
    try:
        obj = json.loads(body)
    except (ValueError, TypeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def prompt_text(body: str | bytes | dict | None) -> str | None:
    """What the user sent in a request body -- the system prompt and this turn's messages (see
    _this_turn), text parts only, joined by newlines -- or None when the body is not a JSON
    object or holds no text. The dialect is told by the keys, so a body recorded as `other` is
    read too. Never raises."""
    obj = body if isinstance(body, dict) else json_object(body)
    if obj is None:
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

