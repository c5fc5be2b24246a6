"""Messages that workers post back to the UI thread (DB work never runs on the event loop)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.message import Message

Record = dict[str, Any]


@dataclass
class SchemaLoaded(Message):
    schema: Any  # query.Schema
    seq: int = 0  # the live feed's position when the schema was read


@dataclass
class PageLoaded(Message):
    """A page of the call list. `generation` drops pages of a filter that has since changed."""

    generation: int
    records: list[Record]
    append: bool
    exhausted: bool
    elapsed_s: float = 0.0
    # False for the rows of one window while older windows are still being searched: they
    # are shown at once, and the page is complete with the final message.
    final: bool = True
    windows: int = 0


@dataclass
class PageFailed(Message):
    generation: int
    error: str


@dataclass
class LiveRows(Message):
    """Fresh list columns for calls that started or finished; `asked` minus the returned ids
    are calls the filter no longer admits."""

    generation: int
    records: list[Record]
    asked: list[str] = field(default_factory=list)


@dataclass
class LiveProgress(Message):
    ids: list[str]


@dataclass
class LiveFinished(Message):
    ids: list[str]


@dataclass
class LiveReset(Message):
    pass


@dataclass
class LiveError(Message):
    error: str
    lost: bool = False  # the feed itself stopped answering (the serving process is gone)


@dataclass
class LiveResumed(Message):
    """The feed answers again after it was lost."""


@dataclass
class DetailLoaded(Message):
    record: Record | None
    attempts: list[Record]


@dataclass
class PartialLoaded(Message):
    partial: Record | None


@dataclass
class Activity:
    """The filtered calls over time: bucket i starts at start_ms + i * width_ms."""

    start_ms: int
    width_ms: int
    label: str  # the bucket width, "5 min"
    calls: list[int]
    errors: list[int]
    p95_ms: list[float]


@dataclass
class StatsLoaded(Message):
    rows: list[Record]
    activity: Activity | None
    histogram: list[tuple[int, int]]
    error: str | None = None


@dataclass
class ExportProgress(Message):
    done: int
    total: int


@dataclass
class ExportDone(Message):
    path: str
    count: int
    error: str | None = None
