"""`--proxy` / `--gateway` addresses and the start-up error, apart from runner.py so that
checking the command line does not wait for mitmproxy to load (about a second)."""

from __future__ import annotations

import re


class StartupError(Exception):
    """Start-up cannot go on; the message says what to change."""


def parse_hostport(text: str, flag: str) -> tuple[str, int]:
    """'8080', ':8080', 'HOST:PORT' or '[::1]:8080' -> (host, port), host defaulting to loopback."""
    m = re.fullmatch(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:]*))?:?(?P<port>\d+)", text.strip())
    if not m or not (0 <= int(m["port"]) < 65536):
        raise StartupError(f"{flag} {text!r}: expected HOST:PORT, e.g. {flag} 127.0.0.1:8080")
    return (m["v6"] or m["host"] or "127.0.0.1", int(m["port"]))
