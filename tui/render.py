"""Turning recorded bodies into something a person can read: chat turns, pretty JSON, a hex
dump, a curl command. Pure functions, no Textual, so they are tested on their own.
"""

from __future__ import annotations

import base64
import json
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from llmtap.dialects import registry
from llmtap.dialects.shapes import Message, Part, ToolSpec

# Display caps: a 50 MB body must not freeze the terminal; the full text stays in the DB.
BODY_DISPLAY_LIMIT = 256 * 1024
TURN_DISPLAY_LIMIT = 16 * 1024
MAX_TURNS = 400
HEX_DISPLAY_LIMIT = 16 * 1024

# Headers curl computes itself; copying them would make a replay lie about its own body.
_CURL_SKIP = {"content-length", "host", "connection", "transfer-encoding", "accept-encoding"}


@dataclass
class Turn:
    role: str
    text: str


@dataclass
class Conversation:
    """A request body seen as a chat: system prompt, tool definitions, then the turns."""

    system: list[str] = field(default_factory=list)
    tools: list[Any] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    note: str | None = None  # e.g. why the body could not be read as a chat


def parse_json(text: str | None) -> Any | None:
    if not text:
        return None
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return None


def as_datetime(value: Any) -> datetime | None:
    """A timestamp as a datetime: local readers give datetimes, a remote one ISO strings."""
    if value is None or isinstance(value, datetime):
        return value
    if isinstance(value, (int, float)):  # epoch milliseconds, as the UI's queries select them
        return datetime.fromtimestamp(value / 1000, tz=timezone.utc)
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def as_json_value(value: Any) -> Any:
    """A JSON column as a Python value (DuckDB returns JSON columns as text)."""
    if isinstance(value, str):
        parsed = parse_json(value)
        return parsed if parsed is not None else value
    return value


def clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n… {len(text) - limit:,} more characters not shown (see Raw / export)"


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def pretty_arguments(arguments: Any) -> str:
    """Tool-call arguments are stored verbatim (usually a JSON string): indent them if they parse."""
    if isinstance(arguments, str):
        parsed = parse_json(arguments)
        return pretty_json(parsed) if parsed is not None else arguments
    return pretty_json(arguments)


def _part_text(part: Part, in_tool_turn: bool) -> str | None:
    """One part of a message as the Conversation tab shows it."""
    if part.kind == "text":
        return part.text
    if part.kind == "reasoning":
        return "[redacted thinking]" if part.redacted else f"[thinking]\n{part.text or ''}"
    if part.kind == "tool_call" and part.tool_call is not None:
        call = part.tool_call
        return f"→ {call.name}({pretty_arguments(call.arguments)})"
    if part.kind == "tool_result" and part.tool_result is not None:
        result = part.tool_result
        if in_tool_turn:  # the turn's role already names the call it answers
            return result.content
        if result.name and not result.call_id:
            return f"← {result.name}:\n{pretty_arguments(result.content)}"
        return f"← result for {result.call_id or result.name}:\n{pretty_arguments(result.content)}"
    if part.kind in ("image", "audio", "file"):
        return f"[{part.kind}]"
    return pretty_arguments(part.text) if part.text else None


def _turn(msg: Message) -> Turn:
    if msg.role == "tool":
        ids = [r.call_id for r in msg.tool_results if r.call_id]
        base = msg.native_role if msg.native_role in ("tool", "function") else "tool"
        role = f"{base} ({ids[0]})" if ids else base
    else:
        role = msg.native_role or msg.role
    texts = [t for t in (_part_text(p, msg.role == "tool") for p in msg.parts) if t]
    return Turn(role, clip("\n".join(texts), TURN_DISPLAY_LIMIT))


def _tool(spec: ToolSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": spec.name}
    if spec.kind != "function":
        out["type"] = spec.kind
    if spec.description:
        out["description"] = spec.description
    if spec.parameters is not None:
        out["parameters"] = spec.parameters
    return out


def conversation(body: Any, api: str | None = None) -> Conversation:
    """A request body as a chat, read by its dialect (`api`, a `calls.api` value) into the
    normalised Request; a body of no known dialect (`other`, or None) is read as the format it
    looks like."""
    conv = Conversation()
    if not isinstance(body, dict):
        conv.note = "the request body is not a JSON object"
        return conv
    req = registry.read_request(api, body)
    conv.system = [s for s in req.system if s]
    conv.tools = [_tool(t) for t in req.tools]
    conv.turns = [_turn(m) for m in req.messages if m.role != "system"]
    if not req.messages and not req.system:
        conv.note = "no conversation in this request body" + (f" ({'; '.join(req.notes)})" if req.notes else "")
    if len(conv.turns) > MAX_TURNS:
        hidden = len(conv.turns) - MAX_TURNS
        conv.turns = conv.turns[-MAX_TURNS:]
        conv.note = f"the first {hidden} turns are not shown (see Raw)"
    return conv


def body_for_display(text: str | None, raw: bytes | None, limit: int = BODY_DISPLAY_LIMIT) -> tuple[str, str | None]:
    """(text to show, note or None): pretty JSON when it parses, SSE/NDJSON as is, a hex dump
    for bytes that are not UTF-8, truncated beyond `limit`."""
    note: str | None
    if text is None and raw is not None:
        data = bytes(raw)
        shown = data[:HEX_DISPLAY_LIMIT]
        note = f"not UTF-8: {len(data):,} bytes shown as a hex dump"
        if len(data) > len(shown):
            note += f" (first {len(shown):,} bytes)"
        return hexdump(shown), note
    if not text:
        return "", "empty"
    note = None
    if len(text) <= limit:
        parsed = parse_json(text)
        if parsed is not None and isinstance(parsed, (dict, list)):
            return pretty_json(parsed), None
    if len(text) > limit:
        note = f"{len(text):,} characters; the first {limit:,} are shown (the full body is in the DB)"
        text = text[:limit]
    return text, note


def hexdump(data: bytes, width: int = 16) -> str:
    lines = []
    for off in range(0, len(data), width):
        chunk = data[off:off + width]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:08x}  {hexes:<{width * 3}} {text}")
    return "\n".join(lines)


def curl_command(method: str, url: str, headers: dict[str, Any] | None, body: str | None,
                 body_raw: bytes | None = None) -> str:
    """A shell command replaying the request. Redacted header values stay redacted: the user
    pastes their own key back in, llmtap never held it."""
    parts = ["curl", "-X", method or "POST", _sq(url)]
    for name, value in (headers or {}).items():
        if name.lower() in _CURL_SKIP or name.startswith(":"):
            continue
        parts += ["-H", _sq(f"{name}: {value}")]
    if body:
        parts += ["--data-binary", _sq(body)]
        return " ".join(parts)
    if body_raw:
        # Bytes a shell string cannot carry: decode them from base64 on the way in.
        b64 = base64.b64encode(bytes(body_raw)).decode()
        return f"printf %s {shlex.quote(b64)} | base64 -d | " + " ".join(parts + ["--data-binary", "@-"])
    return " ".join(parts)


def _sq(text: str) -> str:
    """Always single-quote (shlex.quote leaves plain words bare): one shape for every argument."""
    return "'" + text.replace("'", "'\"'\"'") + "'"


def fmt_ms(value: Any) -> str:
    if value is None:
        return ""
    v = float(value)
    return f"{v / 1000:.1f}s" if v >= 10_000 else f"{v:.0f}ms"


def fmt_tokens(value: Any) -> str:
    if value is None:
        return ""
    v = int(value)
    return f"{v / 1000:.1f}k" if v >= 100_000 else str(v)
