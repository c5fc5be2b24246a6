"""Secrets never leave the process: headers and query keys are fingerprinted before queueing.

A fingerprint keeps enough to tell two keys apart (`sk-…3f9a`) and nothing that lets the key
be used. These functions run on the proxy's event loop, so they stay small and pure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from urllib.parse import unquote_plus, urlsplit, urlunsplit

SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "cookie",
        "set-cookie",
    }
)
SECRET_QUERY_KEYS = frozenset({"key", "api_key", "api-key", "apikey", "access_token", "token"})


def fingerprint(secret: str) -> str:
    """`Bearer sk-abc...xyz` -> `Bearer sk-…<4 hex>`: the scheme and a short prefix survive,
    the rest becomes 4 hex digits of a hash, so equal keys have equal fingerprints."""
    scheme = ""
    value = secret.strip()
    if " " in value:
        scheme, value = value.split(" ", 1)
        scheme += " "
    digest = hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:4]
    # Keep a prefix only when it is a recognisable key family marker, never key material.
    prefix = ""
    for marker in ("sk-ant-", "sk-or-", "sk-proj-", "sk-", "AIza", "gsk_", "xai-"):
        if value.startswith(marker):
            prefix = marker
            break
    return f"{scheme}{prefix}…{digest}"


def redact_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header pairs -> dict with lower-case names; repeated headers are joined with ", "."""
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        if key in SECRET_HEADERS:
            value = fingerprint(value)
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
        if eq and unquote_plus(name).lower() in SECRET_QUERY_KEYS:
            # Written unencoded so the fingerprint reads the same as in headers.
            pieces[i] = f"{name}={fingerprint(unquote_plus(value))}"
            changed = True
    return urlunsplit(parts._replace(query="&".join(pieces))) if changed else url
