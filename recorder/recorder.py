"""The recorder: the proxy's Sink, one writer thread that owns the DuckDB file.

The proxy calls the Sink methods on its event loop (under `llmtap run`, the recorder process's
reader calls them; see `process`); they only append to a deque. Every
`flush_interval_s` the writer takes what arrived, runs the extraction (in helper processes when
the batch is large, see `workers`), and commits the batch with the appender, so a record waits
at most that long and a kill -9 loses at most that window (DuckDB's WAL keeps every committed
batch). When the database cannot be written the records go to an append-only spool beside it,
imported on the next start: nothing is dropped silently.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb

from llmtap.recorder import schema
from llmtap.recorder.extract import Extraction, Extractor, make_extractor, prompt_text
from llmtap.recorder.follow import CpuFollower
from llmtap.recorder.live import LiveHub
from llmtap.recorder.record import Attempt, Call, QueuedSink, RecorderError, without_brief
from llmtap.recorder.redact import SECRET_HEADERS, fingerprint, redact_url
from llmtap.recorder.search_index import CHUNK_CALLS, SearchIndex
from llmtap.recorder.workers import Helpers, Job, extract_job

log = logging.getLogger("llmtap.recorder")
# json.dumps with options builds a new encoder per call; headers are encoded twice per call.
_headers_json = json.JSONEncoder(ensure_ascii=False).encode

CALL_COLUMNS = (
    "id", "started_at", "client", "api", "method", "url", "status", "model_requested", "model_sent",
    "model_reported", "provider", "route", "attempts", "stream", "complete", "ttfb_ms", "duration_ms",
    "request_headers", "request_body", "response_headers", "response_body", "reasoning", "content",
    "tool_calls", "finish_reason", "input_tokens", "output_tokens", "reasoning_tokens", "total_tokens",
    "error", "notes", "request_body_raw", "response_body_raw", "prompt",
)
ATTEMPT_COLUMNS = ("call_id", "n", "provider", "url", "model_sent", "status", "error", "started_at",
                   "duration_ms", "ttfb_ms")


# A batch this small leaves the writer time to index the next chunk of calls for search; past
# INDEX_BACKLOG_CALLS unindexed calls it indexes one chunk per batch even when busy, so that a
# proxy that is never idle still has bounded searches.
INDEX_IDLE_ITEMS = 64
INDEX_BACKLOG_CALLS = 16 * CHUNK_CALLS
# Rows are built and appended this many at a time, so that with helpers the writer appends one
# part while they extract the next.
ROWS_PART = 32
# A batch finishing more calls than this is committed in parts of this many (see `_write_batch`).
COMMIT_CALLS = 1024


def spool_path(db: Path) -> Path:
    return db.with_name(db.name + ".spool.jsonl")


class Recorder(QueuedSink):
    def __init__(self, db_path: Path, *, flush_interval_s: float = 0.25, queue_limit: int = 100_000,
                 serve: bool = True, helpers: int | None = None, offload_min: int = 32) -> None:
        """`helpers` processes (default: 2 where there are 2 CPUs or more, else none) extract the
        bodies of any batch that finishes `offload_min` calls or more; see `workers`."""
        super().__init__(queue_limit)
        self.db_path = Path(db_path).expanduser().absolute()
        self.flush_interval_s = flush_interval_s
        self.serve = serve
        self.hub = LiveHub()
        self.con: duckdb.DuckDBPyConnection | None = None
        self.endpoint: Any = None
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._extractors: dict[str, tuple[Extractor | None, int]] = {}  # id -> (extractor, bytes fed)
        self._calls: dict[str, Call] = {}  # started, not yet finished
        self._in_progress: set[str] = set()  # ids with an in-progress row in the DB
        # Of `dropped_total`, those already in the `dropped` table; written by the writer only.
        self._dropped_recorded = 0
        self._failing = False
        self.written = 0  # finished calls committed (or spooled)
        # Told `written` after each batch that finished calls (the recorder process reports it).
        self.on_written: Callable[[int], None] | None = None
        self.index: SearchIndex | None = None
        self._index_due = True  # calls may be waiting to be indexed
        self._indexed_at_written = 0  # `written` when the last chunk was built
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        if helpers is None:
            usable = len(cpus) if cpus is not None else os.cpu_count() or 1
            helpers = 2 if usable >= 2 else 0
        self.helpers = Helpers(helpers, cpus)
        self.offload_min = offload_min

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        # The thread that starts the recorder is the one that will feed it (the proxy's loop).
        self._follow = CpuFollower()
        # The file holds every prompt and answer: a folder llmtap makes is the user's alone.
        self.db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.con = duckdb.connect(str(self.db_path))
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise RecorderError(
                    f"{self.db_path} is held by another process: another `llmtap run`, an `llmtap tui` "
                    "or `llmtap stats` that opened it while no proxy ran, or a DuckDB program. DuckDB "
                    "lets one process at a time open a file; stop that one, or record elsewhere with --db PATH."
                ) from None
            raise RecorderError(f"cannot open {self.db_path}: {exc}") from None
        try:
            schema.migrate(self.con)
            self.index = SearchIndex(self.con)
            self._import_spool()
        except Exception:
            # Release the file so the caller (or the user) can retry at once.
            self.con.close()
            self.con = None
            raise
        self._thread = threading.Thread(target=self._run, name="llmtap-writer", daemon=True)
        self._thread.start()
        if self.serve:
            from llmtap.recorder.endpoint import Endpoint

            self.endpoint = Endpoint(self)
            self.endpoint.start()

    def close(self) -> None:
        """Commit everything queued, stop the threads, release the file."""
        if self.endpoint is not None:
            self.endpoint.stop()
            self.endpoint = None
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.helpers.stop()
        if self.con is not None:
            self.con.close()
            self.con = None

    @property
    def path(self) -> Path:
        """The DuckDB file (alias of `db_path`, for callers that label the source)."""
        return self.db_path

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor of the writer's database for a reader thread: MVCC lets it read while the
        writer commits, and it never takes a lock the writer waits on."""
        assert self.con is not None, "recorder not started"
        return self.con.cursor()

    # -- the Sink (QueuedSink), and what a recorder process adds ----------------------------------
    def adopt(self, ids: list[str]) -> None:
        """Calls that a recorder before this one (a process that died) may have written, in
        progress or finished: their finished rows handed over next replace those."""
        self._queue.append(("adopt", ids))

    # -- the writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        batch_at = time.monotonic()
        took = 0.0
        while True:
            # A record handed over just after a drain waits for the next one, then for that
            # batch's own work. Waking earlier by what the last batch took keeps the two within
            # the window under load. Timed from the start of the last batch, so that indexing
            # after a batch does not stretch the window either.
            self._wake.wait(max(0.0, batch_at + self.flush_interval_s - took - time.monotonic()))
            batch_at = time.monotonic()
            stopping = self._stop
            self._wake.clear()
            self._follow.step()
            items = 0
            try:
                items = self._write_batch()
            except Exception:  # the writer must survive anything; the batch went to the spool
                log.exception("llmtap recorder: unexpected error while writing")
            took = time.monotonic() - batch_at
            if stopping and not self._queue:
                return
            if not stopping:
                self._index_step(items)

    def _index_step(self, items: int) -> None:
        """Index the next chunk of calls for search when the last batch was small, or when
        the unindexed backlog has grown past INDEX_BACKLOG_CALLS."""
        index = self.index
        if index is None or not self._index_due:
            return
        if items > INDEX_IDLE_ITEMS and self.written - self._indexed_at_written < INDEX_BACKLOG_CALLS:
            return
        below = min(self._in_progress) if self._in_progress else None
        try:
            worked = index.step(below)
        except Exception:
            # Searches read unindexed calls anyway: slower, still right. Not worth a retry loop.
            log.exception("llmtap recorder: building the search index failed; searches read every body instead")
            self.index = None
            return
        if worked:
            self._indexed_at_written = self.written
        else:
            self._index_due = False  # until more calls are written

    def _write_batch(self) -> int:
        """Write what the queue holds; returns how many items that was."""
        # Most calls start and end within one batch. Without their start and chunks they skip
        # the live machinery and are read once, whole, at the end (about a tenth less writer
        # time per short call, time the writer would otherwise take from the proxy).
        items = without_brief(self._drain())
        total = self.dropped_total
        dropped, self._dropped_recorded = total - self._dropped_recorded, total
        if not items and not dropped:
            return 0
        started: dict[str, Call] = {}
        progressed: dict[str, None] = {}  # ordered set
        finished: list[tuple[Call, list[Attempt]]] = []
        for item in items:
            kind = item[0]
            if kind == "started":
                call = item[1]
                started[call.id] = call
                self._calls[call.id] = call
                self._extractors[call.id] = (None, 0)
                self.hub.track(call.id, None)
            elif kind == "chunk":
                self._feed(item[1], item[2])
                progressed[item[1]] = None
            elif kind == "adopt":
                self._in_progress.update(item[1])
            else:
                finished.append((item[1], item[2]))
        done_ids = {c.id for c, _ in finished}
        new_rows = [self._call_row(c) for cid, c in started.items() if cid not in done_ids]
        # A long backlog is committed in parts, and the helpers are handed the bodies of the
        # next part before this one commits: they extract while DuckDB writes.
        parts = [finished[i:i + COMMIT_CALLS] for i in range(0, len(finished), COMMIT_CALLS)] or [[]]
        extractions = self._extractions([c for c, _ in parts[0]])
        for n, part in enumerate(parts):
            calls = [c for c, _ in part]
            final_rows = _Rows(calls, self._final_rows(calls, extractions))
            if n + 1 < len(parts):
                extractions = self._extractions([c for c, _ in parts[n + 1]])
            attempt_rows = [_attempt_row(a) for _, attempts in part for a in attempts]
            replace = [c.id for c in calls if c.id in self._in_progress]
            first = n == 0
            try:
                self._commit_indexed(new_rows if first else [], final_rows, attempt_rows, replace,
                                     dropped if first else 0)
            except Exception as exc:
                self._spool(final_rows.all(), attempt_rows, dropped if first else 0, exc)
            else:
                if self._failing:
                    log.error("llmtap recorder: writing to %s works again", self.db_path)
                    self._failing = False
                if first:
                    self._in_progress.update(r[0] for r in new_rows)
            self._in_progress.difference_update(final_rows.ids)
            self.written += len(calls)
            if first:
                self.hub.publish("started", [r[0] for r in new_rows])
            self.hub.publish("finished", final_rows.ids)
        for cid in done_ids:
            if self._calls.pop(cid, None) is not None:  # it was tracked live
                self._extractors.pop(cid, None)
                self.hub.untrack(cid)
        self.hub.publish("progress", [cid for cid in progressed if cid not in done_ids])
        if finished:
            self._index_due = True
            if self.on_written is not None:
                self.on_written(self.written)
        return len(items)

    def _commit_indexed(self, new_rows: list[tuple], final_rows: _Rows, attempt_rows: list[tuple],
                        replace: list[str], dropped: int) -> None:
        """_commit, with the words of calls that land in an already indexed chunk added in the
        same transaction. Should that part fail, the rows still go in, and their chunks are
        dropped from the index instead (searches then read those calls)."""
        index = self.index
        ids = final_rows.ids
        if index is None or not ids or min(ids) > index.covered_to:
            self._commit(new_rows, final_rows, attempt_rows, replace, dropped)
            return
        try:
            self._commit(new_rows, final_rows, attempt_rows, replace, dropped, lambda: index.add_late(ids))
        except Exception:
            self._commit(new_rows, final_rows, attempt_rows, replace, dropped, lambda: index.uncover(ids))
            log.exception("llmtap recorder: indexing late calls failed; their chunks are left out of the index")

    def _commit(self, new_rows: list[tuple], final_rows: _Rows, attempt_rows: list[tuple],
                replace: list[str], dropped: int, also: Callable[[], None] | None = None) -> None:
        con = self.con
        if con is None:
            raise RuntimeError("the database is closed")
        with schema.transaction(con):
            if replace:
                con.execute("DELETE FROM calls WHERE id IN (SELECT unnest(?))", [replace])
            if new_rows or final_rows.ids:
                appender = con.appender("calls")
                if new_rows:
                    appender.append_rows(new_rows)
                for part in final_rows:
                    appender.append_rows(part)
                appender.flush()
            if attempt_rows:
                appender = con.appender("attempts")
                appender.append_rows(attempt_rows)
                appender.flush()
            if dropped:
                con.execute("INSERT INTO dropped VALUES (now(), ?, ?)",
                            [dropped, f"finished calls dropped: the recorder's queue was over "
                                      f"{self.queue_limit} records (the writer fell behind)"])
            if also is not None:
                also()

    # -- extraction ------------------------------------------------------------------------------
    def _feed(self, call_id: str, chunk: bytes) -> None:
        entry = self._extractors.get(call_id)
        if entry is None:
            return
        extractor, fed = entry
        if extractor is None and fed == 0:
            call = self._calls.get(call_id)
            # The Call is shared with the proxy, which set the status and response headers
            # before it forwarded the first chunk.
            if call is not None:
                try:
                    extractor = make_extractor(call.api, status=call.status, headers=call.response_headers)
                except Exception:  # a parser bug must not cost the record: the live view just goes without
                    log.exception("llmtap recorder: extraction failed to start for call %s", call_id)
                    extractor = None
                self.hub.track(call_id, extractor)
        with self.hub.lock:  # an endpoint thread may be taking a snapshot of this extractor
            if extractor is not None:
                try:
                    extractor.feed(chunk)
                except Exception:
                    log.exception("llmtap recorder: live extraction failed for call %s", call_id)
                    extractor = None
                    self.hub._partial[call_id] = (self.hub._partial.get(call_id, ([], None))[0], None)
            self.hub.grow(call_id, chunk)
        self._extractors[call_id] = (extractor, fed + len(chunk))

    def _extractions(self, calls: list[Call]) -> Iterator[Extraction]:
        """The extractions of finished calls, in order. `offload_min` calls or more are handed
        to the helpers at once, whole bodies, even where a live extractor has read part of one:
        their time is not taken from the proxy. Fewer are extracted here, as they are read."""
        if len(calls) >= self.offload_min and self.helpers.count:
            answers = self.helpers.map([_job(c) for c in calls], ROWS_PART)
            return (ex for part in answers for ex in part)
        return (self._extraction(c) for c in calls)

    def _final_rows(self, calls: list[Call], extractions: Iterator[Extraction]) -> Iterator[list[tuple]]:
        """The rows of finished calls, ROWS_PART at a time, as their extractions arrive."""
        part: list[tuple] = []
        for call, ex in zip(calls, extractions):
            part.append(self._call_row(call, ex))
            if len(part) == ROWS_PART:
                yield part
                part = []
        if part:
            yield part

    def _extraction(self, call: Call) -> Extraction:
        """The live extractor's result when it saw the whole body (chunks may have been skipped
        under load), else one pass over the body; never raises, so the row is always written."""
        extractor, fed = self._extractors.get(call.id, (None, 0))
        if extractor is not None and fed == len(call.response_body):
            try:
                return extractor.finish()
            except Exception:
                log.exception("llmtap recorder: live extraction failed for call %s", call.id)
        return extract_job(_job(call))

    # -- rows --------------------------------------------------------------------------------------
    def _call_row(self, call: Call, ex: Extraction | None = None) -> tuple:
        notes = list(call.notes)
        req_text, req_raw = _text(call.request_body)
        resp_bytes = call.response_body
        encoding = (call.response_headers.get("content-encoding") or "").lower().strip()
        if ex is not None and encoding not in ("", "identity") and resp_bytes:
            decoded = _decode(resp_bytes, encoding)
            if decoded is None:
                notes.append(f"response body is {encoding}-encoded and could not be decoded; kept raw")
            else:
                resp_bytes = decoded
                notes.append(f"response body arrived {encoding}-encoded; stored decoded")
        resp_text, resp_raw = _text(resp_bytes) if ex is not None else (None, None)
        if req_raw is not None:
            notes.append("request body is not UTF-8: kept in request_body_raw")
        if resp_raw is not None:
            notes.append("response body is not UTF-8: kept in response_body_raw")
        error = _scrub_text(call.error)
        notes = [_scrub_text(n) or "" for n in notes]
        if ex is not None:
            notes += [n for n in ex.notes if n not in notes]
            if error is None and ex.error:
                error = ex.error.get("message") or json.dumps(ex.error)
        return (
            call.id, call.started_at, call.client, call.api, call.method, redact_url(call.url),
            call.status if ex is not None else None,
            call.model_requested, call.model_sent, ex.model if ex else None, call.provider, call.route,
            call.attempts, call.stream if call.stream is not None else (ex.stream if ex else None),
            # A call the proxy saw fail (cut, reset, every attempt failed) did not complete,
            # whatever the part of the body that arrived looks like.
            (False if call.error else ex.complete) if ex else None, call.ttfb_ms, call.duration_ms if ex is not None else None,
            _headers_json(_scrub(call.request_headers)), req_text,
            _headers_json(_scrub(call.response_headers)) if ex is not None else None, resp_text,
            ex.reasoning if ex else None, ex.content if ex else None,
            json.dumps(ex.tool_calls) if ex and ex.tool_calls is not None else None,
            ex.finish_reason if ex else None,
            ex.input_tokens if ex else None, ex.output_tokens if ex else None,
            ex.reasoning_tokens if ex else None, ex.total_tokens if ex else None,
            error, json.dumps(notes) if notes else None, req_raw, resp_raw,
            prompt_text(req_text),
        )

    # -- failure: spool --------------------------------------------------------------------------
    def _spool(self, rows: list[tuple], attempts: list[tuple], dropped: int, exc: BaseException) -> None:
        path = spool_path(self.db_path)
        if not self._failing:
            log.error("llmtap recorder: cannot write to %s (%s). Proxying goes on; records are kept in %s "
                      "and imported on the next start. Free disk space or release the file, then restart.",
                      self.db_path, exc, path)
            self._failing = True
        lines = [json.dumps({"call": [_jsonable(v) for v in row]}) for row in rows]
        lines += [json.dumps({"attempt": [_jsonable(v) for v in row]}) for row in attempts]
        if dropped:
            lines.append(json.dumps({"dropped": dropped}))
        if not lines:
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            # Nowhere left to put them: say exactly how many were lost.
            log.error("llmtap recorder: %d records lost: cannot write the spool %s either (%s)",
                      len(rows), path, err)

    def _import_spool(self) -> None:
        path = spool_path(self.db_path)
        if not path.exists():
            return
        assert self.con is not None
        calls, attempts, dropped, bad = [], [], 0, 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                bad += 1  # a line cut by a crash mid-write
                continue
            if "call" in item:
                row = _from_jsonable(item["call"], CALL_COLUMNS)
                # A spool written before `prompt` existed has a value fewer per call.
                calls.append(row + [None] * (len(CALL_COLUMNS) - len(row)))
            elif "attempt" in item:
                attempts.append(_from_jsonable(item["attempt"], ATTEMPT_COLUMNS))
            elif "dropped" in item:
                dropped += int(item["dropped"])
        ids = [c[0] for c in calls]
        with schema.transaction(self.con):
            self.con.execute("DELETE FROM calls WHERE id IN (SELECT unnest(?))", [ids])
            # The appender, as in normal writing: a spool of hours of traffic imports in seconds.
            for table, rows in (("calls", calls), ("attempts", attempts)):
                if rows:
                    appender = self.con.appender(table)
                    appender.append_rows(rows)
                    appender.flush()
            if dropped or bad:
                self.con.execute("INSERT INTO dropped VALUES (now(), ?, ?)",
                                 [dropped + bad, "lost before the spool could keep them"])
            if self.index is not None:
                self.index.add_late(ids)
        path.unlink()
        log.warning("llmtap recorder: imported %d calls kept in %s while the database could not be written",
                    len(calls), path)


