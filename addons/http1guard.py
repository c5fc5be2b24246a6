"""A clear 400 for requests mitmproxy's HTTP/1 server cannot read.

mitmproxy 12 answers a bad Content-Length with an HTML page, closes the connection without a
word on bad chunk framing, and raises inside its server layer on a chunked request with
trailers ("HTTP trailers are not implemented yet"), which leaves the client waiting forever.
mitmproxy offers no hook for these (they happen before any flow hook that could answer), so
its HTTP/1 server's two reading states are wrapped here: trailers become a protocol error,
and every protocol error while reading a request is answered with a 400 in the request's API
error shape before mitmproxy closes the connection. The flow's `error` hook then fires as
before, and the routing addon records the call.
"""

from __future__ import annotations

import html
import re
from collections.abc import Generator
from typing import Any

import h11
from mitmproxy import http
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers.http import _http1

from llmtap.addons.relay import error_body
from llmtap.addons.routing import error_family

_installed = False
_HTML_MESSAGE = re.compile(rb"<p>(.*?)</p>", re.S)


class _StrictReader:
    """An h11 body reader that refuses trailers and remembers why it failed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.error: str | None = None
        self.answered = False

    def __call__(self, buf: Any) -> Any:
        return self._checked(lambda: self.inner(buf))

    def read_eof(self) -> Any:
        return self._checked(self.inner.read_eof)

    def _checked(self, read: Any) -> Any:
        try:
            event = read()
        except h11.ProtocolError as exc:
            self.error = str(exc)
            raise
        if isinstance(event, h11.EndOfMessage) and event.headers:
            names = ", ".join(sorted({bytes(k).decode("latin-1") for k, _ in event.headers}))
            self.error = (f"the chunked request body ends with trailers ({names}), which llmtap does "
                          "not forward; send the request without trailers")
            raise h11.RemoteProtocolError(self.error)
        return event


def _answer(request: http.Request | None, message: str) -> bytes:
    family = error_family(request.method, request.path.split("?", 1)[0]) if request is not None else "openai"
    body = error_body(family, 400, f"llmtap: malformed request: {message}", "llmtap_bad_request")
    return (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))


def install() -> None:
    """Wrap mitmproxy's Http1Server reading states (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    server = _http1.Http1Server
    read_headers = server.read_headers
    read_body = server.read_body

    def guarded_read_headers(self: Any, event: Any) -> Generator[commands.Command, Any, None]:
        for command in read_headers(self, event):
            if (isinstance(command, commands.SendData) and command.connection is self.conn
                    and command.data.startswith(b"HTTP/1.1 400 ") and b"text/html" in command.data):
                # mitmproxy's own HTML 400 for a head it could not use: say the same in JSON.
                found = _HTML_MESSAGE.search(command.data)
                message = html.unescape(found.group(1).decode("utf-8", "replace")) if found else "bad request head"
                command = commands.SendData(self.conn, _answer(self.request, message))
            yield command

    def guarded_read_body(self: Any, event: Any) -> Generator[commands.Command, Any, None]:
        reader = self.body_reader
        if not isinstance(reader, _StrictReader):
            reader = self.body_reader = _StrictReader(reader)
        for command in read_body(self, event):
            if (isinstance(command, commands.CloseConnection) and reader.error is not None
                    and not reader.answered):
                reader.answered = True
                yield commands.SendData(self.conn, _answer(self.request, reader.error))
            yield command

    server.read_headers = guarded_read_headers  # type: ignore[method-assign]
    server.read_body = guarded_read_body  # type: ignore[method-assign]
