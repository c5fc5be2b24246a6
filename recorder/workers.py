"""Whole-body extraction in helper processes, so that the writer's thread can append meanwhile.

The writer thread shares the GIL with the proxy's event loop, and extraction is most of its
work: about 160 us of pure Python for an 8 KB stream, against about 80 us to build and append
the row. Under load (see `Recorder.offload_min`) the bodies of a batch go to helper processes,
which have interpreters of their own: the proxy gets the GIL back, and the writer appends one
part of the batch while the helpers extract the next.

A job always gets its answer. Whatever a helper cannot do (it did not start, died, or answered
garbage) is extracted in the writer's thread, as without helpers.

Run as `python -m llmtap.recorder.workers [CPUS]`: a helper reads frames of pickled jobs from
stdin and writes one frame of extractions per frame, in order. It stops at the end of stdin,
which is also what a crash of the proxy gives it.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

from llmtap import gctune
from llmtap.recorder.extract import Extraction, extract, json_object, prompt_text
from llmtap.recorder.sessions import read_facts, response_of

log = logging.getLogger("llmtap.recorder")

# api, status, response headers, body, body limit, the request body, and whether sessions read it
Job = tuple[str, int | None, dict[str, str], bytes, int, bytes, bool]
_LEN = struct.Struct("<Q")
# Linux lets an unprivileged process grow a pipe to 1 MiB: results then wait in the pipe while
# the writer appends, instead of stalling the helper after 64 KiB.
_PIPE_BYTES = 1 << 20


def extract_job(job: Job) -> Extraction:
    """`extract`, which should never raise; should it, the row is still written, with a note.
    The request is read too (`with_request`)."""
    api, status, headers, body, limit, request, sessions = job
    try:
        ex = extract(api, status, headers, body, limit)
    except Exception as exc:
        log.exception("llmtap recorder: extraction failed")
        ex = Extraction(notes=[f"extraction failed ({type(exc).__name__}: {exc}); see response_body"])
    return with_request(ex, api, request, sessions)


def with_request(ex: Extraction, api: str, request: bytes, sessions: bool) -> Extraction:
    """`ex` with the request body parsed once, where the answer was read (a helper process
    under load, else the writer): its search text (`Extraction.prompt`, unmasked: the writer
    masks it) and, with `sessions`, what grouping reads of the call (`facts`). Parsing the
    whole history an agent resends every turn is the most costly part of a row."""
    doc = json_object(request)
    ex.prompt = prompt_text(doc)
    if sessions:
        ex.facts = read_facts(api, doc, response_of(ex.content, ex.tool_calls, ex.response_id))
    return ex


class _Helper:
    """One helper process, fed by a thread of its own: a blocking write of a large frame must
    never wait on the writer, which may be busy appending instead of reading the answers."""

    def __init__(self, cpus: set[int] | None) -> None:
        args = [sys.executable, "-m", "llmtap.recorder.workers"]
        if cpus:
            args.append(",".join(map(str, sorted(cpus))))
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in, self._out = self.proc.stdin, self.proc.stdout
        for fh in (self._in, self._out):
            _grow_pipe(fh.fileno())
        self.alive = True
        self.stopped = False
        # Frames are numbered, so that the answers to a batch the writer gave up reading (an
        # error while committing it) are skipped, never taken for the next batch's.
        self.sent = self.read = 0
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send, name="llmtap-extract-send", daemon=True)
        self._sender.start()

    def submit(self, jobs: list[Job]) -> int:
        self.sent += 1
        frame = pickle.dumps((self.sent, jobs), protocol=5)
        self._outbox.put(_LEN.pack(len(frame)) + frame)
        return self.sent

    def _send(self) -> None:
        try:
            while (frame := self._outbox.get()) is not None:
                view = memoryview(frame)
                while view and self.alive:
                    try:
                        view = view[self._in.write(view) or 0:]
                    except (OSError, ValueError):
                        self.alive = False  # the helper is gone; `receive` tells the writer
        finally:
            try:
                self._in.close()  # the helper's end of input: it exits
            except OSError:
                pass

    def receive(self, seq: int, count: int) -> list[Extraction] | None:
        """The answer to frame `seq`, or None if the helper failed (it is then stopped, and
        the caller extracts that frame's jobs itself)."""
        if not self.stopped:  # alive or not: a helper that died says so by closing its output
            try:
                while self.read < seq:
                    head = self._read(_LEN.size)
                    self.read, answer = pickle.loads(self._read(_LEN.unpack(head)[0]))
                if self.read != seq:
                    raise ValueError(f"answer {self.read} where {seq} was due")
                if isinstance(answer, list) and len(answer) == count:
                    return answer
                raise ValueError(f"{len(answer)} answers to {count} jobs")
            except Exception as exc:
                code = self.proc.poll()
                log.error("llmtap recorder: an extraction helper failed (%s); the writer extracts "
                          "instead", f"exit code {code}" if code is not None else exc)
                self.stop()
        return None

    def _read(self, n: int) -> bytes:
        parts, left = [], n
        while left:
            piece = self._out.read(left)
            if not piece:
                raise EOFError("the helper closed its output")
            parts.append(piece)
            left -= len(piece)
        return b"".join(parts)

    def stop(self) -> None:
        """Close its input (it then exits) and wait for it; a helper that does not go is killed."""
        if self.stopped:
            return
        self.stopped = True
        if self.read < self.sent:
            self._close_output()  # it may be blocked writing answers nobody will read
        self._outbox.put(None)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.alive = False
        self._sender.join()
        self._close_output()

    def _close_output(self) -> None:
        try:
            self._out.close()
        except OSError:
            pass


class Helpers:
    """Helper processes, started on first use from the writer's thread."""

    def __init__(self, count: int, cpus: set[int] | None) -> None:
        self.count = count
        self._cpus = cpus  # the process's CPUs, which the writer thread may have narrowed to one
        self._helpers: list[_Helper] = []
        self._started_at: float | None = None

    def _live(self) -> list[_Helper]:
        """The helpers, started (again) if need be: once at first use, then at most once a
        minute, so that a helper that keeps crashing costs a failed start, not every batch."""
        for helper in self._helpers:
            if not helper.alive:
                helper.stop()  # reaped, not left a zombie
        self._helpers = [h for h in self._helpers if h.alive]
        now = time.monotonic()
        if len(self._helpers) < self.count and (self._started_at is None or now - self._started_at >= 60):
            self._started_at = now
            try:
                while len(self._helpers) < self.count:
                    self._helpers.append(_Helper(self._cpus))
            except Exception as exc:  # no process to start (no sys.executable, no fds left): work on
                log.error("llmtap recorder: cannot start an extraction helper (%s); the writer extracts "
                          "in its own thread", exc)
        return self._helpers

    def map(self, jobs: list[Job], part: int) -> Iterator[list[Extraction]]:
        """Hands `jobs` to the helpers now, `part` at a time; the iterator gives their extractions
        in order, each part as soon as it is done.

        An iterator left unread costs nothing: the next one skips its answers."""
        parts = [jobs[i:i + part] for i in range(0, len(jobs), part)]
        helpers = self._live()
        owners: list[tuple[_Helper, int] | None] = []
        for i, jobs_part in enumerate(parts):
            helper = helpers[i % len(helpers)] if helpers else None
            owners.append((helper, helper.submit(jobs_part)) if helper is not None else None)
        return self._answers(parts, owners)

    @staticmethod
    def _answers(parts: list[list[Job]], owners: list[tuple[_Helper, int] | None]) -> Iterator[list[Extraction]]:
        for jobs_part, owner in zip(parts, owners):
            answer = owner[0].receive(owner[1], len(jobs_part)) if owner is not None else None
            yield answer if answer is not None else [extract_job(job) for job in jobs_part]

    @property
    def running(self) -> int:
        return sum(1 for h in self._helpers if h.alive)

    def pids(self) -> list[int]:
        return [h.proc.pid for h in self._helpers if h.alive]

    def stop(self) -> None:
        for helper in self._helpers:
            helper.stop()
        self._helpers = []


def _grow_pipe(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError):
        pass  # not Linux, or over the system's limit: the default pipe still works, only slower


def _main(argv: list[str]) -> int:
    # Ctrl-C in a terminal reaches the whole process group; the proxy decides when its helpers
    # stop (it closes their stdin), so that it can still use them while it shuts down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A job parses a whole request body and reads it for grouping: the default collector ran
    # through it several times a job, and grouping's extra objects made it run more often
    # still (a third of what grouping cost a helper alone, ~55 us a call of tool loops).
    gctune.settle()
    if argv and hasattr(os, "sched_setaffinity"):
        try:
            # The writer's thread, which started us, may be pinned to one CPU; we must not be.
            os.sched_setaffinity(0, {int(c) for c in argv[0].split(",")})
        except (OSError, ValueError):
            pass
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = inp.read(_LEN.size)
        if len(head) < _LEN.size:
            return 0
        (size,) = _LEN.unpack(head)
        frame = inp.read(size)
        if len(frame) < size:
            return 0
        seq, jobs = pickle.loads(frame)
        answer = pickle.dumps((seq, [extract_job(job) for job in jobs]), protocol=5)
        try:
            out.write(_LEN.pack(len(answer)) + answer)
            out.flush()
        except BrokenPipeError:
            return 0  # the proxy stopped reading: it is going away


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
