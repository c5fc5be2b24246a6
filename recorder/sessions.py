"""Sessions: the runs of an agent, rebuilt from its traffic.

A call joins a session by the strongest evidence it carries, in this order, and its row says
which (`calls.session_link`) and to which earlier call (`calls.parent_call_id`), so that a
wrong grouping can be seen and explained:

1. an id the client sends: llmtap's own `x-llmtap-session` header, the ones tools send already
   (`header:<name>`), or an id in the body (`body:<field>`; `body:previous_response_id` chains
   a Responses call to the call that answered with that id);
2. a label the user gave without touching the tool: `llmtap wrap --session NAME` (`label:wrap`)
   or the gateway path prefix `/s/NAME/` (`label:path`);
3. tool-call continuity: the request's tool results answer tool calls an earlier answer made
   (`tool_call:<id>`);
4. conversation growth: the request's messages are an earlier request's messages plus that
   call's answer, system prompts left out as agents rewrite them every turn (`history`); or
   the history was compacted and only its last exchange is still there (`history:compacted`);
   or a fresh prompt (one that carries no earlier answer) quotes an earlier answer that called
   no tools, as a research pipeline hands one step's answer to the next (`quote`);
5. else a new session (`new`); a call that would continue a session idle for longer than
   `idle_s` starts a new one instead (`idle`, its parent the call it would have continued).

Ids a tool sends for its session (headers) and labels name their session whatever the gap;
ids in the body are weaker (OpenAI's `user` names a person, not a task): the idle gap splits
them too.

Matching is a few dict lookups per call: each finished call leaves fingerprints (hashes of
normalised messages, kept in memory only) of what its continuation would carry, in an LRU per
client, so memory is bounded whatever the traffic. Reading a request and hashing it is most of
the work, and it is done where the bodies are read (`Facts`, made in the recorder's extraction
helpers under load: workers.py), so the hashes are stable ones, the same in every process. The
grouper itself runs on the writer thread as rows are made, lookups only; the sessions a batch
touched are written in its calls' transaction, and should the database refuse those rows, the
calls are committed again without them (Recorder._commit_with_sessions): nothing wrong with a
session row costs a call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from itertools import repeat
from typing import Any, NamedTuple

from llmtap.dialects import openai_chat as chat
from llmtap.dialects import registry as dialects
from llmtap.dialects.base import ids_of
from llmtap.dialects.openai_responses import RESPONSES
from llmtap.dialects.shapes import Message, Request, Response, ToolCall
from llmtap.recorder.extract import json_object

# The headers tools already send for their session, lowercase, strongest first.
SESSION_HEADERS: tuple[str, ...] = (
    "x-llmtap-session",
    "x-claude-code-session-id",  # Claude Code
    "session-id",  # Codex
    "helicone-session-id",
    "x-litellm-session-id",
)
# Ids in a request body (dialects' Request.ids names), strongest first.
BODY_IDS: tuple[str, ...] = ("previous_response_id", "metadata.user_id", "prompt_cache_key", "user")
DEFAULT_IDLE_S = 30 * 60.0
TITLE_CHARS = 120
# Memory bounds: clients (User-Agents) followed, fingerprints per client, sessions kept whole.
MAX_CLIENTS = 64
KEYS_PER_CLIENT = 4096
MAX_SESSIONS = 20_000
MAX_NAMED = 65_536
# A quote is found by runs of QUOTE_WORDS words an answer had, QUOTE_HITS of them at least (one
# common phrase is not a quote); of an answer its first QUOTE_ANSWER_WORDS words count, of a
# fresh prompt (see facts_of) its first QUOTE_SCAN_CHARS characters. Every run counts (no
# sampling): the quotes that tie a research pipeline are often short, a question of ten words.
QUOTE_WORDS = 5  # _shingles spells its runs out, five slices
QUOTE_HITS = 2
QUOTE_ANSWER_WORDS = 1024
QUOTE_SCAN_CHARS = 16 << 10
QUOTES_PER_CLIENT = 16_384
# What a restarted recorder reads back of the calls it recorded (SessionStore.recall).
RECALL_CALLS = 512
RECALL_BYTES = 32 << 20

# Columns of the `sessions` table, in its order (schema.py creates it from this).
SESSION_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("id", "VARCHAR PRIMARY KEY", "the id of the session's first call"),
    ("source", "VARCHAR NOT NULL", "how it was found: its first call's session_link"),
    ("key", "VARCHAR", "the id or label that names it, NULL when inferred"),
    ("client", "VARCHAR", "User-Agent of its first call"),
    ("title", "VARCHAR", "the first user message, shortened"),
    ("started_at", "TIMESTAMPTZ NOT NULL", "its first call's start"),
    ("ended_at", "TIMESTAMPTZ NOT NULL", "its last call's end"),
    ("duration_ms", "DOUBLE", "ended_at - started_at"),
    ("calls", "BIGINT NOT NULL", ""),
    ("errors", "BIGINT NOT NULL", "calls that ended in an error the client saw, or a cut stream"),
    ("failed", "BOOLEAN NOT NULL", "errors > 0"),
    ("fallbacks", "BIGINT NOT NULL", "calls that needed more than one attempt"),
    ("input_tokens", "BIGINT", ""),
    ("output_tokens", "BIGINT", ""),
    ("cost_usd", "DECIMAL(38,12)", "sum of calls.cost_usd; NULL when no call is priced"),
    ("last_call_id", "VARCHAR", ""),
)
SESSION_FIELDS: tuple[str, ...] = tuple(c[0] for c in SESSION_COLUMNS)


class Answer(NamedTuple):
    """What grouping reads of an answer: a dialect's Response's fields of the same names, as
    extraction found them (`response_of`). A tuple: a helper makes one for every call it reads,
    where building a frozen Response of thirteen fields took twice as long."""

    id: str | None
    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning: str | None = None


# What grouping reads an answer from: a dialect's whole Response, or extraction's Answer.
AnswerLike = Response | Answer


@dataclass(slots=True)
class CallInfo:
    """What grouping reads of one finished call. Not frozen: made for every call on the
    writer's thread, and a frozen dataclass sets each of its fields the slow way."""

    id: str
    started_at: datetime
    client: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    label: tuple[str, str] | None = None  # ("wrap" | "path", NAME)
    # What grouping reads of the request and answer; made from `request` and `response` when
    # not given (see `facts_of`).
    facts: Facts | None = None
    request: Request | None = None
    response: AnswerLike | None = None
    response_id: str | None = None  # the answer's id, when `response` is not given
    duration_ms: float | None = None
    failed: bool = False
    fallback: bool = False
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: Decimal | None = None
    # What of the facts is stored (the title, ids in the body) goes through this first: the
    # call's scrubber. Called only for what is stored, which most calls are not.
    mask: Callable[[str | None], str | None] | None = None
    # Where the conversation as sent has its last answer, and how many items it has (the
    # request may be read cut to a few messages: see `trimmed`); None: from `request.messages`.
    answer_at: int | None = None
    history_len: int | None = None

    @property
    def ended_at(self) -> datetime:
        # Positional: timedelta's keywords cost twice as much, read once or twice a call.
        return self.started_at + timedelta(0, 0, 0, self.duration_ms or 0.0)


