"""Secrets never reach the record, and network text never reaches the terminal raw.

A fingerprint keeps enough to tell two keys apart (`sk-…3f9a`) and nothing that lets the key
be used; the same key gets the same fingerprint in every column and table.

Two layers. The proxy masks headers and query parameters by name before it emits a call's
start, and collects the credential values the call carried (`CallStarted.secrets`: auth-ish headers, cookie
values, secret query parameters, the keys llmtap itself sends upstream). The recorder then
scrubs every stored text of that call with a `Scrubber`: those exact values (and credential
fields of the JSON request body, found there) are replaced wherever they appear -- an
upstream that echoes the key in its error, a body, a response header -- and the well-known
key shapes (`sk-…`, `AIza…`, `Bearer <token>`, JWTs, ...) are masked in any text. What is
forwarded is never changed: this is only about what is stored and printed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
from collections.abc import Iterable
from functools import lru_cache
from urllib.parse import quote, quote_plus, unquote_plus, urlsplit, urlunsplit

# A value shorter than this is masked where its name says it is a secret, but not searched
# for in other text: replacing `dark` (a cookie value) in every answer would wreck the record
# and protect nothing.
MIN_SECRET_LEN = 8

_FAMILIES = ("sk-ant-", "sk-or-", "sk-proj-", "sk-", "AIza", "gsk_", "xai-")
_FINGERPRINT = re.compile(r"(?:\S+ )?[A-Za-z_-]{0,8}…[0-9a-f]{4}")


def is_fingerprint(value: str) -> bool:
    return _FINGERPRINT.fullmatch(value) is not None


def fingerprint(secret: str) -> str:
    """`Bearer sk-abc...xyz` -> `Bearer sk-…<4 hex>`: the scheme and a key-family marker
    survive, the rest becomes 4 hex digits of a hash, so equal keys have equal fingerprints.
    A fingerprint is returned as it is, so that masking twice never makes one key look like two."""
    value = secret.strip()
    if is_fingerprint(value):
        return value
    scheme = ""
    if " " in value:
        scheme, value = value.split(" ", 1)
        scheme += " "
    digest = hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:4]
    # Keep a prefix only when it is a recognisable key family marker, never key material.
    prefix = next((m for m in _FAMILIES if value.startswith(m)), "")
    return f"{scheme}{prefix}…{digest}"


# -- which names hold secrets ----------------------------------------------------------------
_NAME_PARTS = re.compile(r"[-_.\s]+")
_SECRET_PARTS = frozenset({"key", "secret", "password", "passwd", "pwd", "cookie", "credential",
                           "credentials", "signature", "sig", "session", "sessionid", "jwt", "bearer"})
_NOT_AUTH = frozenset({"author", "authors", "authority", "authored"})


@lru_cache(maxsize=4096)
def is_secret_name(name: str) -> bool:
    """Whether a header or query parameter of this name carries a credential: `*-key`,
    `*token*`, `*secret*`, `*auth*`, cookies, passwords. Rate-limit counters such as
    `x-ratelimit-remaining-tokens` are numbers, not secrets, and stay readable."""
    for part in _NAME_PARTS.split(name.lower()):
        if not part:
            continue
        if part in _SECRET_PARTS or part.endswith(("key", "secret", "password", "cookie")):
            return True
        if "token" in part and not part.endswith("tokens"):
            return True
        if "auth" in part and part not in _NOT_AUTH:
            return True
    return False


_NAME_CACHE: dict[str | bytes, bool] = {}


def _secret_header(name: str | bytes) -> bool:
    """is_secret_name for a header name as it arrives (any case, str or bytes), cookies
    included: one dict lookup for the names seen before, as these run on the proxy's loop."""
    known = _NAME_CACHE.get(name)
    if known is None:
        key = (name.decode("latin-1") if isinstance(name, bytes) else name).lower()
        known = key == "cookie" or key == "set-cookie" or is_secret_name(key)
        if len(_NAME_CACHE) < 4096:
            _NAME_CACHE[name] = known
    return known


