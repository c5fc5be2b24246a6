"""The recorder: the proxy's Sink, one writer thread that owns the DuckDB file.

The proxy calls the Sink methods on its event loop (under `llmtap run`, the recorder process's
reader calls them; see `process`); they only append to a deque. Every
`flush_interval_s` the writer takes what arrived, runs the extraction (in helper processes when
the batch is large, see `workers`), and commits the batch with the appender, so a record waits
at most that long and a kill -9 loses at most that window (DuckDB's WAL keeps every committed
batch).

When the database cannot be opened or written (a full disk, a read-only folder, a file another
program holds), proxying goes on and the records wait in memory, up to `buffer_bytes`, while
the writer tries again with back-off: once it can write, the waiting records land, without a
restart. Past that bound the oldest records go to an append-only spool beside the file
(imported once writing works); when the spool cannot be written either, each call lost is
counted, said once, and the count lands in the `dropped` table when writing resumes.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb

from llmtap.recorder import schema
from llmtap.recorder.columns import ATTEMPT_COLUMNS, CALL_COLUMNS, attempt_tuple, call_tuple
from llmtap.recorder.events import Adopt, Attempt, CallFinished, CallStarted, Chunk, ResponseHead
from llmtap.recorder.extract import (
    CLIENT_LEFT_NOTE,
    Extraction,
    Extractor,
    decode_body,
    decoded_cap_note,
    left_after_the_end,
    make_extractor,
    prompt_text,
)
from llmtap.recorder.follow import CpuFollower
from llmtap.recorder.live import LiveHub
from llmtap.recorder.pricing import NOT_PRICED, Priced, Pricer, usage_of
from llmtap.recorder.record import (
    DEFAULT_BODY_LIMIT,
    Call,
    QueuedSink,
    RecorderError,
    body_cut_note,
    without_brief,
)
from llmtap.recorder.redact import Scrubber, redact_headers, redact_url
from llmtap.recorder.search_index import CHUNK_CALLS, MAX_LEVEL, SearchIndex
from llmtap.recorder.services import Options, Service
from llmtap.recorder.services import start as start_services
from llmtap.recorder.sessions import SessionStore
from llmtap.recorder.workers import Helpers, Job, extract_job, with_request

log = logging.getLogger("llmtap.recorder")
# json.dumps with options builds a new encoder per call; headers are encoded twice per call.
_headers_json = json.JSONEncoder(ensure_ascii=False).encode



# A batch this small leaves the writer time to index the next chunk of calls for search; past
# INDEX_BACKLOG_CHUNKS chunks' worth of unindexed calls it indexes one chunk per batch even when
# busy, so that a proxy that is never idle still has bounded searches.
INDEX_IDLE_ITEMS = 64
INDEX_BACKLOG_CHUNKS = 16
# Rows are built and appended this many at a time, so that with helpers the writer appends one
# part while they extract the next.
ROWS_PART = 32
# A batch finishing more calls than this is committed in parts of this many (see `_write_batch`).
COMMIT_CALLS = 1024
# Memory kept for records while the database cannot be written (`llmtap run --buffer-mb`).
BUFFER_BYTES = 256 << 20
# A failed open or write is tried again after RETRY_FIRST_S, doubling up to RETRY_MAX_S.
RETRY_FIRST_S = 0.25
RETRY_MAX_S = 5.0
# The spool is imported from its end, this much at a time (halved, down to SPOOL_PART_MIN,
# while a part does not fit on the disk): see Recorder._import_spool.
SPOOL_PART_BYTES = 4 << 20
SPOOL_PART_MIN = 64 << 10
INTERRUPTED = "interrupted: the proxy stopped before this call ended"
LOST = ("not recorded: when this call ended neither the database nor its spool could be written "
        "(counted in the `dropped` table)")
_DROP_REASONS = {
    "queue": "finished calls dropped: the recorder's queue was over {limit} records (the writer fell behind)",
    "store": "finished calls lost: neither the database nor its spool could be written (disk full?), "
             "and the memory buffer of {buffer} MB was full",
}


def spool_path(db: Path) -> Path:
    return db.with_name(db.name + ".spool.jsonl")


class Recorder(QueuedSink):
    def __init__(self, db_path: Path, *, flush_interval_s: float = 0.25, queue_limit: int = 100_000,
                 serve: bool = True, helpers: int | None = None, offload_min: int = 32,
                 body_limit: int = DEFAULT_BODY_LIMIT, buffer_bytes: int = BUFFER_BYTES,
                 close_interrupted: bool = True, services: Options | None = None,
                 index_chunk_calls: int = CHUNK_CALLS, index_max_level: int = MAX_LEVEL,
                 pricing: bool = True) -> None:
        """`helpers` processes (default: 2 where there are 2 CPUs or more, else none) extract the
        bodies of any batch that finishes `offload_min` calls or more; see `workers`. Of each
        body the record keeps, and extraction reads, at most `body_limit` bytes as it crossed
        the wire and as many once decoded.
        `buffer_bytes` bounds the records kept in memory while the database cannot be written.
        `close_interrupted`: on first open, close the calls a dead proxy left in progress (a
        recorder process started again for the same proxy must not: those calls go on).
        `services`: what runs beside the writer, fed from committed rows (see services.py).
        `index_chunk_calls`, `index_max_level`: the search index's chunks (see search_index).
        `pricing`: price each finished call (pricing.py), with the prices `services.rules` names."""
        super().__init__(queue_limit)
        self.body_limit = body_limit
        self.db_path = Path(db_path).expanduser().absolute()
        self.flush_interval_s = flush_interval_s
        self.serve = serve
        self.hub = LiveHub()
        self.hub.scrubber_for = self._live_scrubber
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
        self.buffer_bytes = buffer_bytes
        self.close_interrupted = close_interrupted
        # The `llmtap run` this recorder serves, as named to a second run refused the file
        # (the recorder process sets its parent's).
        self.run_pid = os.getpid()
        self._failing = False  # the last open or write of the database failed
        self._fail_reason = ""
        self._waiting: deque[_Batch] = deque()  # batches not yet committed, oldest first
        self._waiting_bytes = 0
        self._waited = 0  # finished calls that waited in this failing episode
        self._retry_at = 0.0
        self._retry_delay = RETRY_FIRST_S
        self._opened = False  # the database was opened once (the sweep of interrupted calls ran)
        self._owed: dict[str, int] = {}  # drop counts by reason, not yet in the `dropped` table
        self._lost = 0  # finished calls lost (neither database nor spool), this run
        self._lost_said = False
        self._overflow_said = False
        self._lost_open: set[str] = set()  # lost calls whose in-progress row is in the file
        self._serve_at = 0.0
        self._serve_said = False
        self._serve_lock = threading.Lock()
        self._spool_due = False  # the spool holds records to import once writing works
        self._import_at = 0.0
        self._import_delay = RETRY_FIRST_S
        self._import_said = False
        self.written = 0  # finished calls committed, waiting in memory or spooled
        # Told `written` after each batch that finished calls (the recorder process reports it).
        self.on_written: Callable[[int], None] | None = None
        self.index: SearchIndex | None = None
        self.index_chunk_calls = index_chunk_calls
        self.index_max_level = index_max_level
        self._index_due = True  # calls may be waiting to be indexed
        self._indexed_at_written = 0  # `written` when the last chunk was built
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        if helpers is None:
            usable = len(cpus) if cpus is not None else os.cpu_count() or 1
            helpers = 2 if usable >= 2 else 0
        self.helpers = Helpers(helpers, cpus)
        self.offload_min = offload_min
        self.options = services or Options()
        self.services: list[Service] = []
        # Work other threads hand the writer's thread (on_writer), run between batches.
        self._writer_jobs: deque[tuple[Callable[[], None], threading.Event, list[BaseException]]] = deque()
        self.pricer: Pricer | None = None
        if pricing:
            from llmtap.paths import default_prices

            self.pricer = Pricer(Path(self.options.rules) if self.options.rules else None, default_prices())
        # Session grouping, on the writer thread as final rows are made (sessions.py).
        self.sessions: SessionStore | None = None if self.options.sessions.get("off") else SessionStore(
            float(self.options.sessions.get("idle_s") or 0) or None)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Open the database and start the writer. Raises RecorderError only when another
        `llmtap run` records into the file; any other failure (full disk, read-only folder, a
        program holding the file) is said once, loudly, and the writer keeps trying to open it
        while records wait (see the module docstring)."""
        # The thread that starts the recorder is the one that will feed it (the proxy's loop).
        self._follow = CpuFollower()
        # Services first: opening the store imports a spool left by a full disk, and those
        # calls reach the services like any other commit.
        if self.options.any():
            self.services = start_services(self.options, self)
        try:
            self._open_store()
        except RecorderError:
            self._close_services()
            raise
        except Exception as exc:
            self._failed(exc, opening=True)
        if self.pricer is not None:  # its ~0.4 s of imports, before the first call needs them
            threading.Thread(target=self.pricer.warm, name="llmtap-prices", daemon=True).start()
        self._thread = threading.Thread(target=self._run, name="llmtap-writer", daemon=True)
        self._thread.start()

    def _open_store(self) -> None:
        """Open (or reopen) the database, close the calls a dead proxy left in progress, import
        the spool, serve reads. Raises what went wrong, with the file released."""
        from llmtap.paths import private_record
        from llmtap.recorder.endpoint import READ_CONFIG

        # The file holds every prompt and answer: a folder llmtap makes is the user's alone.
        self.db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        new = not self.db_path.exists()
        private_record(self.db_path)  # and files an older llmtap or a looser umask left open
        try:
            # Its cursors serve readers' SQL: no file access through DuckDB (endpoint.READ_CONFIG).
            con = duckdb.connect(str(self.db_path), config=READ_CONFIG)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                if new:
                    _remove_half_made(self.db_path)
                raise
            # DuckDB lets one process at a time open a file; only another llmtap run is refused.
            other = _other_run(self.db_path)
            if other is not None:
                raise RecorderError(
                    f"{self.db_path} is held by another process: the `llmtap run` with pid {other} records "
                    "into it. Stop that one, or record elsewhere with --db PATH."
                ) from None
            raise OSError(
                f"{self.db_path} is held by another program (a DuckDB shell or script, or an `llmtap tui` "
                "or `llmtap stats` that opened it while no proxy ran): DuckDB lets one process at a time "
                "open a file"
            ) from None
        try:
            schema.migrate(con)
            if not self._opened and self.close_interrupted:
                _close_interrupted(con)
        except Exception:
            con.close()  # release the file so that the next try (or the user) can open it
            if new:
                _remove_half_made(self.db_path)
            raise
        self.con = con
        self._opened = True
        if self.sessions is not None:
            self.sessions.attach(con)
        self.index = SearchIndex(con, chunk_calls=self.index_chunk_calls, max_level=self.index_max_level)
        self._spool_due, self._import_at = spool_path(self.db_path).exists(), 0.0
        self._import_due()
        self._serve_reads()

    def _serve_reads(self) -> None:
        """Start the read endpoint. Its discovery file sits beside the database: on a full disk
        it may not be written yet, which costs attached readers, never a record; tried again."""
        if not self.serve or self.endpoint is not None or self.con is None or time.monotonic() < self._serve_at:
            return
        with self._serve_lock:
            if not self._stop:  # close() stops the endpoint before the writer: none may start after
                self._start_endpoint()

    def _start_endpoint(self) -> None:
        from llmtap.recorder.endpoint import Endpoint

        endpoint = Endpoint(self)
        try:
            endpoint.start()
        except OSError as exc:
            endpoint.stop()
            endpoint.path.with_name(f"{endpoint.path.name}.{os.getpid()}.tmp").unlink(missing_ok=True)
            self._serve_at = time.monotonic() + RETRY_MAX_S
            if not self._serve_said:
                self._serve_said = True
                log.error("llmtap recorder: cannot write %s (%s): `llmtap tui` and `llmtap stats` cannot read "
                          "through this proxy until it can; recording goes on. Tried again every %.0f s.",
                          endpoint.path, exc, RETRY_MAX_S)
            return
        self.endpoint = endpoint

    def close(self) -> None:
        """Commit everything queued, stop the threads, release the file."""
        self._stop = True
        with self._serve_lock:  # the writer may be starting the endpoint late (see _serve_reads)
            if self.endpoint is not None:
                self.endpoint.stop()
                self.endpoint = None
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.helpers.stop()
        self._close_services()
        if self.con is not None:
            self.con.close()
            self.con = None

    @property
    def lost(self) -> int:
        """Of `written`, the finished calls lost: neither the database nor the spool could
        take them (each counted in the `dropped` table)."""
        return self._lost

    @property
    def path(self) -> Path:
        """The DuckDB file (alias of `db_path`, for callers that label the source)."""
        return self.db_path

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor of the writer's database for a reader thread: MVCC lets it read while the
        writer commits, and it never takes a lock the writer waits on."""
        con = self.con
        if con is None:
            raise RecorderError(f"{self.db_path} cannot be opened yet ({self._fail_reason}); "
                                "the proxy keeps the records until it can")
        return con.cursor()

    # -- the Sink (QueuedSink), and what a recorder process adds ----------------------------------
    def adopt(self, ids: list[str]) -> None:
        """Calls that a recorder before this one (a process that died) may have written, in
        progress or finished: their finished rows handed over next replace those."""
        self._queue.append(Adopt(tuple(ids)))

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
                if self._failing and time.monotonic() >= self._retry_at:
                    self._retry()
                self._serve_reads()
                items = self._write_batch()
                self._run_jobs()
            except Exception:  # the writer must survive anything; the batch waits or went to the spool
                log.exception("llmtap recorder: unexpected error while writing")
            took = time.monotonic() - batch_at
            if stopping and not self._queue:
                self._last_try()
                self._run_jobs()
                if self.on_written is not None:  # the last try may have lost what waited
                    self.on_written(self.written)
                return
            if not stopping:
                self._index_step(items)

    def on_writer(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the writer's thread between two batches and wait for it (what must not
        race the writer's own transactions on a table, such as the search index's); its error
        is raised here. Run at once when no writer runs."""
        thread = self._thread
        if thread is None or not thread.is_alive() or thread is threading.current_thread():
            fn()
            return
        done, errors = threading.Event(), list[BaseException]()
        self._writer_jobs.append((fn, done, errors))
        self._wake.set()
        while not done.wait(1.0):
            if not thread.is_alive():  # it stopped before taking the job
                if self._writer_jobs and self._writer_jobs[-1][1] is done:
                    self._writer_jobs.pop()
                fn()
                return
        if errors:
            raise errors[0]

    def in_progress(self) -> set[str]:
        """Ids of the calls with an in-progress row (a copy: the writer changes the set)."""
        return self._in_progress.copy()

    def _run_jobs(self) -> None:
        while self._writer_jobs:
            fn, done, errors = self._writer_jobs.popleft()
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)
            finally:
                done.set()

    def _index_step(self, items: int) -> None:
        """Index the next chunk of calls for search when the last batch was small, or when
        the unindexed backlog has grown past INDEX_BACKLOG_CHUNKS chunks."""
        index = self.index
        if index is None or not self._index_due:
            return
        backlog = INDEX_BACKLOG_CHUNKS * self.index_chunk_calls
        if items > INDEX_IDLE_ITEMS and self.written - self._indexed_at_written < backlog:
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
        if self.sessions is not None:
            self.sessions.recall()  # a restart's memory of the sessions it followed: once, first
        total = self.dropped_total
        if total > self._dropped_recorded:
            self._owed["queue"] = self._owed.get("queue", 0) + total - self._dropped_recorded
            self._dropped_recorded = total
        if not items and not (self._owed and not self._failing):
            return 0
        started: dict[str, Call] = {}
        progressed: dict[str, None] = {}  # ordered set
        finished: list[tuple[Call, tuple[Attempt, ...]]] = []
        for item in items:
            if isinstance(item, Chunk):
                self._feed(item.call_id, item.data)
                progressed[item.call_id] = None
            elif isinstance(item, CallFinished):
                call = Call.of_finish(item)
                self._bound(call)
                finished.append((call, item.tries))
            elif isinstance(item, CallStarted):
                call = Call.of_start(item)
                self._bound(call)
                started[call.id] = call
                self._calls[call.id] = call
                self._extractors[call.id] = (None, 0)
                self.hub.track(call.id, None)
            elif isinstance(item, ResponseHead):
                known = self._calls.get(item.call_id)
                if known is not None:  # its start was not dropped
                    known.head(item)
            elif isinstance(item, Adopt):
                self._in_progress.update(item.ids)
        done_ids = {c.id for c, _ in finished}
        new_rows = [self._call_row(c) for cid, c in started.items() if cid not in done_ids]
        # A long backlog is committed in parts, and the helpers are handed the bodies of the
        # next part before this one commits: they extract while DuckDB writes.
        parts = [finished[i:i + COMMIT_CALLS] for i in range(0, len(finished), COMMIT_CALLS)] or [[]]
        extractions = self._extractions([c for c, _ in parts[0]])
        for n, part in enumerate(parts):
            calls = [c for c, _ in part]
            # One scrubber per call, so its attempts are masked with the same secrets.
            scrubs = {c.id: Scrubber.for_call(c) for c in calls}
            final_rows = _Rows(calls, self._final_rows(calls, extractions, scrubs))
            if n + 1 < len(parts):
                extractions = self._extractions([c for c, _ in parts[n + 1]])
            attempt_rows = [_attempt_row(a, scrubs[c.id]) for c, attempts in part for a in attempts]
            first = n == 0
            self._write(_Batch(new_rows if first else [], final_rows, attempt_rows))
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

    # -- committing, and what happens when the database cannot be written ----------------------
    def _write(self, batch: _Batch) -> None:
        """Commit `batch`, or, while the database cannot be written, keep it waiting."""
        if self._failing:
            self._keep(batch)
            return
        try:
            self._commit_batch(batch)
        except Exception as exc:
            if not _storage_failure(exc):  # these rows themselves are refused: no retry helps
                self._spool(batch, exc)
                return
            self._failed(exc)
            self._keep(batch)

    def _commit_batch(self, batch: _Batch) -> None:
        """Commit a batch with the drop counts owed; replaces the in-progress rows of its calls."""
        replace = [cid for cid in batch.final_rows.ids if cid in self._in_progress]
        owed = dict(self._owed)
        self._commit_with_sessions(batch.new_rows, batch.final_rows, batch.attempt_rows, replace, owed)
        for reason, count in owed.items():
            left = self._owed.get(reason, 0) - count
            if left > 0:
                self._owed[reason] = left
            else:
                self._owed.pop(reason, None)
        self._in_progress.update(r[0] for r in batch.new_rows)
        self._in_progress.difference_update(batch.final_rows.ids)
        if self.services and batch.final_rows.ids:
            self._tell_services(batch.final_rows.all(), batch.attempt_rows)
        self._import_due()

    def _commit_with_sessions(self, new_rows: list[tuple], final_rows: _Rows, attempt_rows: list[tuple],
                              replace: list[str], dropped: dict[str, int]) -> None:
        """_commit_indexed, with the sessions the batch touched written in the same transaction.
        One commit a batch, not two: DuckDB checkpoints at the first commit after its WAL has
        passed the limit, and a small second commit after each batch's brought every checkpoint
        a batch sooner: more checkpoints, up to a third more of the writer's time at 2,000 calls/s.
        Nothing wrong with a session row costs a call: should those rows be refused, the calls
        go in without them, and those sessions' rows are left as they were."""
        store = self.sessions
        if store is None:
            self._commit_indexed(new_rows, final_rows, attempt_rows, replace, dropped)
            return
        try:
            self._commit_indexed(new_rows, final_rows, attempt_rows, replace, dropped, store)
        except _SessionsRefused as exc:
            store.failed(drop=True)
            log.error("llmtap recorder: writing sessions failed (%s); their calls are recorded, and those "
                      "sessions' rows are left as they were", exc.__cause__)
            self._commit_indexed(new_rows, final_rows, attempt_rows, replace, dropped)
            return
        except BaseException:
            store.failed(drop=False)  # written with the batch that is tried next
            raise
        store.committed()

    def _close_services(self) -> None:
        for service in self.services:
            try:
                service.close()
            except Exception:
                log.exception("llmtap recorder: a service failed to close")
        self.services = []

    def _tell_services(self, call_rows: list, attempt_rows: list) -> None:
        """Every commit of finished calls, the spool's import included, tells the services."""
        calls = [dict(zip(CALL_COLUMNS, row)) for row in call_rows]
        attempts = [dict(zip(ATTEMPT_COLUMNS, row)) for row in attempt_rows]
        for service in self.services:
            try:
                service.committed(calls, attempts)
            except Exception:  # a service's fault never reaches the writer
                log.exception("llmtap recorder: a service failed on committed rows")

    def _import_due(self) -> bool:
        """Import the spool if it holds records. One that cannot be imported yet (the space the
        spool itself takes may be what the database lacks) is tried again with back-off, and
        does not hold up the records that wait in memory."""
        if not self._spool_due or self.con is None or time.monotonic() < self._import_at:
            return True
        try:
            self._import_spool()
        except Exception as exc:
            if not _storage_failure(exc):
                log.error("llmtap recorder: cannot import %s (%s); it is kept, and imported on the next start",
                          spool_path(self.db_path), exc)
                return True
            self._spool_due = True
            self._import_delay = min(self._import_delay * 2, RETRY_MAX_S * 6)
            self._import_at = time.monotonic() + self._import_delay
            if not self._import_said:
                self._import_said = True
                log.error("llmtap recorder: cannot import %s yet (%s); it is kept and tried again, and imported "
                          "on the next start otherwise. To fix: %s.", spool_path(self.db_path),
                          " ".join(str(exc).split()), _fix(self.db_path, str(exc)))
            return True
        self._import_delay = RETRY_FIRST_S
        return True

    def _failed(self, exc: BaseException, opening: bool = False) -> None:
        """Say once per episode what is wrong and how to fix it; schedule the next try."""
        self._fail_reason = " ".join(str(exc).split()) or type(exc).__name__
        now = time.monotonic()
        if self._failing:
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX_S)
        else:
            self._failing = True
            self._retry_delay = RETRY_FIRST_S
            self._waited = 0
            log.error(
                "llmtap recorder: cannot %s %s: %s. The proxy goes on proxying; records wait in memory (up to "
                "%d MB, --buffer-mb) and are written as soon as the file can be written: llmtap tries again by "
                "itself, no restart needed. To fix: %s.",
                "open" if opening else "write to", self.db_path, self._fail_reason, self.buffer_bytes >> 20,
                _fix(self.db_path, self._fail_reason))
        self._retry_at = now + self._retry_delay

    def _keep(self, batch: _Batch) -> None:
        """Keep a batch in memory; past the bound the oldest go to the spool, or are counted lost."""
        if not (batch.new_rows or batch.final_rows.ids or batch.attempt_rows):
            return
        batch.materialize()
        self._waiting.append(batch)
        self._waiting_bytes += batch.size
        self._waited += len(batch.final_rows.ids)
        while self._waiting_bytes > self.buffer_bytes and self._waiting:
            if not self._overflow_said:
                self._overflow_said = True
                log.error("llmtap recorder: the memory buffer of %d MB is full while %s cannot be written; the "
                          "oldest records go to %s, imported once writing works", self.buffer_bytes >> 20,
                          self.db_path, spool_path(self.db_path))
            old = self._waiting.popleft()
            self._waiting_bytes -= old.size
            self._waited -= len(old.final_rows.ids)
            self._spool(old, None)

    def _retry(self) -> bool:
        """Open the database if need be and commit what waits, oldest first; True when all landed."""
        if self.con is None:
            try:
                self._open_store()
            except Exception as exc:
                self._failed(exc, opening=True)
                return False
        while self._waiting:
            batch = self._waiting[0]
            try:
                self._commit_batch(batch)
            except Exception as exc:
                if not _storage_failure(exc):
                    self._waiting.popleft()
                    self._waiting_bytes -= batch.size
                    self._spool(batch, exc)
                    continue
                if "invalidated" in str(exc) and self.con is not None:
                    # DuckDB gives up on a database after some I/O failures: open it afresh.
                    self.con.close()
                    self.con = None
                    self.index = None
                self._failed(exc)
                return False
            self._waiting.popleft()
            self._waiting_bytes -= batch.size
        self._import_due()
        if self._owed or self._lost_open:
            try:
                self._commit_batch(_Batch([], _Rows([], iter(())), []))
                self._close_lost()
            except Exception as exc:
                self._failed(exc)
                return False
        log.error("llmtap recorder: writing to %s works again: the %d calls that waited in memory are written%s",
                  self.db_path, self._waited, f"; {self._lost} calls were lost, counted in the `dropped` table"
                  if self._lost else "")
        self._failing = False
        self._lost_said = self._overflow_said = False  # a later episode is said again
        return True

    def _close_lost(self) -> None:
        """Close the in-progress rows of calls whose finished record was lost (and counted)."""
        ids = sorted(self._lost_open)
        if not ids or self.con is None:
            return
        with schema.transaction(self.con):
            self.con.execute("UPDATE calls SET complete = false, error = ? WHERE id IN (SELECT unnest(?)) "
                             "AND status IS NULL", [LOST, ids])
        self._in_progress.difference_update(ids)
        self._lost_open.clear()

    def _last_try(self) -> None:
        """At close: one more try, then whatever still waits goes to the spool, or is counted."""
        if not self._failing or self._retry():
            self._import_at = 0.0
            self._import_due()
            return
        while self._waiting:
            self._spool(self._waiting.popleft(), None)
        self._waiting_bytes = 0
        if self._owed and self._append_spool([json.dumps({"dropped": n, "reason": r}) for r, n in self._owed.items()]):
            self._owed.clear()
        if self._lost:
            log.error("llmtap recorder: %d calls were not recorded: neither %s nor its spool %s could be written "
                      "(%s)", self._lost, self.db_path, spool_path(self.db_path), self._fail_reason)
        elif spool_path(self.db_path).exists():
            log.error("llmtap recorder: the records that could not be written to %s are kept in %s and are "
                      "imported on the next start", self.db_path, spool_path(self.db_path))

    def _commit_indexed(self, new_rows: list[tuple], final_rows: _Rows, attempt_rows: list[tuple],
                        replace: list[str], dropped: dict[str, int], sessions: SessionStore | None = None) -> None:
        """_commit, with the words of calls that land in an already indexed chunk added in the
        same transaction. Should that part fail, the rows still go in, and their chunks are
        dropped from the index instead (searches then read those calls)."""
        index = self.index
        ids = final_rows.ids
        if index is None or not ids or min(ids) > index.covered_to:
            self._commit(new_rows, final_rows, attempt_rows, replace, dropped, None, sessions)
            return
        try:
            self._commit(new_rows, final_rows, attempt_rows, replace, dropped, lambda: index.add_late(ids), sessions)
        except Exception as exc:
            if _storage_failure(exc) or isinstance(exc, _SessionsRefused):
                raise
            self._commit(new_rows, final_rows, attempt_rows, replace, dropped, lambda: index.uncover(ids), sessions)
            log.exception("llmtap recorder: indexing late calls failed; their chunks are left out of the index")

    def _commit(self, new_rows: list[tuple], final_rows: _Rows, attempt_rows: list[tuple],
                replace: list[str], dropped: dict[str, int], also: Callable[[], None] | None = None,
                sessions: SessionStore | None = None) -> None:
        con = self.con
        if con is None:
            raise OSError("the database is not open")
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
            for reason, count in dropped.items():
                con.execute("INSERT INTO dropped VALUES (now(), ?, ?)", [count, self._drop_reason(reason)])
            if also is not None:
                also()
            if sessions is not None:
                try:
                    sessions.write(con)
                except Exception as exc:
                    if _storage_failure(exc):
                        raise
                    raise _SessionsRefused(str(exc)) from exc

    def _bound(self, call: Call) -> None:
        """No more of a body than the limit, whatever was handed over (the proxy's own limit
        may be larger)."""
        limit = self.body_limit
        for which in ("request", "response"):
            body = getattr(call, f"{which}_body")
            if len(body) > limit:
                note = body_cut_note(which, limit, len(body) if which == "request" else None)
                if note not in call.notes:
                    call.notes.append(note)
                setattr(call, f"{which}_body", body[:limit])

    def _live_scrubber(self, call_id: str) -> Scrubber | None:
        call = self._calls.get(call_id)  # read from an endpoint thread: one dict lookup
        return Scrubber.for_call(call) if call is not None else None

    # -- extraction ------------------------------------------------------------------------------
    def _feed(self, call_id: str, chunk: bytes) -> None:
        entry = self._extractors.get(call_id)
        if entry is None:
            return
        extractor, fed = entry
        room = self.body_limit - fed
        if room <= 0:
            return  # the record keeps no more of the body, so the live view reads no more
        if len(chunk) > room:
            chunk = chunk[:room]
        if extractor is None and fed == 0:
            call = self._calls.get(call_id)
            # Its ResponseHead, which the relay emits before the first chunk, set the status
            # and response headers.
            if call is not None:
                try:
                    extractor = make_extractor(call.api, status=call.status, headers=call.response_headers,
                                               limit=self.body_limit)
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
            answers = self.helpers.map([_job(c, self.body_limit, self.sessions is not None) for c in calls], ROWS_PART)
            return (ex for part in answers for ex in part)
        return (self._extraction(c) for c in calls)

    def _final_rows(self, calls: list[Call], extractions: Iterator[Extraction],
                    scrubs: dict[str, Scrubber]) -> Iterator[list[tuple]]:
        """The rows of finished calls, ROWS_PART at a time, as their extractions arrive."""
        part: list[tuple] = []
        for call, ex in zip(calls, extractions):
            part.append(self._call_row(call, ex, scrubs[call.id]))
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
                return with_request(extractor.finish(), call.api, call.request_body, self.sessions is not None)
            except Exception:
                log.exception("llmtap recorder: live extraction failed for call %s", call.id)
        return extract_job(_job(call, self.body_limit, self.sessions is not None))

    # -- rows --------------------------------------------------------------------------------------
    def _call_row(self, call: Call, ex: Extraction | None = None, scrub: Scrubber | None = None) -> tuple:
        # Every text of the row goes through the call's scrubber: the secrets it carried, its
        # request body's credential fields, and the key shapes, wherever they appear.
        scrub = scrub or Scrubber.for_call(call)
        t, b = scrub.text, scrub.body
        notes = list(call.notes)
        req_text, req_raw = _text(scrub.request_body)
        resp_bytes = call.response_body
        encoding = (call.response_headers.get("content-encoding") or "").lower().strip()
        if ex is not None and encoding not in ("", "identity") and resp_bytes:
            decoded, over = decode_body(resp_bytes, encoding, self.body_limit)
            if decoded is None:
                notes.append(f"response body is {encoding}-encoded and could not be decoded; kept raw")
            else:
                notes.append(f"response body arrived {encoding}-encoded; stored decoded")
                if over:
                    notes.append(decoded_cap_note(self.body_limit, encoding, len(resp_bytes)))
                resp_bytes = decoded
        resp_text, resp_raw = _text(resp_bytes) if ex is not None else (None, None)
        if req_raw is not None:
            notes.append("request body is not UTF-8: kept in request_body_raw")
        if resp_raw is not None:
            notes.append("response body is not UTF-8: kept in response_body_raw")
        proxy_error = call.error
        if left_after_the_end(call.client_left, call.status, ex):
            proxy_error = None
            notes.append(CLIENT_LEFT_NOTE)
        error = proxy_error
        if ex is not None:
            notes += [n for n in ex.notes if n not in notes]
            if error is None and ex.error:
                error = ex.error.get("message") or json.dumps(ex.error)
        notes = [t(n) or "" for n in notes]
        req_text = b(req_text)
        reasoning, content = (b(ex.reasoning), b(ex.content)) if ex else (None, None)
        tool_calls = b(json.dumps(ex.tool_calls)) if ex and ex.tool_calls is not None else None
        # A key shape whole in an answer's body is whole in what was extracted from it too
        # (a key the model writes is split across stream events anyway), and an answer may
        # echo its request: a clean answer's body is searched for shapes only when the
        # request or the extracted text had one. Errors and unknown APIs always are.
        whole = (ex is None or not ex.complete or (call.status or 0) >= 400 or call.api == "other"
                 or scrub.found_shapes)
        resp_text = b(resp_text) if whole else scrub.literal(resp_text)
        row = {
            "id": call.id, "started_at": call.started_at, "client": t(call.client), "api": call.api,
            "method": call.method, "url": t(redact_url(call.url)),
            "status": call.status if ex is not None else None,
            "model_requested": t(call.model_requested), "model_sent": t(call.model_sent),
            "model_reported": t(ex.model) if ex else None, "provider": call.provider, "route": call.route,
            "attempts": call.attempts,
            "stream": call.stream if call.stream is not None else (ex.stream if ex else None),
            # A call the proxy saw fail (cut, reset, every attempt failed) did not complete,
            # whatever the part of the body that arrived looks like.
            "complete": (False if proxy_error else ex.complete) if ex else None,
            "ttfb_ms": call.ttfb_ms, "duration_ms": call.duration_ms if ex is not None else None,
            "request_headers": t(_headers_json(redact_headers(call.request_headers.items()))),
            "request_body": req_text,
            "response_headers": t(_headers_json(redact_headers(call.response_headers.items()))) if ex is not None else None,
            "response_body": resp_text, "reasoning": reasoning, "content": content, "tool_calls": tool_calls,
            "finish_reason": t(ex.finish_reason) if ex else None,
            "input_tokens": ex.input_tokens if ex else None, "output_tokens": ex.output_tokens if ex else None,
            "reasoning_tokens": ex.reasoning_tokens if ex else None, "total_tokens": ex.total_tokens if ex else None,
            "error": t(error), "notes": json.dumps(notes) if notes else None,
            "request_body_raw": scrub.raw(req_raw), "response_body_raw": scrub.raw(resp_raw),
            # Read with the answer from the body as it crossed, then masked (workers.with_request);
            # of a call in progress, from the masked body.
            "prompt": b(ex.prompt) if ex is not None else prompt_text(req_text),
            "cache_read_tokens": ex.cache_read_tokens if ex else None,
            "cache_write_tokens": ex.cache_write_tokens if ex else None,
            "usage_raw": _usage_json(ex, b),
            **self._cost(call, ex),
            "session_id": None, "session_link": None, "parent_call_id": None, "turn": None,
        }
        if ex is not None and self.sessions is not None:
            self.sessions.link(call, row, ex.facts, ex.response_id, t)
        return call_tuple(row)

    def _cost(self, call: Call, ex: Extraction | None) -> dict[str, Any]:
        """The cost columns of a finished call; pricing never costs the record."""
        priced: Priced = NOT_PRICED
        if ex is not None and self.pricer is not None:
            try:
                priced = self.pricer.price(
                    usage_of(ex), provider=call.provider, models=(ex.model, call.model_sent, call.model_requested),
                    url=call.url, when=call.started_at)
            except Exception:
                log.exception("llmtap recorder: pricing failed for call %s; it is left unpriced", call.id)
        return {"cost_usd": priced.cost_usd, "cost_source": priced.source, "cost_detail": priced.detail_json()}

    # -- failure: spool --------------------------------------------------------------------------
    def _spool(self, batch: _Batch, exc: BaseException | None) -> None:
        """Append a batch's finished rows to the spool; when that fails too, count them lost."""
        path = spool_path(self.db_path)
        if exc is not None:
            log.error("llmtap recorder: %s refused %d records (%s); they are kept in %s and imported once "
                      "writing works", self.db_path, len(batch.final_rows.ids), exc, path)
        rows = batch.final_rows.all()
        lines = [json.dumps({"call": [_jsonable(v) for v in row]}) for row in rows]
        lines += [json.dumps({"attempt": [_jsonable(v) for v in row]}) for row in batch.attempt_rows]
        if not rows or self._append_spool(lines):
            # Rows the database refused wait for the next start; those it could not take, for
            # the moment writing works again.
            self._spool_due = self._spool_due or (exc is None and bool(rows))
            return
        # Nowhere left to put them: count each, and say so once with what to do. A row already
        # in progress for one of them is closed once writing works.
        self._lost_open.update(cid for cid in batch.final_rows.ids if cid in self._in_progress)
        self._lost += len(rows)
        self._owed["store"] = self._owed.get("store", 0) + len(rows)
        if not self._lost_said:
            self._lost_said = True
            log.error("llmtap recorder: records are being lost: %s cannot be written (%s), the memory buffer of "
                      "%d MB is full and the spool %s cannot be written either. Each lost call is counted and "
                      "the count goes to the `dropped` table once writing works. Free disk space on the file "
                      "system of %s.", self.db_path, self._fail_reason, self.buffer_bytes >> 20, path,
                      self.db_path)

    def _append_spool(self, lines: list[str]) -> bool:
        """Append whole lines or nothing: a write cut short (a full disk) is truncated away, so
        no torn line swallows the lines after it."""
        path = spool_path(self.db_path)
        data = ("\n".join(lines) + "\n").encode("utf-8")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError:
            return False
        try:
            start = os.fstat(fd).st_size
            if start and os.pread(fd, 1, start - 1) != b"\n":
                data = b"\n" + data  # a tail torn by a crash: keep it on a line of its own
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            return True
        except OSError:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            return False
        finally:
            os.close(fd)

    def _drop_reason(self, key: str) -> str:
        """The `dropped.reason` text for a key of `_owed` (or a reason read from the spool)."""
        if key in _DROP_REASONS:
            return _DROP_REASONS[key].format(limit=self.queue_limit, buffer=self.buffer_bytes >> 20)
        return key

    def _import_spool(self) -> None:
        """Import the spool from its end, a part at a time, each committed and then cut off the
        file: as the WAL grows by a part, the spool shrinks by it. An import so needs the free
        space of one part, not of the whole spool beside its copy (a disk freed of a little
        space drains; the whole spool at once did not fit until more was freed), and memory
        holds one part, not hours of spooled traffic. A part that does not fit is halved and
        tried again. No CHECKPOINT of its own: one that fails for space makes DuckDB give up
        on the database until it is opened again (the WAL keeps what was committed; DuckDB
        folds it in when it has room). The database keeps, in the part's own
        transaction, which bytes of which spool it took (`_spool_import`), so that a crash
        between the commit and the cut never imports a part twice. Raises what stopped it;
        the parts imported before stay imported."""
        path = spool_path(self.db_path)
        self._spool_due = False
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return
        assert self.con is not None
        calls = 0
        want = SPOOL_PART_BYTES
        try:
            self._cut_imported(fd)
            ino = os.fstat(fd).st_ino
            while (size := os.fstat(fd).st_size) > 0:
                start, part = _spool_tail(fd, size, want)
                try:
                    calls += self._import_part(ino, start, size, part)
                except Exception as exc:
                    if _storage_failure(exc) and want > SPOOL_PART_MIN:
                        want = max(want // 2, SPOOL_PART_MIN)
                        continue
                    raise
                os.ftruncate(fd, start)
                os.fsync(fd)
        finally:
            os.close(fd)
            if calls:
                log.warning("llmtap recorder: imported %d calls kept in %s while the database could not be written",
                            calls, path)
        path.unlink()
        try:
            self.con.execute("DELETE FROM _spool_import")
        except duckdb.Error:
            pass  # stale: the next import checks the file it names before it trusts it

    def _import_part(self, ino: int, start: int, stop: int, part: bytes) -> int:
        """Commit the spool's bytes [start, stop) (whole lines); returns the calls they held."""
        assert self.con is not None
        calls, attempts, bad = [], [], 0
        dropped: dict[str, int] = {}
        for line in part.decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
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
                reason = str(item.get("reason", "lost before the spool could keep them"))
                dropped[reason] = dropped.get(reason, 0) + int(item["dropped"])
        if bad:
            key = f"{bad} cut lines of the spool {spool_path(self.db_path).name}, each a record lost in a crash while it was written"
            dropped[key] = bad
        ids = [c[0] for c in calls]
        with schema.transaction(self.con):
            self.con.execute("DELETE FROM calls WHERE id IN (SELECT unnest(?))", [ids])
            # The appender, as in normal writing: a spool of hours of traffic imports in seconds.
            for table, rows in (("calls", calls), ("attempts", attempts)):
                if rows:
                    appender = self.con.appender(table)
                    appender.append_rows(rows)
                    appender.flush()
            for reason, count in dropped.items():
                self.con.execute("INSERT INTO dropped VALUES (now(), ?, ?)", [count, self._drop_reason(reason)])
            if self.index is not None:
                self.index.add_late(ids)
            self.con.execute("DELETE FROM _spool_import")
            self.con.execute("INSERT INTO _spool_import VALUES (?, ?, ?, ?)", [ino, start, stop, zlib.crc32(part)])
        self._in_progress.difference_update(ids)
        if self.services and calls:
            self._tell_services(calls, attempts)
        return len(calls)

    def _cut_imported(self, fd: int) -> None:
        """Cut off the spool the part the database says it imported, should a crash have come
        between that commit and the cut: the same file (inode), the same bytes (CRC-32)."""
        assert self.con is not None
        row = self.con.execute("SELECT ino, start, stop, crc FROM _spool_import").fetchall()
        st = os.fstat(fd)
        if not row or row[0][0] != st.st_ino or not 0 <= row[0][1] < row[0][2] <= st.st_size:
            return
        _, start, stop, crc = row[0]
        if zlib.crc32(os.pread(fd, stop - start, start)) != crc:
            return
        # Lines appended after the crash move down over the imported part.
        at = stop
        while at < st.st_size:
            piece = os.pread(fd, min(SPOOL_PART_BYTES, st.st_size - at), at)
            os.pwrite(fd, piece, start + at - stop)
            at += len(piece)
        os.ftruncate(fd, st.st_size - (stop - start))
        os.fsync(fd)
        log.warning("llmtap recorder: %s: skipped the part already imported before a crash", spool_path(self.db_path))


def _spool_tail(fd: int, size: int, want: int) -> tuple[int, bytes]:
    """The last whole lines of a spool of `size` bytes, about `want` bytes of them (more when
    its last line alone is longer), and where they start."""
    lo = max(0, size - want)
    while True:
        data = os.pread(fd, size - lo, lo)
        if lo == 0:
            return 0, data
        i = data.find(b"\n")
        if 0 <= i < len(data) - 1:
            return lo + i + 1, data[i + 1:]
        lo = max(0, lo - (size - lo))  # inside the last line: read twice as far back


class _Batch:
    """What one commit writes: in-progress rows, finished rows and their attempts."""

    def __init__(self, new_rows: list[tuple], final_rows: _Rows, attempt_rows: list[tuple]) -> None:
        self.new_rows = new_rows
        self.final_rows = final_rows
        self.attempt_rows = attempt_rows
        self.size = 0

    def materialize(self) -> None:
        """Make every row now (they wait in memory), and weigh them for the buffer's bound."""
        rows = self.final_rows.all()
        self.size = sum(_weight(r) for r in rows) + sum(_weight(r) for r in self.new_rows) + 200 * len(self.attempt_rows)


def _weight(row: tuple) -> int:
    return 200 + sum(len(v) for v in row if isinstance(v, (str, bytes)))


def _fix(db: Path, reason: str) -> str:
    """What the user can do about a database that cannot be opened or written."""
    text = reason.lower()
    if "held by another program" in text:
        return "close that program (recording starts by itself once it lets go), or record elsewhere with --db PATH"
    if "no space" in text or "disk full" in text or "quota" in text:
        return f"free disk space on the file system of {db.parent}"
    if "read-only" in text or "permission" in text or "access" in text:
        return f"make {db.parent} writable, or record elsewhere with --db PATH"
    return (f"free disk space on the file system of {db.parent} or make it writable, or record elsewhere "
            "with --db PATH")


def _storage_failure(exc: BaseException) -> bool:
    """Whether a failed commit is the store's fault (full disk, I/O, a closed or held file), so
    that it is worth waiting and trying again, rather than these rows' (which no retry fixes)."""
    if isinstance(exc, (OSError, duckdb.IOException, duckdb.TransactionException, duckdb.FatalException,
                        duckdb.ConnectionException)):
        return True
    text = str(exc).lower()
    return any(w in text for w in ("no space", "could not write", "read-only", "invalidated", "closed", "i/o"))


def _remove_half_made(db: Path) -> None:
    """A database file this recorder just created but could not finish (the disk filled up
    meanwhile) is not a valid DuckDB file, and would fail every later open: remove it."""
    for path in (db, db.with_name(db.name + ".wal")):
        try:
            path.unlink()
        except OSError:
            pass


def _other_run(db: Path) -> int | None:
    """The pid of a live `llmtap run` that serves `db` (its discovery file says so), or None."""
    from llmtap.recorder.endpoint import discovery_path

    try:
        info = json.loads(discovery_path(db).read_text())
        pid = int(info.get("pid", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    if pid <= 0 or pid == os.getpid() or info.get("db") != str(db):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    run_pid = info.get("run_pid")
    return run_pid if isinstance(run_pid, int) and run_pid > 0 else pid


def _close_interrupted(con: duckdb.DuckDBPyConnection) -> None:
    """Rows a dead proxy left in progress (it was killed, or its host lost power) are closed
    as interrupted: nothing will ever finish them."""
    rows = con.execute("SELECT id, notes FROM calls WHERE status IS NULL AND duration_ms IS NULL "
                       "AND error IS NULL").fetchall()
    if not rows:
        return
    updates = []
    for cid, notes in rows:
        try:
            listed = json.loads(notes) if notes else []
        except ValueError:
            listed = [notes]
        if not isinstance(listed, list):
            listed = [listed]
        updates.append([INTERRUPTED, json.dumps([*listed, INTERRUPTED]), cid])
    with schema.transaction(con):
        con.executemany("UPDATE calls SET complete = false, error = ?, notes = ? WHERE id = ?", updates)
    log.warning("llmtap recorder: %d calls left in progress by a proxy that stopped are closed as interrupted",
                len(rows))


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


class _SessionsRefused(Exception):
    """The database refused the session rows of a batch (not its calls, not a storage failure)."""


def _job(call: Call, limit: int, sessions: bool) -> Job:
    return (call.api, call.status, call.response_headers, call.response_body, limit, call.request_body, sessions)


def _usage_json(ex: Extraction | None, scrub: Callable[[str | None], str | None]) -> str | None:
    """The provider's usage object as JSON, through the call's scrubber like every body."""
    raw = ex.usage.raw if ex is not None else None
    if raw is None:
        return None
    try:
        return scrub(json.dumps(raw, ensure_ascii=False))
    except (TypeError, ValueError):
        return None


def _attempt_row(a: Attempt, scrub: Scrubber) -> tuple:
    return attempt_tuple({
        "call_id": a.call_id, "n": a.n, "provider": a.provider, "url": scrub.text(redact_url(a.url)),
        "model_sent": scrub.text(a.model_sent), "status": a.status, "error": scrub.text(a.error),
        "started_at": a.started_at, "duration_ms": a.duration_ms, "ttfb_ms": a.ttfb_ms,
    })


def _text(body: bytes | None) -> tuple[str | None, bytes | None]:
    if not body:
        return (None, None)
    try:
        return body.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, bytes(body)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"t": value.isoformat()}
    if isinstance(value, Decimal):  # cost_usd: exact, as text
        return {"d": str(value)}
    if isinstance(value, (bytes, bytearray)):
        return {"b": base64.b64encode(value).decode()}
    return value


def _from_jsonable(values: list, columns: tuple[str, ...]) -> list:
    out: list[Any] = []
    for v in values:
        if isinstance(v, dict) and "t" in v:
            out.append(datetime.fromisoformat(v["t"]))
        elif isinstance(v, dict) and "b" in v:
            out.append(base64.b64decode(v["b"]))
        elif isinstance(v, dict) and "d" in v:
            out.append(Decimal(v["d"]))
        else:
            out.append(v)
    return out