class Facts(NamedTuple):
    """What grouping reads of one call's request and answer, read and hashed where the bodies
    are (a helper process under load): the writer then only looks these up and stores them.
    Word-run hashes are `_shingles` bytes. A tuple: it crosses the helpers' pipe at C speed."""

    readable: bool = False  # the request had a conversation to read (else only ids count)
    ids: tuple[tuple[str, str], ...] = ()  # Request.ids, unmasked: the writer masks what it stores
    title: str | None = None  # likewise
    results: tuple[str, ...] = ()  # the call ids this turn's tool results answer
    grow: int | None = None  # this request as an earlier one grown by that call's answer
    tail: int | None = None  # its last exchange, for a history compacted around it
    quotes: bytes = b""  # word runs of this turn's user text (`_shingles`)
    # What this call's continuation will carry:
    calls: tuple[str, ...] = ()  # the answer's tool call ids
    next_grow: int | None = None
    next_tail: int | None = None
    said: bytes = b""  # word runs of the answer's text


class Link(NamedTuple):
    """Where a call went: `calls.session_id`, `session_link`, `parent_call_id`, `turn`. A tuple:
    one is made for every call, on the writer's thread, where a frozen dataclass set each field
    the slow way."""

    session_id: str
    link: str
    parent_call_id: str | None
    turn: int


_NO_HEADERS: dict[str, str] = {}  # a call's headers when it sent none of SESSION_HEADERS; never written to
_NO_FACTS = Facts()
_new_tuple = tuple.__new__


@dataclass(slots=True)
class Session:
    id: str
    source: str
    key: str | None
    client: str | None
    title: str | None
    started_at: datetime
    ended_at: datetime
    calls: int = 0
    errors: int = 0
    fallbacks: int = 0
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: Decimal | None = None
    last_call_id: str | None = None
    written: bool = False  # a row for it is in the table already (replace, not insert)

    def row(self) -> tuple:
        duration = (self.ended_at - self.started_at).total_seconds() * 1000.0
        return (self.id, self.source, _utf8(self.key), _utf8(self.client), _utf8(self.title), self.started_at,
                self.ended_at,
                duration, self.calls, self.errors, self.errors > 0, self.fallbacks, self.input_tokens,
                self.output_tokens, self.cost_usd, self.last_call_id)

    @classmethod
    def from_row(cls, row: tuple) -> Session:
        d = dict(zip(SESSION_FIELDS, row))
        return cls(id=d["id"], source=d["source"], key=d["key"], client=d["client"], title=d["title"],
                   started_at=d["started_at"], ended_at=d["ended_at"], calls=d["calls"], errors=d["errors"],
                   fallbacks=d["fallbacks"], input_tokens=d["input_tokens"], output_tokens=d["output_tokens"],
                   cost_usd=d["cost_usd"], last_call_id=d["last_call_id"], written=True)


