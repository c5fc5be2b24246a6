"""Framing shared by every wire format: content-encoding undone chunk by chunk within a bound,
SSE and NDJSON split into events, and `BodyReader`, which drives one dialect's response reader
(dialects/<format>.py) over a body exactly as the network delivered it (any split, compressed
or not) and can report what it knows at any moment -- the same code serves the live view of a
call in progress and the record written when it ends.

However much a body expands, no more of it than the limit is ever decoded (see `Decoder`).
Only the standard library is imported at start; brotli and zstd are imported when a body uses
them.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from llmtap.dialects.base import ResponseReader, State, norm_error
from llmtap.dialects.shapes import Response

# The most of one body the record keeps (`llmtap run --max-body`): request and response bodies
# as they crossed the wire, and the response once decoded. The traffic itself is never cut.
DEFAULT_BODY_LIMIT = 8 << 20
# SSE bytes that may wait unread (see `BodyReader.sse_pending`).
_SSE_BATCH = 64 * 1024
# Error bodies that are not JSON are kept as their text, up to this many characters.
_MAX_ERROR_TEXT = 2000

Headers = dict[str, str] | list[tuple[str, str]] | None


def size_text(n: int) -> str:
    """`8 MiB`, `510 KiB`, `1.5 MiB`: sizes as notes and help show them."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f} {unit}" if value == int(value) or value >= 100 else f"{value:.1f} {unit}"
    return f"{n} bytes"


def body_cut_note(which: str, limit: int, size: int | None = None) -> str:
    """The note of a request or response body the record keeps only the first `limit` bytes of
    (the proxy and the recorder say it in the same words, so that a row carries it once)."""
    whole = f" ({size_text(size)})" if size is not None else ""
    got = "the upstream" if which == "request" else "the client"
    return (f"{which} body over {size_text(limit)}{whole}: the record keeps the first "
            f"{size_text(limit)}; {got} got all of it")


class Lines:
    """Splits bytes on LF, keeping only the unfinished tail (as pieces, never re-scanned)."""

    def __init__(self) -> None:
        self._tail: list[bytes] = []

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        start = 0
        while (i := data.find(b"\n", start)) >= 0:
            piece = data[start:i]
            if self._tail:
                self._tail.append(piece)
                piece = b"".join(self._tail)
                self._tail = []
            out.append(piece[:-1] if piece.endswith(b"\r") else piece)
            start = i + 1
        if start < len(data):
            self._tail.append(data[start:])
        return out

    def rest(self) -> bytes:
        rest = b"".join(self._tail)
        self._tail = []
        return rest[:-1] if rest.endswith(b"\r") else rest