class _Rows:
    """Rows made part by part as their extractions arrive. Iterating again (a failed commit is
    retried or spooled) gives the parts already made, then makes the rest; nothing twice."""

    def __init__(self, calls: list[Call], parts: Iterator[list[tuple]]) -> None:
        self.ids = [c.id for c in calls]
        self._parts = parts
        self._made: list[list[tuple]] = []

    def __iter__(self) -> Iterator[list[tuple]]:
        yield from list(self._made)
        for part in self._parts:
            self._made.append(part)
            yield part

    def all(self) -> list[tuple]:
        return [row for part in self for row in part]


def _job(call: Call) -> Job:
    return (call.api, call.status, call.response_headers, call.response_body)


def _attempt_row(a: Attempt) -> tuple:
    return (a.call_id, a.n, a.provider, redact_url(a.url), a.model_sent, a.status, _scrub_text(a.error), a.started_at,
            a.duration_ms, a.ttfb_ms)


_FINGERPRINT = re.compile(r"^(\S+ )?[A-Za-z_-]{0,8}…[0-9a-f]{4}$")
# A secret query parameter inside free text (an error message quoting the upstream URL).
_QUERY_SECRET = re.compile(r"([?&](?:key|api_key|api-key|apikey|access_token|token)=)([^&\s\"']+)", re.IGNORECASE)