def _utf8(text: str | None) -> str | None:
    """Text DuckDB takes: bytes a header carried that are not UTF-8 (kept as surrogates) become U+FFFD."""
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class _Lru:
    """At most `cap` entries, the least recently used dropped first (roughly: the newest
    `cap // 2` are always kept), in two generations of plain dicts: a put is one
    dict store, a look one or two dict reads, where an OrderedDict moved its entry at every
    touch; the writer makes a few of each per call. An entry found in the older generation
    moves to the newer; the older is dropped whole when the newer is full."""

    __slots__ = ("half", "new", "old")

    def __init__(self, cap: int) -> None:
        self.half = max(cap // 2, 1)
        self.new: dict[Any, Any] = {}
        self.old: dict[Any, Any] = {}

    def put(self, key: Any, value: Any) -> None:
        new = self.new
        new[key] = value
        if len(new) >= self.half:
            self.old, self.new = new, {}

    def look(self, key: Any) -> Any:
        value = self.new.get(key)
        if value is None:
            value = self.old.get(key)
            if value is not None:
                self.put(key, value)
        return value

    get = look

    def __contains__(self, key: Any) -> bool:
        return key in self.new or key in self.old

    def __len__(self) -> int:
        return len(self.new.keys() | self.old.keys())


class _Quotes(_Lru):
    """Word-run hash -> (session id, call id), bounded as `_Lru`, so that an answer's thousand
    runs are put, and a prompt's looked up, in a few C calls instead of a thousand single ones."""

    __slots__ = ()

    def put_all(self, runs: memoryview, where: tuple[str, str]) -> None:
        if len(self.new) + len(runs) > self.half:  # an answer has at most QUOTE_ANSWER_WORDS runs
            self.old, self.new = self.new, {}
        self.new.update(zip(runs, repeat(where)))

    def hits(self, runs: memoryview) -> Counter[tuple[str, str]]:
        """How many of `runs` each earlier answer had."""
        found = Counter(filter(None, map(self.new.get, runs)))
        if self.old:
            # A run in both generations counts once, for its newer answer.
            found.update(w for h, w in zip(runs, map(self.old.get, runs)) if w is not None and h not in self.new)
        return found


def _norm_text(text: str) -> str:
    # Most text is spaced by single spaces already, which two C scans tell (every other
    # whitespace character is not printable): splitting it into words to join them again
    # costs about a thousand instructions a word.
    if "  " not in text and text.isprintable():
        return text.strip(" ")
    return " ".join(text.split())


def _call_key(c: ToolCall) -> str:
    if c.id:
        return "#" + c.id
    # No id (Ollama, old Gemini): the arguments as a client would send them back, re-serialised.
    try:
        args = json.dumps(json.loads(c.arguments or "null"), sort_keys=True, separators=(",", ":"))
    except ValueError:
        args = _norm_text(c.arguments or "")
    return f"{c.name}({args})"


class _Turn(NamedTuple):
    """One message as a fingerprint reads it (`norm`): its role, its text parts, what else of
    it a client resends unchanged (tool calls by id, tool results, media kinds) in order, and
    the call ids its tool results answer. Made from a dialect's Message (`_turn_of`), or
    straight from the JSON for the shapes agents send most (`_chat_turns`)."""

    role: str
    texts: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()
    results: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """Message.text: the text parts joined by newlines."""
        return "\n".join(self.texts)

    def norm(self) -> str:
        """Reasoning is left out (clients drop it or send it encrypted), text is compared
        without the whitespace around it (clients strip an answer they resend) and as one piece
        (a client may join or split an answer's text blocks), and a tool call is its id (its
        arguments come back re-serialised)."""
        return "\x1f".join((self.role, "".join(self.texts).strip(), *self.extras))


def _joined(a: _Turn, b: _Turn) -> _Turn:
    return _Turn(a.role, a.texts + b.texts, a.extras + b.extras, a.results + b.results)


def _turn_of(m: Message) -> _Turn:
    texts: list[str] = []
    extras: list[str] = []
    results: list[str] = []
    for p in m.parts:
        if p.kind == "text" and p.text:
            texts.append(p.text)
        if p.tool_call is not None:
            extras.append(_call_key(p.tool_call))
        elif p.tool_result is not None:
            r = p.tool_result
            extras.append(f"<{r.call_id or r.name}>{r.content.strip()}")
            if r.call_id:
                results.append(r.call_id)
        elif p.kind in ("image", "audio", "file"):
            extras.append(p.kind)
    return _Turn(m.role, tuple(texts), tuple(extras), tuple(results))


def _answer_turn(resp: AnswerLike) -> _Turn | None:
    """`_turn_of(resp.message())`, without building the message; None when it would have no parts."""
    if not (resp.reasoning or resp.content or resp.tool_calls):
        return None
    return _Turn("assistant", (resp.content,) if resp.content else (), tuple(map(_call_key, resp.tool_calls)))


def _chat_turns(items: list) -> list[_Turn] | None:
    """Chat Completions messages read straight from their JSON into what `_turn_of` makes of
    the dialect's reading (openai_chat.read_messages), for the shapes agents send: text, tool
    calls with ids, tool results as text. None at anything else (media, refusals, calls
    without ids, the deprecated function_call, ...), which the dialect reads instead. Building
    shapes only to reduce them to these was about a third of grouping's cost on a small agent call."""
    out: list[_Turn] = []
    for msg in items:
        if not isinstance(msg, dict):
            return None
        native = msg.get("role")
        role = chat.ROLES.get(native, "user") if isinstance(native, str) else "user"
        content = msg.get("content")
        texts: tuple[str, ...] = ()
        extras: tuple[str, ...] = ()
        results: tuple[str, ...] = ()
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id or not (content is None or isinstance(content, str)):
                return None
            extras, results = (f"<{call_id}>{(content or '').strip()}",), (call_id,)
        elif isinstance(content, str):
            texts = (content,) if content else ()
        elif isinstance(content, list):
            got: list[str] = []
            for part in content:
                if isinstance(part, str):
                    text = part
                elif isinstance(part, dict) and part.get("type") in chat.TEXT_KINDS and isinstance(part.get("text"), str):
                    text = part["text"]
                else:
                    return None
                if text:
                    got.append(text)
            texts = tuple(got)
        elif content is not None:
            return None
        calls = msg.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                return None
            keys = list(extras)
            for tc in calls:
                tid = tc.get("id") if isinstance(tc, dict) else None
                if not isinstance(tid, str) or not tid:
                    return None
                keys.append("#" + tid)
            extras = tuple(keys)
        if msg.get("function_call") is not None:
            return None
        out.append(_Turn(role, texts, extras, results))
    return out


def _conversation(turns: list[_Turn]) -> list[_Turn]:
    # System prompts change under an agent every turn (dates, environment details): left out.
    # Consecutive assistant messages are one turn (a client may split text and tool calls).
    out: list[_Turn] = []
    for t in turns:
        if t.role == "system":
            continue
        if out and t.role == "assistant" and out[-1].role == "assistant":
            out[-1] = _joined(out[-1], t)
            continue
        out.append(t)
    return out


class _Conv:
    """A request's conversation, each message normalised and hashed at most once: the first
    message (often a long task statement) is in both fingerprints a call leaves."""

    def __init__(self, turns: list[_Turn]) -> None:
        self.msgs = _conversation(turns)
        self._hashes: dict[int, int] = {}

    def hash(self, i: int) -> int:
        got = self._hashes.get(i)
        if got is None:
            got = self._hashes[i] = _norm_digest(self.msgs[i] if i >= 0 else None)
        return got


def _digest(data: bytes) -> int:
    """A stable 64-bit hash: fingerprints made in a helper process meet those made in the
    writer (Python's `hash` of a string differs between processes). CRC-32 and Adler-32 side
    by side: a fingerprint, not a signature, at a fifth of blake2b's time on a long history."""
    return zlib.crc32(data) << 32 | zlib.adler32(data)


def _norm_digest(t: _Turn | None) -> int:
    """A message's `_digest`, as its fingerprint reads it (`_Turn.norm`); None: before the first."""
    return _digest(t.norm().encode("utf-8", "surrogatepass") if t is not None else b"")


# A fingerprint of messages' hashes: its kind, where in the history the answer sits, and three
# hashes, packed, so that a long message is encoded and hashed once, not once per fingerprint.
_FINGERPRINT = struct.Struct("<BqQQQ")
_GROW, _TAIL = 1, 2


def _grow_key(conv: _Conv, i: int, depth: int, answer: int) -> int:
    # What a continuation carries around the answer: the conversation's first message, the
    # message the answer answered, the answer, and where in the history it sits. O(1) messages
    # per call, where a hash of the whole prefix would read the whole history (agents resend it
    # every turn); a history cut in the middle moves the answer, and is matched by its tail.
    first = conv.hash(0) if i > 0 else answer
    return _digest(_FINGERPRINT.pack(_GROW, depth, first, conv.hash(i - 1), answer))


def _tail_key(before: int, answer: int) -> int:
    return _digest(_FINGERPRINT.pack(_TAIL, 0, 0, before, answer))


def _answer_start(roles: list[str | None]) -> int | None:
    """The index where the last run of assistant items begins."""
    j = next((i for i in range(len(roles) - 1, -1, -1) if roles[i] == "assistant"), None)
    while j and roles[j - 1] == "assistant":
        j -= 1
    return j


def _this_turn(msgs: list[_Turn]) -> list[_Turn]:
    for i in range(len(msgs) - 1, -1, -1):
        if msgs[i].role == "assistant":
            return msgs[i + 1:]
    return msgs


# Bytes that end a word: ASCII that is not a letter, digit or underscore. UTF-8's multi-byte
# characters stay inside words.
_NOT_WORD = bytes(c if chr(c).isalnum() or c == 95 or c >= 128 else 32 for c in range(256))


def _shingles(text: str, words: int | None = None) -> bytes:
    """Hashes of the runs of QUOTE_WORDS words, once each, ASCII case and punctuation aside,
    as native int64 bytes (`_runs` reads them), which cross a pipe as one object. Stable in
    every process: a word is its CRC-32, a run the hash of a tuple of ints (no seed in that).
    Each step is one C call over the whole text; still about 3,500 instructions a word, which
    is why only fresh prompts and answers without tool calls are read for quotes."""
    data = text[:QUOTE_SCAN_CHARS].encode("utf-8", "surrogatepass").lower().translate(_NOT_WORD)
    w = list(map(zlib.crc32, data.split()[:words]))
    runs = map(hash, zip(w, w[1:], w[2:], w[3:], w[4:]))  # QUOTE_WORDS of them
    unique = set(runs)
    return struct.pack(f"{len(unique)}q", *unique)  # half what array("q", unique) costs


def _runs(data: bytes) -> memoryview:
    return memoryview(data).cast("q")


def facts_of(req: Request | None, resp: AnswerLike | None, answer_at: int | None = None,
             history_len: int | None = None) -> Facts:
    """What grouping reads of a call: `answer_at` and `history_len` as `trimmed` gives them
    (None: from `req.messages`, read whole)."""
    if req is None:
        return Facts()
    ids = tuple((k, str(v)) for k, v in req.ids.items() if v)
    return _facts([_turn_of(m) for m in req.messages], ids, resp, answer_at, history_len)


def _facts(turns: list[_Turn], ids: tuple[tuple[str, str], ...], resp: AnswerLike | None, answer_at: int | None,
           history_len: int | None) -> Facts:
    conv = _Conv(turns)
    msgs = conv.msgs
    turn = _this_turn(msgs)
    results = tuple(r for m in (turn or msgs) for r in m.results)
    grow = tail = None
    last = next((i for i in range(len(msgs) - 1, -1, -1) if msgs[i].role == "assistant"), None)
    # Tool results continue the call whose answer made those calls, by their ids, and the
    # grouper tries them before the history; an answer that calls tools is continued by their
    # results (the APIs refuse a history that leaves one unanswered). So the history is
    # fingerprinted only where no tool call ties it: on an agent's tool loop that is most of
    # the hashing a call did, for a match the ids had already made.
    if last is not None and not (turn and results):
        depth = answer_at if answer_at is not None else _answer_start([t.role for t in turns])
        said_before = conv.hash(last)
        grow = _grow_key(conv, last, depth or 0, said_before)
        tail = _tail_key(conv.hash(last - 1), said_before)
    # Quotes tie fresh prompts (a pipeline's next step, a history replaced by its summary):
    # a request that carries an earlier answer is matched by its history. Scanning every agent
    # turn's text for quotes too (Cline's tool results come as user text: QUOTE_SCAN_CHARS of
    # it, about 2,500 words) would cost more than reading the call's answer.
    text = "\n".join(m.text for m in turn if m.role == "user") if last is None else ""
    quotes = _shingles(text) if text else b""
    calls: tuple[str, ...] = ()
    next_grow = next_tail = None
    said = b""
    if resp is not None:
        calls = tuple(tc.id for tc in resp.tool_calls if tc.id)
        answer = _answer_turn(resp) if not calls else None
        if answer is not None:
            at = len(msgs)
            depth = history_len if history_len is not None else len(turns)
            if at and msgs[-1].role == "assistant":  # a prefill: the answer continues that turn
                answer = _joined(msgs[-1], answer)
                at -= 1
                depth = answer_at if answer_at is not None else depth - 1
            said_now = _norm_digest(answer)
            next_grow = _grow_key(conv, at, depth, said_now)
            next_tail = _tail_key(conv.hash(at - 1), said_now)
            if resp.content and not resp.tool_calls:  # an answer that calls tools goes on by their results
                said = _shingles(resp.content, QUOTE_ANSWER_WORDS)
    return Facts(readable=True, ids=ids, title=_title(turns), results=results, grow=grow, tail=tail,
                 quotes=quotes, calls=calls, next_grow=next_grow, next_tail=next_tail, said=said)


_CHAT_ID_KEYS = frozenset(name.split(".")[0] for name in chat.ID_FIELDS)  # most bodies carry none


def read_facts(api: str, body: str | bytes | dict | None, response: AnswerLike | None) -> Facts:
    """`facts_of` a request body as it crossed (or already parsed) and its answer. Never raises:
    a body of a shape nobody expected is grouped as having no conversation."""
    try:
        doc = _json_object(body)
        if api == chat.CHAT.name and doc is not None and isinstance(doc.get("messages"), list):
            ids = () if doc.keys().isdisjoint(_CHAT_ID_KEYS) else tuple(ids_of(doc, chat.ID_FIELDS).items())
            looped = _tool_loop_facts(doc["messages"], ids, response)
            if looped is not None:
                return looped
            cut, answer_at, history_len = trimmed(doc)
            turns = _chat_turns(cut["messages"])
            if turns is not None:
                return _facts(turns, ids, response, answer_at, history_len)
        request, answer_at, history_len = read_request(api, doc)
        return facts_of(request, response, answer_at, history_len)
    except Exception:
        return Facts()


# Roles every reading of a Chat Completions message agrees on (`trimmed` reads Responses items
# and Gemini's "model" too): the messages `_tool_loop_facts` reads must have one of them.
_PLAIN_ROLES = frozenset(("system", "developer", "user", "assistant", "tool"))


def _plain_role(item: Any) -> str | None:
    """A message's role, mapped as chat.ROLES maps it, when it is a plain one; else None."""
    if not isinstance(item, dict) or "type" in item:
        return None
    native = item.get("role")
    return chat.ROLES[native] if isinstance(native, str) and native in _PLAIN_ROLES else None


def _tool_loop_facts(items: list, ids: tuple[tuple[str, str], ...], resp: AnswerLike | None) -> Facts | None:
    """`_facts` of the most common agent turn, read from the turn alone: its tool results
    answer the last answer's calls and its own answer calls tools. Such a call is tied both
    ways by call ids and leaves no fingerprint of its history (see `_facts`), so of the
    history it needs only the first user message (the title); reading the whole of it, which
    an agent resends every turn, was most of what grouping cost such a call. None when the
    call is not of that shape, or the messages it reads are not plain ones read straight from
    the JSON (`_plain_role`, `_chat_turns`): then the whole reading decides."""
    calls = tuple(tc.id for tc in resp.tool_calls if tc.id) if resp is not None else ()
    if not calls:
        return None
    i = len(items)
    while i and (role := _plain_role(items[i - 1])) != "assistant":
        if role is None:
            return None
        i -= 1
    first = 0
    while first < i and (role := _plain_role(items[first])) != "user":
        if role is None:
            return None
        first += 1
    if first >= i:  # no answer yet (a fresh prompt), or none of the user's before it
        return None
    turn, head = _chat_turns(items[i:]), _chat_turns(items[first:first + 1])
    if not turn or not head:
        return None
    results = tuple(r for m in turn for r in m.results)
    title = _title(head)
    if not results or title is None:  # untied, or an empty first prompt: the title is a later one's
        return None
    return Facts(readable=True, ids=ids, title=title, results=results, calls=calls)


def _title(turns: list[_Turn]) -> str | None:
    for t in turns:
        if t.role == "user":
            text = _head(t.text, TITLE_CHARS + 1, TITLE_CHARS * 4)
            if text:
                return text if len(text) <= TITLE_CHARS else text[: TITLE_CHARS - 1] + "…"
    return None


def _head(text: str, want: int, most: int) -> str:
    """`_norm_text(text[:most])` cut to `want` characters or more. Normalising a prefix gives a
    prefix of the whole's, so a longer piece is read only where whitespace runs shrank the
    first: a task statement is often pages long, and the title of every call is made."""
    n = want
    while True:
        got = _norm_text(text[:n])
        if len(got) >= want or n >= most or n >= len(text):
            return got
        n = min(n * 2, most)


class Grouper:
    """Assigns each finished call to a session, in the order calls finish. Not thread-safe:
    the writer thread owns it. `load(id)` reads a session evicted from memory (or written by
    an earlier run) back from the store; `named(key)` finds the session an id or label names."""

    def __init__(self, idle_s: float = DEFAULT_IDLE_S, *, load: Any = None, named: Any = None) -> None:
        self.idle = timedelta(seconds=idle_s)
        self._load = load
        self._named_in_store = named
        self._sessions: _Lru = _Lru(MAX_SESSIONS)
        self._named: _Lru = _Lru(MAX_NAMED)  # "header:x-llmtap-session=abc" -> session id
        self._clients: _Lru = _Lru(MAX_CLIENTS)  # client -> _Lru of fingerprint -> (session id, call id)
        self._quotes: _Lru = _Lru(MAX_CLIENTS)  # client -> _Quotes
        self._responses: _Lru = _Lru(MAX_NAMED)  # Responses' response id -> (session id, call id)
        self.dirty: dict[str, Session] = {}  # touched since the last write

    # -- the one entry point ------------------------------------------------------------------
    def add(self, c: CallInfo) -> Link:
        f = c.facts if c.facts is not None else facts_of(c.request, c.response, c.answer_at, c.history_len)
        ended = c.ended_at  # once: a new session starts with it, and every call's moves its end
        named: str | None = None
        link, parent = "", None
        if c.headers or f.ids or c.label is not None:  # most calls carry none of these
            named, link, parent = self._explicit(c, f)
            named = _utf8(named)  # a header's bytes that are not UTF-8: the key is looked up in the store
        session: Session | None = None
        if named is not None:
            session = self._session(self._named.look(named) or self._from_store(named))
            found = self._structural(c, f)
            if session is not None and found is not None and found[2] == session.id:
                parent = parent or found[1]
            if session is not None and link.startswith("body:") and link != "body:previous_response_id" \
                    and c.started_at - session.ended_at > self.idle:
                link, parent = "idle", session.last_call_id
                session = None
            elif session is not None:
                parent = parent or session.last_call_id
        else:
            found = self._structural(c, f)
            if found is not None:
                link, parent, sid = found
                session = self._session(sid)
                if session is not None and c.started_at - session.ended_at > self.idle:
                    session, link = None, "idle"
            else:
                link, parent = "new", None
        if session is None:
            session = Session(id=c.id, source=link, key=named, client=c.client, title=self._title(c, f),
                              started_at=c.started_at, ended_at=ended)
            self._sessions.put(session.id, session)
        if named is not None and not named.startswith("session="):
            self._named.put(named, session.id)
        self._account(session, c, f, ended)
        rid = c.response_id or (c.response.id if c.response is not None else None)
        self._leave((session.id, c.id), c.client, rid, f)
        # tuple.__new__, as Link's own __new__ does, without the Python call around it.
        return _new_tuple(Link, (session.id, link, parent, session.calls))

    # -- evidence -------------------------------------------------------------------------------
    def _explicit(self, c: CallInfo, f: Facts) -> tuple[str | None, str, str | None]:
        """(the key naming the session, the link, the parent call) for rungs 1 and 2."""
        # Most calls carry neither headers nor ids: the loops are skipped, not run empty.
        for name in SESSION_HEADERS if c.headers else ():
            value = c.headers.get(name)
            if value:
                # llmtap's own header is a name the user chose; another tool's id is kept only
                # as a hash, as the record masks headers named *session*.
                shown = value if name == "x-llmtap-session" else hashlib.sha256(value.encode()).hexdigest()[:16]
                return f"header:{name}={shown}", f"header:{name}", None
        if f.ids:
            ids = dict(f.ids)
            prev = ids.get("previous_response_id")
            if prev and prev in self._responses:
                sid, call_id = self._responses.look(prev)
                return f"session={sid}", "body:previous_response_id", call_id
            for name in BODY_IDS[1:]:
                value = ids.get(name)
                if value:
                    return f"body:{name}={c.mask(value) if c.mask else value}", f"body:{name}", None
        if c.label is not None:
            kind, name = c.label
            return f"label={name}", f"label:{kind}", None
        return None, "", None

    def _structural(self, c: CallInfo, f: Facts) -> tuple[str, str | None, str] | None:
        """(link, parent call, session id) from tool-call continuity, then conversation growth."""
        keys = self._clients.get(c.client)
        if not f.readable or keys is None:
            return None
        for call_id in f.results:
            hit = keys.look(("tool", call_id))
            if hit is not None:
                return f"tool_call:{call_id}", hit[1], hit[0]
        if f.grow is not None:
            hit = keys.look(f.grow)
            if hit is not None:
                return "history", hit[1], hit[0]
            hit = keys.look(f.tail)
            if hit is not None:
                return "history:compacted", hit[1], hit[0]
        quotes = self._quotes.get(c.client)
        if quotes is not None and f.quotes:
            hits = quotes.hits(_runs(f.quotes))
            best = max(hits.items(), key=lambda kv: (kv[1], kv[0][1]), default=None)
            if best is not None and best[1] >= QUOTE_HITS:
                (sid, call_id), _ = best
                return "quote", call_id, sid
        return None

    # -- bookkeeping ----------------------------------------------------------------------------
    def _session(self, sid: str | None) -> Session | None:
        if sid is None:
            return None
        s = self._sessions.look(sid)
        if s is None:
            # Dropped from memory before its row was written, the store's row is older.
            s = self.dirty.get(sid)
            if s is None and self._load is not None:
                row = self._load(sid)
                s = Session.from_row(row) if row is not None else None
            if s is not None:
                self._sessions.put(sid, s)
        return s

    @staticmethod
    def _title(c: CallInfo, f: Facts) -> str | None:
        return c.mask(f.title) if c.mask is not None and f.title else f.title

    def _from_store(self, key: str) -> str | None:
        if self._named_in_store is None or key.startswith("session="):
            return key[len("session="):] if key.startswith("session=") else None
        return self._named_in_store(key)

    def _account(self, s: Session, c: CallInfo, f: Facts, ended: datetime) -> None:
        s.calls += 1
        s.errors += c.failed
        s.fallbacks += c.fallback
        if c.input_tokens is not None:
            s.input_tokens = (s.input_tokens or 0) + c.input_tokens
        if c.output_tokens is not None:
            s.output_tokens = (s.output_tokens or 0) + c.output_tokens
        if c.cost_usd is not None:
            s.cost_usd = (s.cost_usd or Decimal(0)) + c.cost_usd
        if ended > s.ended_at:
            s.ended_at = ended
        if s.title is None:
            s.title = self._title(c, f)
        s.last_call_id = c.id
        self.dirty[s.id] = s

    def recall(self, session_id: str, call_id: str, client: str | None, f: Facts, response_id: str | None) -> None:
        """What a call an earlier run recorded left, read back (see SessionStore.recall): a
        restarted recorder goes on with the sessions it was following."""
        self._leave((session_id, call_id), client, response_id, f)

    def _leave(self, where: tuple[str, str], client: str | None, rid: str | None, f: Facts) -> None:
        """The fingerprints the continuation of the call at `where` would carry."""
        keys = self._clients.look(client)
        if keys is None:
            keys = _Lru(KEYS_PER_CLIENT)
            self._clients.put(client, keys)
        if rid:
            self._responses.put(rid, where)
        if not f.readable:
            return
        for call_id in f.calls:
            keys.put(("tool", call_id), where)
        if f.next_grow is None:
            return
        keys.put(f.next_grow, where)
        keys.put(f.next_tail, where)
        if f.said:
            quotes = self._quotes.look(client)
            if quotes is None:
                quotes = _Quotes(QUOTES_PER_CLIENT)
                self._quotes.put(client, quotes)
            quotes.put_all(_runs(f.said), where)


# -- reading requests and answers -----------------------------------------------------------------
# Requests are read by their dialect (llmtap.dialects), from the body the recorder parsed once,
# cut to the messages grouping reads: agents resend the whole history every turn, and reading
# every message of it into shapes would cost O(history) per call. Chat Completions bodies of
# the usual shapes skip the shapes too (`_chat_turns`); a test holds both readings equal.
_CONVERSATION_KEYS = ("messages", "input", "contents")  # chat / Anthropic / Ollama, Responses, Gemini
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "model": "assistant",
          "tool": "tool", "function": "tool"}
