"""Waits the tests share: on a process, not on the clock."""

from __future__ import annotations

import os
import time


def wait_gone(pid: int, timeout: float = 60) -> None:
    """Wait for a process that is not our child to exit (waitpid cannot wait for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still runs")