def _scrub(headers: dict[str, str] | list[tuple[str, str]]) -> dict[str, str]:
    """Redact again in case a caller forgot; a value that already is a fingerprint is kept
    (fingerprinting it again would make equal keys look different)."""
    pairs = headers.items() if isinstance(headers, dict) else headers
    out: dict[str, str] = {}
    for k, v in pairs:
        key = k.lower()
        if key in SECRET_HEADERS and not _FINGERPRINT.match(v):
            v = fingerprint(v)
        out[key] = f"{out[key]}, {v}" if key in out else v
    return out


def _scrub_text(text: str | None) -> str | None:
    if not text or "=" not in text:
        return text
    return _QUERY_SECRET.sub(lambda m: m.group(1) + fingerprint(m.group(2)), text)


def _text(body: bytes) -> tuple[str | None, bytes | None]:
    if not body:
        return (None, None)
    try:
        return body.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, bytes(body)


def _decode(body: bytes, encoding: str) -> bytes | None:
    """Undo a content-encoding (a list is applied in order, so undone in reverse)."""
    codings = [c.strip() for c in encoding.split(",") if c.strip() not in ("", "identity")]
    for coding in reversed(codings):
        out = _decode_one(body, coding)
        if out is None:
            return None
        body = out
    return body


def _decode_one(body: bytes, encoding: str) -> bytes | None:
    try:
        if encoding in ("gzip", "x-gzip"):
            return zlib.decompress(body, 47)
        if encoding == "deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:
                return zlib.decompress(body, -15)
        if encoding == "br":
            import brotli  # a dependency of mitmproxy

            return brotli.decompress(body)
    except Exception:
        return None
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"t": value.isoformat()}
    if isinstance(value, (bytes, bytearray)):
        return {"b": base64.b64encode(value).decode()}
    return value


def _from_jsonable(values: list, columns: tuple[str, ...]) -> list:
    out = []
    for v in values:
        if isinstance(v, dict) and "t" in v:
            out.append(datetime.fromisoformat(v["t"]))
        elif isinstance(v, dict) and "b" in v:
            out.append(base64.b64decode(v["b"]))
        else:
            out.append(v)
    return out
