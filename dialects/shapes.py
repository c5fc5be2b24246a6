"""The normalised request and response: what every wire format is read into.

Each dialect module (one per wire format) reads its own JSON into these shapes, so that
everything built on top -- the recorder's columns, the UI's conversation view, sessions, cost,
traces, replay -- reads one shape and never a provider's format. They are frozen: once read, a
request or a response is a value that any thread may hold.

Conventions that hold in every dialect:
- Text is joined exactly as the provider sent it (no stripping, no added separators between
  streamed pieces); parts of one message that are separate blocks are kept as separate parts.
- Tool-call arguments are kept verbatim as the text the model produced (usually JSON); a
  dialect whose wire carries them as an object (Anthropic, Gemini, Ollama) stores the compact
  JSON text of that object.
- Token counts are None when the provider did not say, never 0 as a guess.
- `input_tokens` is every input token the model read, cache reads and writes included, in every
  dialect (Anthropic reports `input_tokens` apart from `cache_read_input_tokens` and
  `cache_creation_input_tokens`: its dialect adds them up). `output_tokens` includes reasoning
  tokens (Gemini reports `thoughtsTokenCount` apart from `candidatesTokenCount`: its dialect adds
  them up, as Gemini bills them as output).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from decimal import Decimal
from typing import Any, Literal, TypeVar

Role = Literal["system", "user", "assistant", "tool"]
PartKind = Literal["text", "reasoning", "image", "audio", "file", "tool_call", "tool_result", "other"]
_T = TypeVar("_T")


def fast_init(cls: type[_T]) -> type[_T]:
    """Give a frozen slots dataclass an `__init__` that fills each slot through its own
    descriptor instead of `object.__setattr__`: about twice as fast to build
    (`scripts/bench_recorder.py --handoff`), which counts where many are made: a Chunk per
    chunk on the proxy's event loop, a Part and a Message per message of every request read.
    Nothing else changes: assigning a field afterwards still raises FrozenInstanceError."""
    ns: dict[str, Any] = {"_NOTHING": object()}
    params, lines = [], []
    for f in fields(cls):  # type: ignore[arg-type]
        ns[f"_set_{f.name}"] = getattr(cls, f.name).__set__
        value = f.name
        if f.default is not MISSING:
            ns[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        elif f.default_factory is not MISSING:
            ns[f"_factory_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_NOTHING")
            value = f"_factory_{f.name}() if {f.name} is _NOTHING else {f.name}"
        else:
            params.append(f.name)
        lines.append(f"    _set_{f.name}(self, {value})")
    exec(f"def __init__(self, {', '.join(params)}):\n" + "\n".join(lines), ns)
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.dataclass_init = cls.__init__  # the one it replaces, for the benchmark's baseline
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


@fast_init
@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool the request offers the model."""

    name: str
    description: str | None = None
    parameters: Any = None  # the JSON schema as sent, None when the tool has none
    kind: str = "function"  # "function", or the provider's own type of a built-in tool ("web_search", ...)