# -- headers and URLs (the proxy, per call) ---------------------------------------------------
def _mask_cookies(value: str, set_cookie: bool) -> str:
    """Every cookie's value becomes its fingerprint; `set-cookie` attributes (Path, Expires)
    are not values and stay."""
    pieces = value.split(";")
    for i, piece in enumerate(pieces if not set_cookie else pieces[:1]):
        name, eq, val = piece.partition("=")
        v = val.strip()
        if eq and v and not is_fingerprint(v):
            pieces[i] = f"{name}={fingerprint(v)}"
        elif not eq and piece.strip() and not is_fingerprint(piece.strip()):
            pieces[i] = fingerprint(piece.strip())
    return ";".join(pieces)


def mask_header(name: str, value: str) -> str:
    """The value of one header as it may be stored (`name` lower-case)."""
    if name == "cookie" or name == "set-cookie":
        return _mask_cookies(value, name == "set-cookie")
    if is_secret_name(name) and value.strip() and not is_fingerprint(value.strip()):
        return fingerprint(value)
    return value


def redact_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header pairs -> dict with lower-case names, secret values fingerprinted; repeated
    headers are joined with ", "."""
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        if _secret_header(name):
            value = mask_header(key, value)
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def redact_url(url: str) -> str:
    """Replace secret query parameters (Gemini's `?key=`) with their fingerprint."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    pieces = parts.query.split("&")
    changed = False
    for i, piece in enumerate(pieces):
        name, eq, value = piece.partition("=")
        if eq and value and is_secret_name(unquote_plus(name)):
            # Written unencoded so the fingerprint reads the same as in headers.
            pieces[i] = f"{name}={fingerprint(unquote_plus(value))}"
            changed = True
    return urlunsplit(parts._replace(query="&".join(pieces))) if changed else url


def _header_values(name: str, value: str) -> Iterable[str]:
    """The credential values inside one header (`name` lower-case)."""
    if name == "cookie" or name == "set-cookie":
        for piece in value.split(";") if name == "cookie" else value.split(";", 1)[:1]:
            v = piece.partition("=")[2].strip()
            if v:
                yield v
        return
    value = value.strip()
    yield value
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if token:
        yield token
        if scheme.lower() == "basic":
            try:
                user_pass = base64.b64decode(token, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                return
            yield user_pass
            yield user_pass.partition(":")[2]


def collect_secrets(headers: Iterable[tuple[str, str] | tuple[bytes, bytes]], url: str = "") -> set[str]:
    """The credential values in headers (str or bytes pairs) and in a URL's query string."""
    found: set[str] = set()
    for name, value in headers:
        if not _secret_header(name):
            continue
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "surrogateescape")
        found.update(v for v in _header_values(name.lower(), value) if len(v) >= MIN_SECRET_LEN and not is_fingerprint(v))
    query = url.partition("?")[2].partition("#")[0]
    if query:
        for piece in query.split("&"):
            name, eq, value = piece.partition("=")
            if eq and is_secret_name(unquote_plus(name)):
                v = unquote_plus(value)
                if len(v) >= MIN_SECRET_LEN and not is_fingerprint(v):
                    found.add(v)
    return found


# -- free text (the recorder, per stored column) -------------------------------------------
# The well-known key shapes. One regex per family, each starting with a literal: Python's re
# then finds candidates as fast as a substring test, where one alternation of them all would
# try every position of every body (twenty times slower on an 8 KB stream).
_KEY_RES = tuple(re.compile(p) for p in (
    r"sk-(?:ant-|or-|proj-)?[A-Za-z0-9_-]{16,}",
    r"AIza[0-9A-Za-z_-]{30,}",
    r"xai-[A-Za-z0-9_-]{20,}",
    r"gsk_[A-Za-z0-9]{20,}",
    r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*",
    # An auth scheme's token; the scheme's first letter is checked by the callback.
    r"earer(\s+)([A-Za-z0-9._~+/=-]{8,})",
    r"asic(\s+)([A-Za-z0-9+/=]{8,})",
))
# Secret query parameters quoted in text (an error quoting the upstream URL); not looked for
# in bodies, where the call's own query keys are masked as exact values.
_QUERY_RES = (re.compile(r"\?[A-Za-z0-9_.-]{1,40}=[^&#\s\"'<>\\]+"), re.compile(r"&[A-Za-z0-9_.-]{1,40}=[^&#\s\"'<>\\]+"))
_WORD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _mask_shape(m: re.Match[str]) -> str:
    s = m.group(0)
    first = s[0]
    if first == "?" or first == "&":
        name, _, value = s[1:].partition("=")
        plain = unquote_plus(value)
        if is_secret_name(unquote_plus(name)) and not is_fingerprint(plain):
            return f"{first}{name}={fingerprint(plain)}"
        return s
    if m.lastindex:  # an auth scheme's token, the only patterns with groups
        before = m.string[m.start() - 1] if m.start() else ""
        if before not in ("B", "b"):
            return s
        token = m.group(2)
        # A digit tells a token from prose such as "Bearer authentication".
        if not any(c.isdigit() for c in token):
            return s
        return s[:m.start(2) - m.start()] + fingerprint(token)
    if m.start() and m.string[m.start() - 1] in _WORD:
        return s  # inside a longer word ("task-...")
    return fingerprint(s)


def mask_shapes(text: str, query: bool = True) -> str:
    """`text` with every well-known key shape (and with `query`, every secret query
    parameter) replaced by its fingerprint."""
    # On a short text (a model name, a header) testing for what every pattern of _KEY_RES
    # starts with costs less than a regex call per family.
    if (len(text) > 512 or "sk-" in text or "AIza" in text or "xai-" in text or "gsk_" in text or "eyJ" in text
            or "earer" in text or "asic" in text):
        for r in _KEY_RES:
            text = r.sub(_mask_shape, text)
    if query and ("?" in text or "&" in text):
        for r in _QUERY_RES:
            text = r.sub(_mask_shape, text)
    return text


# Credential fields of a JSON request body, at any depth, found from their names' stems (on
# the lower-cased bytes, which keep every offset) rather than by a regex tried at each quote.
_FIELD_STEMS = (b"key", b"token", b"secret", b"passw", b"auth")
_FIELD_AT = re.compile(rb'"([A-Za-z0-9_-]{1,64})"\s*:\s*"((?:[^"\\]|\\.)*)"')
_STRONG_FIELDS = ("apikey", "apitoken", "accesstoken", "refreshtoken", "idtoken", "authtoken", "sessiontoken",
                  "bearertoken", "clientsecret", "secretkey", "privatekey", "accesskey", "secret", "password",
                  "passwd")


def _field_kind(name: str) -> int:
    """2: a credential field whatever its value; 1: `key`/`token`, a credential only when the
    value looks like a key (a keyboard key or a logprob's token is not one); 0: not one."""
    n = name.lower().replace("_", "").replace("-", "")
    if n.endswith(_STRONG_FIELDS) or n in ("authorization", "auth", "credential"):
        return 2
    return 1 if n in ("key", "token") else 0


def _body_fields(body: bytes) -> list[tuple[int, int, str]]:
    """(start, end, value) of the credential field values in a JSON body (offsets of the
    value's text between its quotes)."""
    low = body.lower()
    spans: dict[int, tuple[int, int, str]] = {}
    for stem in _FIELD_STEMS:
        pos = low.find(stem)
        while pos >= 0:
            q = body.rfind(b'"', max(0, pos - 64), pos + 1)
            m = _FIELD_AT.match(body, q) if q >= 0 else None
            if m is not None and m.end(1) >= pos + len(stem) and m.start(2) not in spans:
                kind = _field_kind(m.group(1).decode("ascii"))
                raw = m.group(2)
                if kind and raw:
                    try:
                        value = json.loads(b'"' + raw + b'"')
                    except ValueError:
                        value = raw.decode("utf-8", "surrogateescape")
                    if not is_fingerprint(value) and (
                            kind == 2 or (len(value) >= 16 and not any(c.isspace() for c in value))):
                        spans[m.start(2)] = (m.start(2), m.end(2), value)
            pos = low.find(stem, pos + len(stem))
    return sorted(spans.values())


_PLAIN = re.compile(r"[A-Za-z0-9._~-]*")


@lru_cache(maxsize=1024)
def _forms(secret: str) -> tuple[tuple[str, str], ...]:
    """(form, fingerprint) for the forms a value takes inside JSON strings and URLs, so that
    an echo in any is caught. Cached: most calls carry the same few keys."""
    if is_fingerprint(secret):
        return ()
    fp = fingerprint(secret)
    if _PLAIN.fullmatch(secret):
        return ((secret, fp),)
    forms = (secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
             quote(secret, safe=""), quote_plus(secret))
    return tuple((f, fp) for f in dict.fromkeys(forms))


class Scrubber:
    """Masks the secrets of one call in any text stored or printed for it.

    `secrets` are the exact values the call carried (`CallStarted.secrets`). Given the request body,
    its credential fields are found too; `request_body` is then that body with each field
    value replaced in place by its fingerprint (JSON stays valid), and those values join the
    secrets masked everywhere else.
    """

    __slots__ = ("_masks", "request_body", "found_shapes")

    def __init__(self, secrets: Iterable[str] = (), request_body: bytes | None = None) -> None:
        self._masks: list[tuple[str, str]] = []
        self.found_shapes = False  # a body given to `body` had a key shape
        self.request_body = request_body
        found: list[str] = []
        if request_body:
            spans = _body_fields(request_body)
            if spans:
                out, at = [], 0
                for start, end, value in spans:
                    out += [request_body[at:start], fingerprint(value).encode()]
                    at = end
                    found.append(value)
                out.append(request_body[at:])
                self.request_body = b"".join(out)
        self._add([*secrets, *found])

    @classmethod
    def for_call(cls, call: object, *, body: bool = True) -> Scrubber:
        """A call's scrubber: its secrets, and (`body`) its request body's credential fields."""
        return cls(getattr(call, "secrets", ()), getattr(call, "request_body", None) if body else None)

    def _add(self, secrets: Iterable[str]) -> None:
        masks: dict[str, str] = {}
        for s in secrets:
            if len(s) >= MIN_SECRET_LEN:
                masks.update(_forms(s))
        # Longest first: a key that contains another key is masked whole.
        self._masks = sorted(masks.items(), key=lambda kv: -len(kv[0]))

    def text(self, text: str | None, query: bool = True) -> str | None:
        """`text` with the call's secrets and every well-known key shape masked; `query`
        False for bodies (see `_QUERY_RES`)."""
        if not text:
            return text
        return mask_shapes(self.literal(_storable(text)), query)  # type: ignore[arg-type]

    def body(self, text: str | None) -> str | None:
        """`text` of a body or of what was extracted from one; notes whether it had a key
        shape (`found_shapes`)."""
        if not text:
            return text
        before = self.literal(_storable(text)) or ""  # never empty: `text` is not
        out = mask_shapes(before, False)
        if out is not before:
            self.found_shapes = True
        return out

    def literal(self, text: str | None) -> str | None:
        """`text` with the call's own secrets masked, and no search for key shapes."""
        if not text:
            return text
        for secret, fp in self._masks:
            if secret in text:
                text = text.replace(secret, fp)
        return text

    def raw(self, data: bytes | None) -> bytes | None:
        """The same for bytes that are not UTF-8 (a round trip that keeps every other byte)."""
        if not data:
            return data
        out = mask_shapes(self.literal(data.decode("utf-8", "surrogateescape")), False)  # type: ignore[arg-type]
        return out.encode("utf-8", "surrogateescape")


def _storable(text: str) -> str:
    """`text` as valid UTF-8: a lone surrogate (a header byte that is not UTF-8, a `\\ud800`
    escape in JSON from a client or an upstream) becomes U+FFFD. DuckDB refuses the whole
    batch for one, which then went to the spool, and the spool could not be imported either."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


_SURROGATE = re.compile("[\ud800-\udfff]")


# -- terminal output ---------------------------------------------------------------------------
def printable(text: str) -> str:
    """`text` safe for a terminal: escape sequences, C0/C1 controls, CR and backspace, bidi
    overrides and other invisible format characters from the network become visible `\\x1b`,
    `\\u202e` escapes instead of acting on the user's terminal."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def terminal_text(text: str) -> str:
    """Like `printable`, for text shown as a block (the UI's bodies): lines and tabs stay."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch in "\n\t" else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    o = ord(ch)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


class PrintableFormatter(logging.Formatter):
    """A log formatter whose lines hold printable text only (a traceback keeps its lines),
    with key shapes and secret query parameters masked: a message may quote a URL or an
    upstream's error (mitmproxy's own among them)."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(printable(mask_shapes(line)) for line in super().format(record).split("\n"))
