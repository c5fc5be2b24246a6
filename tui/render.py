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


def _text_of(content: Any) -> str:
    """Text of a message `content` in any dialect: a string, or a list of typed blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        return pretty_json(content)
    out: list[str] = []
    for block in content:
        if isinstance(block, str):
            out.append(block)
            continue
        if not isinstance(block, dict):
            out.append(pretty_json(block))
            continue
        kind = block.get("type")
        if "text" in block and isinstance(block["text"], str):
            out.append(block["text"])
        elif kind == "thinking":
            out.append(f"[thinking]\n{block.get('thinking', '')}")
        elif kind == "redacted_thinking":
            out.append("[redacted thinking]")
        elif kind == "tool_use":
            out.append(f"→ {block.get('name')}({pretty_arguments(block.get('input'))})")
        elif kind == "tool_result":
            out.append(f"← result for {block.get('tool_use_id')}:\n{_text_of(block.get('content'))}")
        elif kind in ("image", "image_url", "input_image") or "inlineData" in block or "inline_data" in block:
            out.append("[image]")
        elif "functionCall" in block:  # Gemini
            call = block["functionCall"] or {}
            out.append(f"→ {call.get('name')}({pretty_arguments(call.get('args'))})")
        elif "functionResponse" in block:
            resp = block["functionResponse"] or {}
            out.append(f"← {resp.get('name')}:\n{pretty_arguments(resp.get('response'))}")
        else:
            out.append(pretty_json(block))
    return "\n".join(out)


def _openai_tool_calls(msg: dict) -> str:
    lines = []
    for tc in msg.get("tool_calls") or []:
        fn = (tc or {}).get("function") or {}
        lines.append(f"→ {fn.get('name')}({pretty_arguments(fn.get('arguments'))})")
    return "\n".join(lines)


def conversation(body: Any) -> Conversation:
    """Read a request body of any supported dialect as a chat.

    Dialects are told apart by their keys, not by `calls.api`, so a body recorded as `other`
    still reads well when it looks like one of them."""
    conv = Conversation()
    if not isinstance(body, dict):
        conv.note = "the request body is not a JSON object"
        return conv
    # System prompts: Anthropic `system`, Responses `instructions`, Gemini `systemInstruction`,
    # Ollama generate `system`.
    system = body.get("system")
    if system:
        conv.system.append(_text_of(system))
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        conv.system.append(body["instructions"])
    si = body.get("systemInstruction") or body.get("system_instruction")
    if isinstance(si, dict):
        conv.system.append(_text_of(si.get("parts")))
    tools = body.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            if isinstance(tool, dict) and isinstance(tool.get("functionDeclarations"), list):
                conv.tools.extend(tool["functionDeclarations"])  # Gemini nests them
            else:
                conv.tools.append(tool)

    def add(role: str, text: str) -> None:
        conv.turns.append(Turn(role, clip(text, TURN_DISPLAY_LIMIT)))

    if isinstance(body.get("messages"), list):  # OpenAI chat, Anthropic, Ollama chat
        for msg in body["messages"]:
            if not isinstance(msg, dict):
                continue
            role = str(msg.get("role", "?"))
            text = _text_of(msg.get("content"))
            calls = _openai_tool_calls(msg)
            if calls:
                text = f"{text}\n{calls}" if text else calls
            if msg.get("tool_call_id"):
                role = f"{role} ({msg['tool_call_id']})"
            if role in ("system", "developer") and not conv.turns:
                conv.system.append(text)  # leading system turns are the system prompt
            else:
                add(role, text)
    elif "input" in body:  # OpenAI Responses
        items = body["input"]
        if isinstance(items, str):
            add("user", items)
        elif isinstance(items, list):
            for item in items:
                if not isinstance(item, dict):
                    add("user", _text_of(item))
                    continue
                kind = item.get("type")
                if kind == "function_call":
                    add("assistant", f"→ {item.get('name')}({pretty_arguments(item.get('arguments'))})")
                elif kind == "function_call_output":
                    add(f"tool ({item.get('call_id')})", _text_of(item.get("output")))
                elif kind == "reasoning":
                    add("reasoning", _text_of(item.get("summary")))
                else:
                    role = str(item.get("role", kind or "?"))
                    text = _text_of(item.get("content"))
                    if role in ("system", "developer") and not conv.turns:
                        conv.system.append(text)
                    else:
                        add(role, text)
    elif isinstance(body.get("contents"), list):  # Gemini
        for content in body["contents"]:
            if isinstance(content, dict):
                add(str(content.get("role", "user")), _text_of(content.get("parts")))
    elif isinstance(body.get("prompt"), str):  # Ollama generate, legacy completions
        add("user", body["prompt"])
    else:
        conv.note = "no messages, input, contents or prompt in this request body"
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