KEEP_WHOLE = 8  # a history this short is read whole


def _role_of(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    if kind in ("function_call", "custom_tool_call", "reasoning"):
        return "assistant"
    if kind in ("function_call_output", "custom_tool_call_output"):
        return "tool"
    return _ROLES.get(str(item.get("role")), "user")


def trimmed(doc: dict) -> tuple[dict, int | None, int | None]:
    """`doc` with its conversation cut to what grouping reads, in order: the first message and
    the first user message, the last answer (the run of assistant items ending the history, or
    before a trailing prefill) with the message before it, and everything after it; and, in
    the conversation as sent, where its last answer begins and how many items it has.

    Reads the roles of the items it keeps and of few others: the last answer is sought from
    the end, the first messages from the start, so that a history of hundreds of items costs
    what one of ten does (agents resend all of it every turn)."""
    for key in _CONVERSATION_KEYS:
        items = doc.get(key)
        if isinstance(items, list):
            break
    else:
        return doc, None, None
    n = len(items)
    runs: list[tuple[int, int]] = []  # (start, end) of the last assistant run, then of the one before
    i = n - 1
    while i >= 0:
        if _role_of(items[i]) == "assistant":
            end = i
            while i > 0 and _role_of(items[i - 1]) == "assistant":
                i -= 1
            runs.append((i, end))
            if end != n - 1 or len(runs) == 2:  # the one before counts only when a prefill ends the request
                break
        i -= 1
    at = runs[0][0] if runs else None
    if n <= KEEP_WHOLE:
        return doc, at, n
    if not runs:
        keep = {i for i, item in enumerate(items) if _role_of(item) not in (None, "system")}
        return {**doc, key: [items[i] for i in sorted(keep)]}, at, n
    keep = set(range(runs[0][1] + 1, n))
    for start, end in runs:
        keep.update(range(max(start - 1, 0), end + 1))
    first_talk = first_user = None
    for i, item in enumerate(items):
        r = _role_of(item)
        if first_talk is None and r not in (None, "system"):
            first_talk = i
        if r == "user":
            first_user = i
            break
    keep.update(i for i in (first_talk, first_user) if i is not None)
    return {**doc, key: [items[i] for i in sorted(keep)]}, at, n


def _json_object(body: str | bytes | dict | None) -> dict | None:
    return body if isinstance(body, dict) else json_object(body)


def read_request(api: str, body: str | bytes | dict | None) -> tuple[Request | None, int | None, int | None]:
    """The request's shape as grouping reads it, where its last answer begins and how many items
    its conversation has (see `trimmed`); None when its body is not a JSON object. `body` may be
    the body already parsed. Never raises."""
    doc = _json_object(body)
    if doc is None:
        return None, None, None
    try:
        cut, at, n = trimmed(doc)
        return dialects.read_request(api, cut), at, n
    except Exception:  # a body of a shape nobody expected: grouped as having no conversation
        return None, None, None


def response_of(content: str | None, tool_calls: list[dict] | None, response_id: str | None) -> Answer:
    """The answer as grouping reads it, from what extraction found."""
    if not tool_calls:
        return Answer(response_id, content)
    calls = tuple([ToolCall(t.get("id"), t.get("name"), str(t.get("arguments") or ""))
                   for t in tool_calls if isinstance(t, dict)])
    return Answer(response_id, content, calls)


class SessionStore:
    """The grouper as the recorder's writer uses it: fills a final row's session columns, and
    writes the sessions it touched in the commit that writes their calls."""

    def __init__(self, idle_s: float | None = None) -> None:
        self.con: Any = None
        self.grouper = Grouper(idle_s or DEFAULT_IDLE_S, load=self._load, named=self._named)
        self._writing: list[Session] = []
        self._said = False
        self._recalled = False

    def attach(self, con: Any) -> None:
        self.con = con

    def recall(self) -> int:
        """A restart's memory: the newest calls of the last idle gap (RECALL_CALLS of them at
        most, RECALL_BYTES of request bodies) leave their fingerprints again, oldest first, so
        that an inferred session goes on across a restart of `llmtap run` (sessions named by
        an id or a label are found in the store anyway). Read from the record, masked: a key a
        user pasted into a message no longer matches, which costs that one link. Returns the
        calls read back; never raises. Once, with the store open: the writer calls it before
        each batch, outside any transaction (a failed query inside one would abort it)."""
        if self._recalled or self.con is None:
            return 0
        self._recalled = True
        try:
            since = datetime.now(timezone.utc) - self.grouper.idle
            newest = self.con.execute(
                "SELECT id, coalesce(length(request_body), 0) FROM calls WHERE session_id IS NOT NULL "
                "AND status IS NOT NULL AND started_at >= ? ORDER BY id DESC LIMIT ?", [since, RECALL_CALLS]).fetchall()
            ids, budget = [], RECALL_BYTES
            for cid, size in newest:
                budget -= size
                if budget < 0:
                    break
                ids.append(cid)
            ids.reverse()
            for i in range(0, len(ids), 64):  # a few bodies in memory at a time
                # A Responses answer's id is in its body only (the first event of a stream).
                for cid, sid, client, api, body, content, tool_calls, rid in self.con.execute(
                        "SELECT id, session_id, client, api, request_body, content, tool_calls, "
                        "CASE WHEN api = 'openai.responses' THEN regexp_extract(response_body, "
                        "'\"id\"\\s*:\\s*\"(resp_[A-Za-z0-9_-]+)\"', 1) END FROM calls "
                        "WHERE id IN (SELECT unnest(?)) ORDER BY id", [ids[i:i + 64]]).fetchall():
                    calls = json.loads(tool_calls) if tool_calls else None
                    facts = read_facts(api, body, response_of(content, calls if isinstance(calls, list) else None, None))
                    self.grouper.recall(sid, cid, client, facts, rid or None)
            return len(ids)
        except Exception:
            logging.getLogger("llmtap.recorder").exception(
                "llmtap recorder: reading back the last sessions failed; inferred sessions start anew")
            return 0

    def _load(self, sid: str) -> tuple | None:
        if self.con is None:
            return None
        # fetchall, never fetchone: this runs while the calls' appender is open, and a result
        # left unfinished makes DuckDB refuse the appender's flush, the whole batch with it.
        rows = self.con.execute(f"SELECT {', '.join(SESSION_FIELDS)} FROM sessions WHERE id = ?", [sid]).fetchall()
        return rows[0] if rows else None

    def _named(self, key: str) -> str | None:
        # A session named by an id or label in an earlier run (or evicted from memory) goes on.
        if self.con is None:
            return None
        rows = self.con.execute("SELECT id FROM sessions WHERE key = ? ORDER BY started_at DESC LIMIT 1",
                                [key]).fetchall()  # not fetchone: see _load
        return rows[0][0] if rows else None

    def link(self, call: Any, row: dict[str, Any], facts: Facts | None, response_id: str | None,
             mask: Callable[[str | None], str | None]) -> None:
        """Fill `row`'s session columns from the call; never raises (a row without its session
        is better than no row). `facts` as they were read with the answer (workers.with_request,
        in a helper or in the writer: the same hashes either way); `mask` is the call's
        scrubber, for what of them is stored (title, ids)."""
        try:
            status, error = row.get("status"), row.get("error")
            cost = row.get("cost_usd")
            if cost is not None and not isinstance(cost, Decimal):
                cost = Decimal(str(cost))
            # Only a Responses id is ever named again (previous_response_id): a Chat Completions
            # id would only push those out of the grouper's memory.
            rid = response_id if call.api == RESPONSES.name else None
            # Positional, in CallInfo's order: one is made for every call on the writer's
            # thread, and matching sixteen keywords cost twice what the call itself does.
            info = CallInfo(call.id, call.started_at, row.get("client"), call.session_headers or _NO_HEADERS,
                            call.session_label, facts or _NO_FACTS, None, None, rid, call.duration_ms,
                            bool(status is None or status >= 400 or error), (call.attempts or 0) > 1,
                            row.get("input_tokens"), row.get("output_tokens"), cost, mask)
            found = self.grouper.add(info)
        except Exception:
            if not self._said:
                self._said = True
                logging.getLogger("llmtap.recorder").exception(
                    "llmtap recorder: grouping call %s into a session failed; it is recorded without one", call.id)
            return
        row["session_id"], row["session_link"] = found.session_id, found.link
        row["parent_call_id"], row["turn"] = found.parent_call_id, found.turn

    def write(self, con: Any) -> None:
        """In a transaction: the touched sessions' rows, replacing older ones. They stay touched
        until `committed()`: a write rolled back is made again with the next batch."""
        self._writing = list(self.grouper.dirty.values())
        if not self._writing:
            return
        old = [s.id for s in self._writing if s.written]
        if old:
            con.execute("DELETE FROM sessions WHERE id IN (SELECT unnest(?))", [old])
        appender = con.appender("sessions")
        appender.append_rows([s.row() for s in self._writing])
        appender.flush()

    def committed(self) -> None:
        for s in self._writing:
            s.written = True
            self.grouper.dirty.pop(s.id, None)
        self._writing = []

    def failed(self, drop: bool) -> None:
        """The write was rolled back: tried again with the next batch, or, when the rows
        themselves were refused (`drop`), left out so that they do not fail every batch."""
        if drop:
            for s in self._writing:
                self.grouper.dirty.pop(s.id, None)
        self._writing = []
