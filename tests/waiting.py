"""Waits the tests share: on a condition or a process, never a fixed sleep.

`wait_until` polls a condition the code under test makes true (a row committed, a process
gone, a socket closed); the timeout only bounds a failure, so it is generous on a busy machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout: float = 30, interval: float = 0.01) -> T:
    """Poll `condition` until it gives a true value, and return that value; AssertionError
    naming `what` when it has not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(interval)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_gone(pid: int, timeout: float = 60) -> None:
    """Wait for a process that is not our child to exit (waitpid cannot wait for it)."""
    wait_until(lambda: _gone(pid), f"process {pid} to exit", timeout, 0.02)