@fast_init
@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call the model made (in a response) or made earlier (in a request's history)."""

    id: str | None  # the id results answer it with; None where the format has none (Ollama, old Gemini)
    name: str | None
    arguments: str  # verbatim text; "" when the model gave none
    kind: str = "function"  # "function", "custom" (Responses custom tools), or a built-in tool's type


@fast_init
@dataclass(frozen=True, slots=True)
class ToolResult:
    """A tool's result the client sends back, answering an earlier ToolCall by its id."""

    call_id: str | None
    content: str  # the text parts joined; a non-text result as its compact JSON
    name: str | None = None  # Gemini and Ollama answer by name, not id
    is_error: bool | None = None  # Anthropic `is_error`; None where the format cannot say


@fast_init
@dataclass(frozen=True, slots=True)
class Part:
    """One block of a message's content, in order."""

    kind: PartKind
    text: str | None = None  # text / reasoning text; for media, None
    media_type: str | None = None  # image/png, ... when the format says
    tool_call: ToolCall | None = None  # kind == "tool_call"
    tool_result: ToolResult | None = None  # kind == "tool_result"
    redacted: bool = False  # reasoning the provider sent only encrypted / redacted


@fast_init
@dataclass(frozen=True, slots=True)
class Message:
    """One turn of a conversation. `role` is normalised; `native_role` keeps the format's word
    ("developer", "model", "function", ...)."""

    role: Role
    parts: tuple[Part, ...] = ()
    native_role: str | None = None
    name: str | None = None  # OpenAI's optional participant name

    @property
    def text(self) -> str:
        """The text parts joined by newlines (reasoning left out)."""
        return "\n".join(p.text for p in self.parts if p.kind == "text" and p.text)

    @property
    def reasoning(self) -> str | None:
        texts = [p.text for p in self.parts if p.kind == "reasoning" and p.text]
        return "\n".join(texts) if texts else None

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return tuple(p.tool_call for p in self.parts if p.tool_call is not None)

    @property
    def tool_results(self) -> tuple[ToolResult, ...]:
        return tuple(p.tool_result for p in self.parts if p.tool_result is not None)


@fast_init
@dataclass(frozen=True, slots=True)
class Request:
    """What a client asked for, in any wire format.

    `ids` holds the identifiers the body itself carries that tie calls together, by their name
    in the format: "user" (OpenAI), "prompt_cache_key" (OpenAI), "metadata.user_id" (Anthropic),
    "previous_response_id" and "conversation" (Responses). Header-borne ids are not here: they
    belong to the call, not the body.
    """

    api: str  # the dialect's name: "openai.chat", "anthropic.messages", ...
    model: str | None = None  # from the body, or from the URL where the format puts it there (Gemini)
    stream: bool | None = None  # None when the request does not say (Ollama streams by default: True)
    system: tuple[str, ...] = ()  # system / developer prompts and instructions, in order
    messages: tuple[Message, ...] = ()  # the conversation as sent (system messages included, in place)
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: Any = None  # as sent
    params: dict[str, Any] = field(default_factory=dict)  # temperature, max_tokens, top_p, ... as sent
    ids: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what could not be read (not JSON, unexpected shapes)

    @property
    def tool_results(self) -> tuple[ToolResult, ...]:
        return tuple(r for m in self.messages for r in m.tool_results)


@fast_init
@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one answer, normalised (see the module's conventions), and the
    provider's own final usage object, kept for re-pricing."""

    input_tokens: int | None = None  # includes cache reads and writes
    output_tokens: int | None = None  # includes reasoning
    reasoning_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    total_tokens: int | None = None
    cost_usd: Decimal | None = None  # what the provider itself says the call cost (OpenRouter's usage.cost)
    # Of cache_write_tokens, those written to last an hour (Anthropic's `"ttl": "1h"`), which cost
    # more than the 5-minute writes the price tables list.
    cache_write_1h_tokens: int | None = None
    raw: dict[str, Any] | None = None  # the provider's final usage object, as sent


@fast_init
@dataclass(frozen=True, slots=True)
class ResponseError:
    """An error the upstream reported, in a body or inside a stream."""

    status: int | None = None
    type: str | None = None  # the provider's error type ("rate_limit_error", "insufficient_quota")
    code: str | int | None = None  # as the provider sent it: Gemini gives the HTTP status (429), OpenAI a string
    message: str | None = None
    request_id: str | None = None
    retry_after_seconds: float | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class Response:
    """What an answer said, streamed or not, as far as it could be understood."""

    api: str
    stream: bool | None = None
    complete: bool | None = None  # ended the way its format ends a good answer; None if unknown
    model: str | None = None  # what the upstream reports answered, not the alias asked for
    id: str | None = None  # the provider's response id (Responses' id chains previous_response_id)
    reasoning: str | None = None  # None when the model produced none
    redacted_reasoning_blocks: int = 0
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str | None = None  # the provider's own value, not normalised
    usage: Usage = field(default_factory=Usage)
    error: ResponseError | None = None
    notes: tuple[str, ...] = ()

    def message(self) -> Message:
        """The answer as an assistant turn: what a later request's history should repeat."""
        parts: list[Part] = []
        if self.reasoning:
            parts.append(Part("reasoning", text=self.reasoning))
        if self.content:
            parts.append(Part("text", text=self.content))
        parts.extend(Part("tool_call", tool_call=c) for c in self.tool_calls)
        return Message("assistant", tuple(parts))