def line_text(line: bytes, st: State, where: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        st.note(f"{where} is not valid UTF-8")
        return line.decode("utf-8", errors="replace")


# The C scanner behind `json.loads`, called without its two whitespace regexes and Python
# frames. It also says where the value ended, which tells whether it was the whole payload.
# (Events are parsed one by one, not joined into one JSON array: payloads that are not JSON
# alone can be JSON together, `[1` and `2]`, and one C call for many saved only ~10%.)
scan_json = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # set in __init__, not in typeshed


def loads(text: str | bytes) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except (ValueError, RecursionError):
        return False, None


# Decoded bytes asked of one content-coding at a time: what a bomb can expand to in one call.
_DECODE_STEP = 256 * 1024


def decoded_cap_note(limit: int, encoding: str, received: int) -> str:
    """The note of a body whose decoded form was cut at `limit` (the recorder and the extractor
    say it in the same words, so a row carries it once)."""
    return (f"response body is over {size_text(limit)} once decoded ({encoding}, {size_text(received)} "
            f"as received): the record keeps and reads the first {size_text(limit)}; the rest is not stored")


def _brotli_bounded(obj: Any) -> bool:
    """The brotli module can cap one call's output (Brotli 1.2 and later)."""
    return "output_buffer_limit" in (getattr(obj.process, "__doc__", None) or "")


class Layer:
    """One content-coding being undone, giving at most `max_out` bytes per call, so that no
    single call expands a bomb; `more` says output is waiting without new input."""

    def __init__(self, enc: str, obj: Any, kind: str) -> None:
        self.enc, self.obj, self.kind = enc, obj, kind
        self.pending = b""  # input given but not taken yet

    @property
    def more(self) -> bool:
        if self.kind == "zstd":
            return not self.obj.needs_input and not self.obj.eof
        if self.kind == "br":
            return bool(self.pending) or not self.obj.can_accept_more_data()
        return bool(self.pending)

    def step(self, data: bytes, max_out: int) -> bytes:
        obj = self.obj
        if self.kind == "zlib":
            if obj.eof:
                return b""  # trailing bytes after the stream end, as zlib.decompress ignores them
            out = obj.decompress(self.pending + data if self.pending else data, max_out)
            self.pending = obj.unconsumed_tail
            return out
        if self.kind == "zstd":
            if obj.eof:
                return b""
            return obj.decompress(data, max_out)
        if self.kind == "br":
            if self.pending or data:
                self.pending += data
            if not obj.can_accept_more_data():
                return obj.process(b"", output_buffer_limit=max_out)
            data, self.pending = self.pending, b""
            return obj.process(data, output_buffer_limit=max_out)
        # "br-pieces": a brotli module without output_buffer_limit is given a byte at a time
        data = self.pending + data if self.pending else data
        view, at, made, parts = memoryview(data), 0, 0, []
        while at < len(data) and made < max_out:
            piece = obj.process(view[at:at + 1])
            at += 1
            if piece:
                parts.append(piece)
                made += len(piece)
        self.pending = data[at:]
        return b"".join(parts)

    def finished(self) -> bool:
        if self.kind == "zlib" or self.kind == "zstd":
            return bool(self.obj.eof)
        return bool(self.obj.is_finished())


class Decoder:
    """Undoes content-encoding chunk by chunk, never giving (or making) more than it is asked
    for: a few hundred KiB of gzip can expand to gigabytes. Once `dead`, the body cannot be read."""

    def __init__(self, encodings: list[str], st: State) -> None:
        self.st = st
        self.encodings = list(reversed(encodings))  # the last encoding applied is undone first
        self.steps: list[Layer | None] = [None] * len(self.encodings)  # made on first data
        self.dead = False
        self.started = False

    def _make(self, enc: str, first: bytes) -> Layer | None:
        if enc in ("gzip", "x-gzip"):
            return Layer(enc, zlib.decompressobj(wbits=47), "zlib")  # 32+15: gzip or zlib header, auto-detected
        if enc == "deflate":
            # RFC 9110 says zlib-wrapped, but many servers send raw deflate.
            wrapped = first[:1] == b"\x1f" or (first[:1] and first[0] & 0x0F == 8)
            return Layer(enc, zlib.decompressobj(wbits=47 if wrapped else -15), "zlib")
        if enc == "br":
            try:
                import brotli  # mitmproxy depends on it; optional for this module
            except Exception:
                self.st.note("br body could not be decoded: the brotli module is not installed")
                return None
            obj = brotli.Decompressor()
            return Layer(enc, obj, "br" if _brotli_bounded(obj) else "br-pieces")
        if enc == "zstd":
            try:
                from compression import zstd  # type: ignore[import-not-found]  # Python 3.14
            except ImportError:
                try:
                    from backports import zstd  # type: ignore[import-not-found,no-redef]  # mitmproxy's, before 3.14
                except ImportError:
                    self.st.note("zstd body could not be decoded: no zstd module (Python 3.14, or backports.zstd)")
                    return None
            return Layer(enc, zstd.ZstdDecompressor(), "zstd")
        self.st.note(f"body has content-encoding {enc!r}, which is not understood")
        return None

    def _pull(self, i: int, data: bytes, budget: int) -> bytes:
        """Give layer `i` `data` and run what it makes through the layers after it: at most
        `budget` bytes of the last layer's output."""
        if self.steps[i] is None:
            if not data:
                return b""
            self.steps[i] = self._make(self.encodings[i], data)
            if self.steps[i] is None:
                self.dead = True
                return b""
        layer = self.steps[i]
        assert layer is not None
        out: list[bytes] = []
        made = 0
        last = i + 1 == len(self.steps)
        while made < budget and not self.dead:
            before = len(layer.pending)
            piece = layer.step(data, budget - made if last else _DECODE_STEP)
            data = b""
            moved = bool(piece) or len(layer.pending) != before
            if not last and (piece or self._waiting(i + 1)):
                piece = self._pull(i + 1, piece, budget - made)
            if piece:
                out.append(piece)
                made += len(piece)
            elif not (layer.more and moved):
                break
        return b"".join(out)

    def _waiting(self, i: int) -> bool:
        """Layer `i` or one after it holds output that needs no new input."""
        return any(s is not None and s.more for s in self.steps[i:])

    def feed(self, data: bytes, budget: int) -> bytes:
        """The decoded bytes of `data` (and of what earlier calls left), at most `budget`."""
        if self.dead or not data:
            return b""
        original, first = data, not self.started
        self.started = True
        if not self.encodings:
            return data[:budget]
        try:
            return self._pull(0, data, budget)
        except Exception:
            enc = self.encodings[0]
            if first and original.lstrip()[:1] in (b"{", b"[", b"d", b"e", b":"):
                # Decoded already somewhere upstream while the header stayed: read it plain.
                self.st.note(f"content-encoding says {enc} but the body is plain; read as is")
                self.encodings, self.steps = [], []
                return original[:budget]
            self.st.note(f"{enc} body could not be decoded")
            self.dead = True
            return b""

    def flush(self, budget: int) -> bytes:
        """What is still waiting in the layers, at most `budget` bytes."""
        if self.dead or not self.steps or self.steps[0] is None:
            return b""
        try:
            return self._pull(0, b"", budget)
        except Exception:
            self.st.note(f"{self.encodings[0]} body could not be decoded")
            self.dead = True
            return b""

    def truncated(self) -> str | None:
        """The coding whose stream stopped before its end, if any (a layer no byte reached
        has nothing to say)."""
        if self.dead:
            return None
        for enc, layer in zip(self.encodings, self.steps):
            if layer is not None and not layer.finished():
                return enc
        return None


def norm_headers(headers: Headers) -> dict[str, str]:
    out: dict[str, str] = {}
    items = headers.items() if isinstance(headers, dict) else (headers or ())
    for k, v in items:
        k = str(k).lower()
        out[k] = f"{out[k]}, {v}" if k in out else str(v)
    return out


def _sniff(head: bytes, reader: type[ResponseReader]) -> str:
    """Framing from the first bytes, for bodies labelled application/json or nothing at all."""
    head = head.lstrip()
    if head[:5] in (b"data:", b"event") or head[:1] == b":" or head[:3] == b"id:":
        return "sse"
    if reader.sniff_ndjson and head[:1] == b"{":
        return "ndjson"  # Ollama streams NDJSON whatever the label says
    return "whole"


class BodyReader:
    """Incremental reading of one response body of dialect `api` by its `reader`. No method
    ever raises."""

    def __init__(self, api: str, reader: type[ResponseReader], status: int | None, headers: Headers,
                 limit: int = DEFAULT_BODY_LIMIT) -> None:
        self.st = State()
        self.api = api
        self.reader = reader
        self.status = status
        # At most `limit` bytes of the body are read, once decoded; `fed` counts what arrived.
        self.limit = max(0, limit)
        self.taken = 0
        self.fed = 0
        self.capped = False  # the decoded body went over `limit`
        self._finished: Response | None = None
        try:
            self.headers = norm_headers(headers)
        except Exception:
            self.headers = {}
        self.dialect: ResponseReader = reader(self.st)
        ctype = self.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        self.declared_ndjson = ctype in ("application/x-ndjson", "application/ndjson", "application/jsonl")
        encs = [e.strip().lower() for e in self.headers.get("content-encoding", "").split(",")]
        encs = [e for e in encs if e and e != "identity"]
        self.decoder = Decoder(encs, self.st) if encs else None
        self.is_error = isinstance(status, int) and status >= 400
        self.mode = (
            "whole" if self.is_error
            else "sse" if ctype == "text/event-stream"
            else "ndjson" if self.declared_ndjson
            else "sniff"
        )
        # Whole bodies, the bytes read while sniffing, and Ollama's in-case-it-was-not-NDJSON copy.
        self.raw: list[bytes] = []
        self.raw_len = 0
        self.lines = Lines()  # NDJSON
        # SSE bytes not read yet: reading them per network read would cost more in framing than
        # in the events, so they wait for `snapshot`, `finish` or `_SSE_BATCH` bytes.
        self.sse_pending: list[bytes] = []
        self.sse_pending_len = 0
        # SSE bytes after the last blank line (an event still arriving); see `_sse_feed`.
        self.sse_buf = bytearray()
        self.line_no = 0
        self.sse_event: str | None = None
        self.sse_data: list[str] = []
        self.objects = 0
        self.bad_lines = 0
        self.first_line_bad = False

    def feed(self, chunk: bytes) -> None:
        """Bytes as the network delivered them, in order."""
        if self._finished is not None or not chunk:
            return
        self.fed += len(chunk)
        if self.capped:
            return
        try:
            room = self.limit - self.taken
            # One byte more than there is room for tells a body over the limit from one at it.
            data = self.decoder.feed(bytes(chunk), room + 1) if self.decoder else bytes(chunk[:room + 1])
            self._take(data)
        except Exception as exc:  # a surprise in the body must never reach the proxy
            self.st.note(f"extraction failed: {type(exc).__name__}: {exc}")

    def snapshot(self) -> Response:
        """What is known so far; `complete` stays None until the body shows how it ended."""
        if self._finished is not None:
            return self._finished
        try:
            if self.mode == "sse":
                self._sse_catch_up()
            return self.st.response(self.api, self._stream())
        except Exception as exc:
            return Response(self.api, notes=(f"extraction failed: {type(exc).__name__}: {exc}",))

    def finish(self) -> Response:
        """The body ended: settle `complete` and return the final extraction."""
        if self._finished is None:
            try:
                self._finish()
                self.dialect.finalize()
            except Exception as exc:
                self.st.note(f"extraction failed: {type(exc).__name__}: {exc}")
            try:
                self._finished = self.st.response(self.api, self._stream())
            except Exception as exc:
                self._finished = Response(self.api, notes=(f"extraction failed: {type(exc).__name__}: {exc}",))
        return self._finished

    def _take(self, data: bytes) -> None:
        room = self.limit - self.taken
        if len(data) > room:
            data = data[:room]
            self.capped = True
        self.taken += len(data)
        if data:
            self._consume(data)

    @property
    def cut(self) -> bool:
        """Only the first part of the body was read: it went over the limit once decoded, or
        what arrived is as long as the limit (the record keeps no more of a body as received)."""
        return self.capped or self.fed >= self.limit > 0

    def _stream(self) -> bool | None:
        if self.mode == "sse":
            return True
        if self.mode == "ndjson":
            # A lone object on an application/json Ollama answer was a non-streamed reply.
            return self.declared_ndjson or self.objects > 1
        return False if self.mode == "whole" else None

    def _consume(self, data: bytes) -> None:
        if self.mode == "sniff":
            self.raw.append(data)
            self.raw_len += len(data)
            head = b"".join(self.raw)  # only a few bytes: sniffing stops at the first line
            if len(head.lstrip()) < 6 and b"\n" not in head.lstrip() and self.raw_len < 64:
                return
            self.mode, self.raw, self.raw_len = _sniff(head, self.reader), [], 0
            data = head
        if self.mode == "whole":
            self.raw.append(data)
            return
        if self.mode == "sse":
            self.sse_pending.append(data)
            self.sse_pending_len += len(data)
            if self.sse_pending_len >= _SSE_BATCH:
                self._sse_read()
            return
        if not self.declared_ndjson:
            self.raw.append(data)
        for line in self.lines.feed(data):
            self._line(line)

    def _sse_read(self) -> None:
        if self.sse_pending:
            data = b"".join(self.sse_pending)
            self.sse_pending, self.sse_pending_len = [], 0
            self._sse_feed(data)

    def _sse_catch_up(self) -> None:
        """Read everything that arrived, as `feed` did before reading was put off."""
        try:
            self._sse_read()
            self._sse_settle()
        except Exception as exc:  # as in `feed`: noted, and the next bytes are still read
            self.st.note(f"extraction failed: {type(exc).__name__}: {exc}")

    def _sse_feed(self, data: bytes) -> None:
        """Buffer up to the last blank line, then read those whole events at once."""
        buf = self.sse_buf
        start = max(len(buf) - 2, 0)  # a terminator may begin in what was buffered before
        buf += data
        # A blank line is LF LF, or LF CR LF where lines end in CRLF.
        lf, crlf = buf.rfind(b"\n\n", start), buf.rfind(b"\n\r\n", start)
        end = max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
        if end:
            events = bytes(buf[:end])
            del buf[:end]
            self._sse_events(events)

    def _sse_events(self, blob: bytes) -> None:
        """Whole events (`blob` ends with a blank line). The usual shapes, one `data:` line with
        or without an `event:` line before it, skip the line parser; anything else, and an
        event continuing what `_sse_settle` already read, goes through `_line` as before."""
        try:
            text = blob.decode("utf-8")
        except UnicodeDecodeError:
            # The line parser notes each line that is not UTF-8 and still reads the others.
            for line in blob.split(b"\n")[:-1]:
                self._line(line[:-1] if line.endswith(b"\r") else line)
            return
        if "\r" in text:
            # One CR before each LF is part of the line ending; any other CR stays in its line.
            text = text.replace("\r\n", "\n")
        pieces = text.split("\n\n")
        # After the last separator: blank lines (each a no-op event) or nothing.
        tail = pieces.pop()
        if self.sse_data or self.sse_event is not None:
            self._sse_slow(pieces.pop(0))  # the event `_sse_settle` began reading
        # Counters are kept in locals for speed and stored back before the line parser runs.
        line_no, objects = self.line_no, self.objects
        event, scan = self.dialect.event, scan_json
        for piece in pieces:
            name: str | None = None
            if "\n" not in piece:
                if not piece or piece[0] == ":":  # a blank line, or a keep-alive comment
                    line_no += 2
                    continue
                payload, lines = piece, 2  # its line and the blank line after it
            else:
                head, _, payload = piece.partition("\n")
                if head[:6] == "event:" and "\n" not in payload:
                    name, lines = head[6:].strip(), 3
                else:
                    payload, lines = "", 0  # not a shape taken here: to the line parser
            if payload[:5] == "data:":
                at = 6 if payload[5:6] == " " else 5
                try:
                    obj, end = scan(payload, at)
                except (StopIteration, ValueError, RecursionError):
                    end = -1
                if end == len(payload):
                    line_no += lines
                    objects += 1
                    if name == "error" and isinstance(obj, dict) and "error" not in obj:
                        obj = {"type": "error", "error": obj}
                    event(name, obj)
                    continue
                if payload[at:] == "[DONE]":
                    line_no += lines
                    self.dialect.done()
                    continue
                # Otherwise not exactly one JSON value: `_dispatch` has the rules for those.
            self.line_no, self.objects = line_no, objects
            self._sse_slow(piece)
            line_no, objects = self.line_no, self.objects
        self.line_no, self.objects = line_no, objects
        for text in tail.split("\n")[:-1]:
            self._line(text.encode("utf-8"))

    def _sse_slow(self, piece: str) -> None:
        """One event (its lines, then the blank line that ended it) through the line parser."""
        for line in piece.split("\n"):
            self._line(line.encode("utf-8"))
        self._line(b"")

    def _sse_settle(self) -> None:
        """Read the complete lines of the event still arriving, as the line parser always did,
        so a snapshot shows what they noted; the rest of that event then takes `_sse_slow`."""
        buf = self.sse_buf
        cut = buf.rfind(b"\n") + 1
        if cut:
            lines = bytes(buf[:cut])
            del buf[:cut]
            for line in lines.split(b"\n")[:-1]:
                self._line(line[:-1] if line.endswith(b"\r") else line)

    def _line(self, line: bytes) -> None:
        st = self.st
        self.line_no += 1
        if self.mode == "ndjson":
            if line.strip():
                ok, obj = loads(line)
                if ok:
                    self.objects += 1
                    self.dialect.event(None, obj)
                else:
                    self.first_line_bad = self.first_line_bad or (self.objects == 0 and self.bad_lines == 0)
                    self.bad_lines += 1
                    st.note(f"line {self.line_no} is not JSON")
            return
        if not line:
            self._dispatch()
        elif line[:1] != b":":  # `:` starts a comment / keep-alive
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self.sse_data.append(line_text(value, st, f"line {self.line_no}"))
            elif name == b"event":
                self.sse_event = line_text(value, st, f"line {self.line_no}").strip()

    def _dispatch(self, at_end: bool = False) -> None:
        data, name = "\n".join(self.sse_data), self.sse_event
        self.sse_data, self.sse_event = [], None
        if not data.strip():
            return
        ok, obj = loads(data)
        if not ok and len(data.splitlines()) > 1:
            # Servers that end events with a single newline glue several into one.
            for piece in data.splitlines():
                self._dispatch_one(name, piece, at_end, loads(piece))
        else:
            self._dispatch_one(name, data, at_end, (ok, obj))

    def _dispatch_one(self, name: str | None, data: str, at_end: bool, parsed: tuple[bool, Any]) -> None:
        ok, obj = parsed
        if data.strip() == "[DONE]":
            self.dialect.done()
        elif not ok:
            if data.strip():
                self.st.note("stream ended inside an event" if at_end else f"line {self.line_no - 1} is not JSON")
        else:
            self.objects += 1
            if name == "error" and isinstance(obj, dict) and "error" not in obj:
                obj = {"type": "error", "error": obj}
            self.dialect.event(name, obj)

    def _finish(self) -> None:
        st = self.st
        if self.decoder is not None and not self.capped:
            self._take(self.decoder.flush(self.limit - self.taken + 1))
        cut = self.cut
        if self.capped and self.decoder is not None and self.decoder.encodings:
            st.note(decoded_cap_note(self.limit, ", ".join(reversed(self.decoder.encodings)), self.fed))
        elif self.capped:
            st.note(body_cut_note("response", self.limit))
        elif self.decoder is not None and not cut and (enc := self.decoder.truncated()) is not None:
            st.note(f"{enc} body is truncated")
        if self.mode == "sniff":
            head = b"".join(self.raw)
            self.mode, self.raw = _sniff(head, self.reader), []
            if head:
                self._consume(head)
        dead = self.decoder is not None and self.decoder.dead
        if self.mode == "whole":
            if dead:
                if self.is_error:
                    st.fail(self._error(None, b""))
            else:
                self._whole(b"".join(self.raw), cut)
            return
        if self.mode == "ndjson":
            rest = self.lines.rest()
            if rest.strip() and not cut:
                ok, obj = loads(rest)
                if ok:
                    self.objects += 1
                    self.dialect.event(None, obj)
                elif self.objects:
                    st.note("stream ended inside a line")
                else:
                    self.first_line_bad = True
            if self.raw and self.first_line_bad and not dead:
                # Not NDJSON after all (e.g. pretty-printed JSON): start over on the whole body.
                notes = [n for n in st.notes if not n.startswith("line ")]
                self.st = State()
                self.st.notes = notes
                self.dialect = type(self.dialect)(self.st)
                self.mode = "whole"
                self._whole(b"".join(self.raw), cut)
                return
        else:
            self._sse_catch_up()
            rest = bytes(self.sse_buf)
            self.sse_buf.clear()
            rest = rest[:-1] if rest.endswith(b"\r") else rest
            if cut:
                # The event the limit cut is not the stream's: it is left unread.
                self.sse_data, self.sse_event = [], None
            else:
                if rest.strip():
                    self._line(rest)
                self._dispatch(at_end=True)
        if cut:
            return  # how the stream ended is past what was read: `complete` stays unknown
        if st.complete is None and self.dialect.has_terminator:
            # (A dialect picked by no path has no known normal end: `complete` stays unknown.)
            st.complete = False
            if st.error is None and not dead:
                why = "stream ended without its terminator"
                st.note(why if self.objects else "stream carried nothing that was understood")

    def _whole(self, body: bytes, cut: bool = False) -> None:
        st = self.st
        if self.is_error:
            ok, obj = loads(body) if body.strip() else (False, None)
            if not ok:
                obj = body.decode("utf-8", errors="replace").strip() or None
            st.fail(self._error(obj, body))
            if isinstance(obj, dict):
                st.set_model(obj.get("model"))
            return
        if not body.strip():
            if self.reader.known:
                st.note("response body is empty")
            return
        ok, obj = loads(body)
        if ok:
            self.dialect.whole(obj)
            return
        if cut:
            return  # the first part of a document is not one: the note on the cut says enough
        try:
            body.decode("utf-8")
            st.note("response body is not JSON")
        except UnicodeDecodeError:
            st.note("response body is not valid UTF-8 and not JSON")

    def _error(self, obj: Any, body: bytes) -> dict:
        err = norm_error(obj if obj is not None else {"message": None}, self.status)
        if err["message"] is None and body:
            err["message"] = body.decode("utf-8", errors="replace")[:_MAX_ERROR_TEXT] or None
        if err["request_id"] is None:
            err["request_id"] = self.headers.get("request-id") or self.headers.get("x-request-id")
        err["retry_after_seconds"] = _retry_after(self.headers)
        return err


def _retry_after(headers: dict[str, str]) -> int | float | None:
    for name, scale in (("retry-after", 1.0), ("retry-after-ms", 0.001)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            secs = float(value.strip()) * scale
        except ValueError:
            continue  # an HTTP date: left to whoever needs the wall clock
        return int(secs) if secs == int(secs) else secs
    return None


def decode_body(body: bytes, encoding: str, limit: int = DEFAULT_BODY_LIMIT) -> tuple[bytes | None, bool]:
    """`body` with its content-encoding (a list, applied in order) undone: at most `limit`
    bytes, and whether the decoded body goes on past them. None when it cannot be decoded; a
    stream cut short decodes only when the body is as long as `limit` (the record's cut)."""
    encodings = [e.strip().lower() for e in encoding.split(",")]
    encodings = [e for e in encodings if e and e != "identity"]
    if not encodings:
        return body[:limit], len(body) > limit
    decoder = Decoder(encodings, State())
    out = decoder.feed(body, limit + 1)
    if len(out) <= limit:
        out += decoder.flush(limit + 1 - len(out))
    if decoder.dead or not decoder.encodings:  # not decodable, or not encoded after all
        return None, False
    if len(out) > limit:
        return out[:limit], True
    if decoder.truncated() is not None and len(body) < limit:
        return None, False
    return out, False


# -- the prompt ---------------------------------------------------------------------------------
# Keys of a request body that hold what the user sent, in every dialect: OpenAI chat, Anthropic
