"""What readers in other threads or processes learn about calls as they happen.

The writer publishes an event after each commit, so a reader reacting to it finds the row.
Calls still streaming keep their bytes here (not in DuckDB) so a live view can show them grow.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

KEEP_EVENTS = 10_000


class LiveHub:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._events: deque[dict[str, Any]] = deque(maxlen=KEEP_EVENTS)
        self._seq = 0
        self._partial: dict[str, tuple[list[bytes], Any]] = {}  # id -> (body parts, extractor)
        # Held by the writer while it feeds an extractor and by `partial` while it snapshots
        # one, so an endpoint thread never reads a parser mid-update.
        self.lock = threading.Lock()
        # The scrubber of a call in progress (see redact.Scrubber), set by the recorder: a live
        # view shows what the record will hold, secrets masked.
        self.scrubber_for: Callable[[str], Any] | None = None

    @property
    def seq(self) -> int:
        return self._seq

    def publish(self, kind: str, ids: list[str]) -> None:
        if not ids:
            return
        with self._cond:
            for call_id in ids:
                self._seq += 1
                self._events.append({"seq": self._seq, "kind": kind, "id": call_id})
            self._cond.notify_all()

    def events_after(self, seq: int, timeout: float) -> tuple[int, list[dict[str, Any]]]:
        """Events newer than `seq`, waiting up to `timeout` for one; a reader that fell further
        behind than the kept window gets one `reset` event and should reload."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > seq, timeout)
            if self._seq <= seq:
                return self._seq, []
            oldest = self._events[0]["seq"] if self._events else self._seq + 1
            if seq + 1 < oldest:
                return self._seq, [{"seq": self._seq, "kind": "reset", "id": None}]
            return self._seq, [e for e in self._events if e["seq"] > seq]

    # -- calls in progress (called by the writer thread) ------------------------------------------
    def track(self, call_id: str, extractor: Any) -> None:
        with self.lock:
            parts = self._partial.get(call_id, ([], None))[0]
            self._partial[call_id] = (parts, extractor)

    def grow(self, call_id: str, chunk: bytes) -> None:
        entry = self._partial.get(call_id)
        if entry is not None:
            entry[0].append(chunk)

    def untrack(self, call_id: str) -> None:
        with self.lock:
            self._partial.pop(call_id, None)

    def partial(self, call_id: str) -> dict[str, Any] | None:
        with self.lock:
            entry = self._partial.get(call_id)
            if entry is None:
                return None
            parts, extractor = entry
            snap = extractor.snapshot() if extractor is not None else None
            body = b"".join(parts)
        scrub = self.scrubber_for(call_id) if self.scrubber_for is not None else None
        text: Callable[[str | None], str | None] = scrub.body if scrub is not None else (lambda v: v)
        tool_calls = getattr(snap, "tool_calls", None)
        if scrub is not None and tool_calls is not None:
            tool_calls = json.loads(scrub.body(json.dumps(tool_calls)) or "null")
        return {
            "response_body": text(body.decode("utf-8", "replace")),
            "reasoning": text(getattr(snap, "reasoning", None)),
            "content": text(getattr(snap, "content", None)),
            "tool_calls": tool_calls,
            "input_tokens": getattr(snap, "input_tokens", None),
            "output_tokens": getattr(snap, "output_tokens", None),
            "reasoning_tokens": getattr(snap, "reasoning_tokens", None),
        }
