"""Running a thread on the CPU another thread last ran on (Linux only; elsewhere a no-op).

A thread that takes over objects the proxy's event loop just made (the recorder's writer, or
the thread that hands records to the recorder process) costs least on the loop's own CPU. On
another CPU, the lock and the objects both threads touch bounce between the cores' caches,
which cost the loop about as much again as the thread's own work. Measured at ~1,000 calls/s
on two CPUs: the proxy recording in-process served 0.79-0.88x the calls of one not recording,
and 0.92-0.98x with the writer following. The loop's thread itself is never pinned: the
scheduler stays free to move it, and the follower moves after it.
"""

from __future__ import annotations

import os
import sys
import threading


class CpuFollower:
    """Made on the thread to follow; `step()` is called by the follower, between bursts of work."""

    def __init__(self) -> None:
        self._tid: int | None = threading.get_native_id() if sys.platform.startswith("linux") else None
        self._cpu: int | None = None

    def step(self) -> None:
        tid = self._tid
        if tid is None:
            return
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as fh:
                cpu = int(fh.read().rsplit(b")", 1)[1].split()[36])  # field 39, `processor`
            if cpu != self._cpu:
                os.sched_setaffinity(0, {cpu})  # 0: the calling thread
                self._cpu = cpu
        except (OSError, ValueError, IndexError, AttributeError):
            self._tid = None  # the thread is gone, or not allowed: run wherever
