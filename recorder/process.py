"""The recorder in a process of its own, for `llmtap run`.

In one process, the recorder's writer shares the GIL and the CPU caches with the proxy's
event loop. DuckDB's append and commit cost about 20 us of CPU per small call, and they take
the GIL back a dozen times per batch (a signal check, then re-entry after each native step).
At saturation on two CPUs the loop lost about three times the writer's own time: the proxy
recording served 0.86x the calls of one not recording. Here the proxy only hands over the
events it emitted (see `events`), pickled as the plain tuples of their fields, from a thread that wakes every SEND_INTERVAL_S and follows
the loop's CPU. Everything else runs in the child, `python -m llmtap.recorder.process DB
FLUSH_S BODY_LIMIT`, which owns the DuckDB file and serves the read endpoint (see `Recorder`).

The child lives as long as its input. The proxy closes it on a graceful stop, and a kill -9
of the proxy closes it too: either way the child commits everything it was handed, then
exits. It ignores SIGINT and SIGTERM, which a terminal or a service manager sends to the whole
process group, so that the proxy decides when recording ends.

Should the child die (a crash in DuckDB, the OOM killer), the proxy keeps proxying and says
so. It keeps every finished call it handed over until the child reports it committed, and
hands those again to a new child, which replaces any row the dead one left. A new child
starts at once, later ones at most once a minute; meanwhile records wait in the bounded queue.

A child that cannot open or write the file (a full disk, a read-only folder, a file another
program holds) starts all the same and keeps the records until it can (see `Recorder`); it
reports them as committed, so the proxy does not keep a second copy. Only another `llmtap run`
recording into the file makes it refuse to start.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO

from llmtap.recorder.events import Adopt, CallFinished, CallStarted, Chunk, Dropped, ResponseHead, from_wire, to_wire
from llmtap.recorder.events import wire_call_id as _finished_id
from llmtap.recorder.follow import CpuFollower
from llmtap.recorder.record import DEFAULT_BODY_LIMIT, QueuedSink, RecorderError, without_brief
from llmtap.recorder.services import Options

if TYPE_CHECKING:
    from llmtap.recorder.recorder import Recorder

log = logging.getLogger("llmtap.recorder")

_LEN = struct.Struct("<Q")
# The proxy hands records over this often; the child commits every flush interval minus
# this, so that a record still waits at most the flush interval in all.
SEND_INTERVAL_S = 0.025
RESTART_EVERY_S = 60.0


class RecorderProcess(QueuedSink):
    """The proxy's Sink when the recorder runs in a child process; see the module docstring."""

    def __init__(self, db_path: Path, *, flush_interval_s: float = 0.25, queue_limit: int = 100_000,
                 body_limit: int = DEFAULT_BODY_LIMIT, buffer_bytes: int | None = None,
                 services: Options | None = None) -> None:
        super().__init__(queue_limit)
        self.services = services or Options()  # what the child runs beside its writer
        self.db_path = Path(db_path).expanduser().absolute()
        self.flush_interval_s = flush_interval_s
        self.body_limit = body_limit  # see `Recorder`
        self.buffer_bytes = buffer_bytes  # the child's bound on records waiting for the database
        self.proc: subprocess.Popen | None = None
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._dropped_sent = 0  # of `dropped_total`, those handed over
        self._open: set[str] = set()  # calls whose start was handed over, until they finish
        self._pending: list[tuple] = []  # wire items the last child did not take, for the next one
        self._handed = 0  # finished calls written to the current child
        self._committed = 0  # of those, committed (or spooled), as the child last said
        self._committed_earlier = 0  # committed by the children before the current one
        self._lost = 0  # of `_committed`, lost: neither its database nor its spool took them
        self._lost_earlier = 0
        self._unacked: deque[tuple] = deque()  # the finished wire items handed but not yet committed
        self._exited = threading.Event()  # the current child closed its output
        self._progress: threading.Thread | None = None
        self._starting: subprocess.Popen | None = None  # begun, not yet waited for
        self._restarted_at: float | None = None
        self.restarts = 0
        self._bug_said = False

    @property
    def path(self) -> Path:
        return self.db_path

    @property
    def handed_over(self) -> int:
        """Finished calls written to the current recorder process."""
        return self._handed

    @property
    def committed(self) -> int:
        """Of those, the ones it reported committed (or spooled)."""
        return self._committed

    @property
    def committed_total(self) -> int:
        """Finished calls committed (or spooled, or lost and counted) by every recorder process
        since start(): the calls the proxy need not hand over again."""
        return self._committed_earlier + self._committed

    @property
    def lost_total(self) -> int:
        """Of `committed_total`, the calls lost: the disk took neither them nor the spool."""
        return self._lost_earlier + self._lost

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the child and wait until it is ready; raises RecorderError with the child's
        own message when it cannot (another `llmtap run` records into the file, say). A file
        the child cannot open yet is no such case: it says so and keeps trying."""
        self.begin()
        self.wait_ready()

    def begin(self) -> None:
        """start()'s first half: the child starts loading DuckDB and opening the file while
        the caller does other work (`llmtap run` imports mitmproxy meanwhile)."""
        self._follow = CpuFollower()  # the thread that starts the recorder is the proxy's loop
        self._starting = self._popen()

    def wait_ready(self) -> None:
        """start()'s second half: wait until the child begun holds the file."""
        proc, self._starting = self._starting, None
        if proc is None:
            raise RecorderError("the recorder process was not begun")
        self._await_ready(proc)
        self._thread = threading.Thread(target=self._run, name="llmtap-record-send", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Hand over everything queued, then let the child commit it and exit."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _spawn(self) -> None:
        self._await_ready(self._popen())

    def _popen(self) -> subprocess.Popen:
        child_flush = max(0.01, self.flush_interval_s - SEND_INTERVAL_S)
        # Only the first child closes the calls a dead proxy left in progress: those a child
        # started again finds are this proxy's, and go on.
        args = [str(self.db_path), str(child_flush), str(self.buffer_bytes or 0),
                "sweep" if self._restarted_at is None else "keep", str(self.body_limit),
                self.services.to_json()]
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "llmtap.recorder.process", *args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        except OSError as exc:
            raise RecorderError(f"cannot start the recorder process: {exc}") from None

    def _await_ready(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode("utf-8", "replace").rstrip("\n")
        if line != "READY":
            proc.wait()
            raise RecorderError(line.removeprefix("ERROR ") or
                                f"the recorder process exited with code {proc.returncode} before it was ready")
        self.proc = proc
        self._handed = self._committed = self._lost = 0
        self._exited = threading.Event()
        self._progress = threading.Thread(target=self._read_progress, args=(proc, self._exited),
                                          name="llmtap-record-progress", daemon=True)
        self._progress.start()

    def _read_progress(self, proc: subprocess.Popen, exited: threading.Event) -> None:
        """The child prints how many finished calls it has committed, after each batch."""
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                try:
                    committed, lost = map(int, line.split())
                except ValueError:
                    continue
                self._committed, self._lost = committed, lost
        finally:
            exited.set()
            self._wake.set()

    # -- the Sink (QueuedSink) -------------------------------------------------------------------
    def _first(self) -> None:
        self._wake.set()  # an idle proxy never wakes the sender otherwise

    # -- the sender thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            # Woken by the first record after a drain, a child's exit or close(); then a batch
            # gathers for SEND_INTERVAL_S. Without a child, it retries every second; once
            # stopping, it goes on until everything is committed.
            if not self._stop:
                self._wake.wait(None if self.proc is not None and not self._pending else 1.0)
                if not self._stop:
                    time.sleep(SEND_INTERVAL_S)
            self._wake.clear()
            stopping = self._stop
            try:
                if self._round(stopping):
                    return
            except Exception:  # a bug of ours: say so once, and keep the proxy proxying
                if not self._bug_said:
                    log.exception("llmtap recorder: unexpected error while handing records over")
                    self._bug_said = True
                if stopping:
                    return

    def _round(self, stopping: bool) -> bool:
        """Hand over what the queue holds; True once everything is committed after a stop."""
        self._follow.step()
        if self.proc is not None and self._exited.is_set():
            self._child_died()
        if self.proc is None and not self._respawn(force=stopping):
            if stopping:
                left = (len(self._unacked) + sum(1 for item in self._pending if _finished_id(item) is not None)
                        + sum(1 for event in self._queue if isinstance(event, CallFinished)))
                log.error("llmtap recorder: %d calls were not recorded: no recorder process could start", left)
            return stopping
        while len(self._unacked) > self._handed - self._committed:
            self._unacked.popleft()
        items = self._pending + self._items()
        self._pending = []
        if items:
            if not self._send(items):
                self._pending = items
                self._child_died()
                return False
            finished = [item for item in items if item[0] == "F"]
            self._handed += len(finished)
            self._unacked.extend(finished)
        return stopping and not self._queue and self._end_child()

    def _end_child(self) -> bool:
        """Close the child's input and wait for it to commit and exit; False if it died instead."""
        proc = self.proc
        assert proc is not None
        _close(proc.stdin)
        if proc.wait() == 0:
            if self._progress is not None:
                self._progress.join()
            self.proc = None
            return True
        self._child_died()
        return False

    def _items(self) -> list[tuple]:
        """What the queue holds, as the child takes it: each event as its wire tuple."""
        out: list[tuple] = []
        append, opened = out.append, self._open
        for event in without_brief(self._drain()):
            kind = type(event)
            if kind is Chunk:  # most of them, and the one this thread must not dwell on
                append(("C", event.call_id, event.data))  # type: ignore[union-attr]
                continue
            if kind is CallStarted:
                opened.add(event.call_id)  # type: ignore[union-attr]
            elif kind is CallFinished:
                opened.discard(event.call_id)  # type: ignore[union-attr]
            append(to_wire(event))
        total = self.dropped_total
        if total != self._dropped_sent:
            out.append(to_wire(Dropped(total - self._dropped_sent)))
            self._dropped_sent = total
        return out

    def _send(self, items: list[tuple]) -> bool:
        proc = self.proc
        if proc is None or proc.stdin is None:
            return False
        frame = pickle.dumps(items, protocol=5)
        view = memoryview(_LEN.pack(len(frame)) + frame)
        try:
            while view:
                view = view[proc.stdin.write(view) or 0:]
        except (OSError, ValueError):
            return False
        return True

    def _child_died(self) -> None:
        """Reap the child, and queue for the next one what this one may not have committed."""
        proc, self.proc = self.proc, None
        assert proc is not None
        _close(proc.stdin)
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # alive but not reading: as good as dead
            proc.kill()
            code = proc.wait()
        if self._progress is not None:
            self._progress.join(timeout=10)
        while len(self._unacked) > self._handed - self._committed:
            self._unacked.popleft()
        again = [*self._unacked, *self._pending]
        self._unacked.clear()
        self._committed_earlier += self._committed
        self._lost_earlier += self._lost
        self._handed = self._committed = self._lost = 0
        # Calls still open may have rows in progress, and the calls handed again may have been
        # committed after all: the next child replaces both.
        ids = [*self._open, *(cid for cid in map(_finished_id, again) if cid is not None)]
        self._pending = [to_wire(Adopt(tuple(ids))), *again]
        log.error("llmtap recorder: the recorder process stopped unexpectedly (exit code %s); proxying goes on. "
                  "The %d finished calls it had not committed go to a new recorder process, which starts %s.",
                  code, sum(1 for item in again if item[0] == "F"), "now" if self._restarted_at is None else
                  f"within {RESTART_EVERY_S:.0f} s")

    def _respawn(self, force: bool) -> bool:
        now = time.monotonic()
        if not force and self._restarted_at is not None and now - self._restarted_at < RESTART_EVERY_S:
            return False
        self._restarted_at = now
        try:
            self._spawn()
        except RecorderError as exc:
            log.error("llmtap recorder: a new recorder process could not start (%s); trying again in %.0f s",
                      exc, RESTART_EVERY_S)
            return False
        self.restarts += 1
        log.error("llmtap recorder: a new recorder process records into %s", self.db_path)
        return True


def _close(fh: IO[bytes] | None) -> None:
    try:
        if fh is not None:
            fh.close()
    except OSError:
        pass


# -- the child ---------------------------------------------------------------------------------------
def _main(argv: list[str]) -> int:
    from llmtap.recorder.recorder import Recorder

    # The proxy decides when recording ends, by closing our input; see the module docstring.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from llmtap.recorder.redact import PrintableFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("llmtap: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)
    db, flush = Path(argv[0]), float(argv[1])
    buffer = int(argv[2]) if len(argv) > 2 and int(argv[2]) > 0 else None
    sweep = len(argv) <= 3 or argv[3] == "sweep"
    limit = int(argv[4]) if len(argv) > 4 else DEFAULT_BODY_LIMIT
    services = Options.from_json(argv[5]) if len(argv) > 5 else Options()
    from llmtap import gctune
    from llmtap.paths import private_umask

    private_umask()  # DuckDB makes the DB, its WAL and temp files: the user's alone
    gctune.settle()  # rows, extractions and the session grouper's memory: see llmtap.gctune
    out = sys.stdout.buffer
    recorder = (Recorder(db, flush_interval_s=flush, close_interrupted=sweep, body_limit=limit,
                         services=services) if buffer is None else
                Recorder(db, flush_interval_s=flush, close_interrupted=sweep, buffer_bytes=buffer, body_limit=limit,
                         services=services))
    recorder.run_pid = os.getppid()  # the proxy that started this process
    try:
        recorder.start()
    except Exception as exc:
        message = str(exc) or type(exc).__name__
        out.write(("ERROR " + " ".join(message.split()) + "\n").encode())
        out.flush()
        return 2

    def written(count: int) -> None:
        try:
            out.write(b"%d %d\n" % (count, recorder.lost))
            out.flush()
        except (OSError, ValueError):
            pass  # the proxy is gone; we finish on the end of our input

    recorder.on_written = written
    out.write(b"READY\n")
    out.flush()
    try:
        _feed(recorder, sys.stdin.buffer)
    finally:
        recorder.close()
    return 0


def _feed(recorder: Recorder, inp: BinaryIO) -> None:
    """Hand the recorder the events of each frame, until the end of the input."""
    while True:
        head = inp.read(_LEN.size)
        if len(head) < _LEN.size:
            return
        (size,) = _LEN.unpack(head)
        frame = inp.read(size)
        if len(frame) < size:
            return  # the proxy died mid-frame: what came before is whole
        for item in pickle.loads(frame):
            event = from_wire(item)
            if isinstance(event, Chunk):
                recorder.call_chunk(event)
            elif isinstance(event, CallFinished):
                recorder.call_finished(event)
            elif isinstance(event, CallStarted):
                recorder.call_started(event)
            elif isinstance(event, ResponseHead):
                recorder.response_head(event)
            elif isinstance(event, Dropped):
                recorder.dropped_total += event.count
            elif isinstance(event, Adopt):
                recorder.adopt(list(event.ids))


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
