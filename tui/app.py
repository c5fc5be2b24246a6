"""llmtap's terminal UI: the live call list, a call's detail, stats, export.

The app is handed a reader (see llmtap.recorder.reader): `llmtap tui` opens one on the DB file,
`llmtap run --tui` reads the recorder in the same process, tests pass their own. Every DB read
runs in a thread worker and comes back as a message, so the event loop (which in `run --tui`
also runs the proxy) never waits on DuckDB.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.reactive import reactive
from textual.screen import ModalScreen, Screen
from textual.widget import Widget
from textual.widgets import (
    Button,
    Collapsible,
    DataTable,
    Footer,
    Header,
    Input,
    Label,
    ProgressBar,
    Static,
    TabbedContent,
    TabPane,
    TextArea,
)
from textual.worker import get_current_worker

from llmtap import paths
from llmtap.tui import query as q
from llmtap.tui import render
from llmtap.tui.messages import (
    Activity,
    DetailLoaded,
    ExportDone,
    ExportProgress,
    LiveError,
    LiveFinished,
    LiveProgress,
    LiveReset,
    LiveResumed,
    LiveRows,
    PageFailed,
    PageLoaded,
    PartialLoaded,
    Record,
    SchemaLoaded,
    StatsLoaded,
)

log = logging.getLogger("llmtap.tui")

LIVE_POLL_S = 0.5  # long-poll timeout: also how long quitting may wait for the poller
LOAD_MORE_MARGIN = 40  # rows before the end at which the next page is fetched
SEARCHING_HINT_AFTER_S = 0.15
WINDOW_BOUNDS_MAX_AGE_S = 60.0  # then the newest window has grown by a minute of traffic
# A list left open on a busy proxy would otherwise hold every call of the session (100 calls/s
# is 360,000 rows an hour, ~5 KB each). While the cursor is at the top, once the table holds
# LIVE_MAX_ROWS it is cut back to the newest LIVE_KEEP_ROWS; older calls page in again by
# scrolling. One rebuild every so often, because DataTable.remove_row costs O(rows) per row.
LIVE_MAX_ROWS = 2000
LIVE_KEEP_ROWS = 2 * q.PAGE_SIZE
EMPTY_HELP = (
    "No calls recorded yet.\n\n"
    "Start the proxy with `llmtap run` (or `llmtap run --tui`), then send traffic through it:\n"
    "  • tools that honour HTTPS_PROXY:  eval \"$(llmtap env)\"  or  llmtap wrap -- CMD\n"
    "  • tools that take a base URL:     http://127.0.0.1:8081/openai  (or /anthropic, …)\n\n"
    "Calls appear here as they happen."
)
EMPTY_ATTACHED = (
    "No calls recorded yet.\n\n"
    "The running `llmtap run` records to this file: send traffic through it, at the addresses it\n"
    "printed when it started (by default):\n"
    "  • tools that honour HTTPS_PROXY:  eval \"$(llmtap env)\"  or  llmtap wrap -- CMD\n"
    "  • tools that take a base URL:     http://127.0.0.1:8081/openai  (or /anthropic, …)\n\n"
    "Calls appear here as they happen."
)
DEFAULT_PROXY = ("127.0.0.1", 8080)  # what `llmtap env` and `llmtap wrap` assume without --proxy


class Listening(NamedTuple):
    """Where the proxy running in this process (`llmtap run --tui`) listens; port 0 means
    not bound yet. `confdir` holds its CA, which `llmtap env` must be pointed at."""

    proxy: tuple[str, int] | None
    gateway: tuple[str, int] | None
    confdir: Path | None = None


def _url_host(host: str) -> str:
    """The host a tool on this machine connects to for a listener bound to `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def empty_help_running(listening: Listening, *, recording: bool) -> str:
    """The empty list's text when the proxy runs in this process: its real addresses."""
    head = ("No calls recorded yet. The proxy is running in this process:" if recording else
            "Not recording (--no-record): the proxy is running in this process; calls are passed on, "
            "none is kept.")
    lines = [head, ""]
    if listening.proxy is None and listening.gateway is None:
        lines.append("  (no listener: both --proxy and --gateway are off)")
    if listening.proxy is not None:
        host, port = listening.proxy
        if port:
            flags = "" if (_url_host(host), port) == DEFAULT_PROXY else f" --proxy {_url_host(host)}:{port}"
            if listening.confdir is not None and Path(listening.confdir) != paths.default_confdir():
                flags += f" --confdir {shlex.quote(str(listening.confdir))}"
            lines += [f"  • proxy    http://{_url_host(host)}:{port}   for tools that honour HTTPS_PROXY:",
                      f"               eval \"$(llmtap env{flags})\"   or   llmtap wrap{flags} -- CMD"]
        else:
            lines.append("  • proxy    starting…")
    if listening.gateway is not None:
        host, port = listening.gateway
        if port:
            base = f"http://{_url_host(host)}:{port}"
            lines += [f"  • gateway  {base}/<provider>   for tools that take a base URL:",
                      f"               {base}/openai   (or /anthropic, /openrouter, /ollama, …)"]
        else:
            lines.append("  • gateway  starting…")
    lines += ["", "Calls appear here as they happen." if recording else "Quit with q."]
    return "\n".join(lines)


def _rows_to_records(cols: list[str], rows: list[tuple]) -> list[Record]:
    return [dict(zip(cols, row)) for row in rows]


def _cell_id(cell: IdCell) -> str:
    return cell.id


class IdCell:
    """The time cell. It renders the time but compares by ULID, so `DataTable.sort` on this
    column puts a call that arrives live at the top without rebuilding the table."""

    __slots__ = ("id", "text")

    def __init__(self, call_id: str, text: Text) -> None:
        self.id = call_id
        self.text = text

    def __rich__(self) -> Text:
        return self.text

    def __lt__(self, other: IdCell) -> bool:
        return self.id < other.id

    def __str__(self) -> str:
        return self.text.plain


# (key, label, width). Fixed widths: DataTable then skips measuring every added cell.
LIST_LAYOUT: tuple[tuple[str, str, int], ...] = (
    ("time", "time", 14),
    ("client", "client", 18),
    ("model", "model asked → sent", 34),
    ("provider", "provider", 12),
    ("status", "status", 6),
    ("attempts", "att", 4),
    ("ttfb", "ttfb", 7),
    ("duration", "duration", 8),
    ("tin", "in", 7),
    ("tout", "out", 7),
    ("treason", "reason", 7),
)


def in_progress(rec: Record) -> bool:
    return rec.get("status") is None and rec.get("duration_ms") is None and rec.get("error") is None


def status_text(rec: Record) -> Text:
    status = rec.get("status")
    if in_progress(rec):
        return Text("…", style="bold yellow")
    if status is None:
        return Text("err", style="bold red")
    style = "green" if status < 300 else ("yellow" if status < 400 else "bold red")
    text = Text(str(status), style=style)
    if rec.get("complete") is False and status < 400:
        text.append("✂", style="bold magenta")  # a 2xx whose stream was cut short
    return text


def list_cells(rec: Record) -> list[Any]:
    """The cells of one call-list row, from the LIST_COLUMNS of a record."""
    started = render.as_datetime(rec.get("started_at"))
    stamp = started.astimezone().strftime("%m-%d %H:%M:%S") if started else "?"
    asked = rec.get("model_requested") or "-"
    sent = rec.get("model_sent") or asked
    model = Text(asked)
    if sent != asked:
        model.append(" → ", style="dim")
        model.append(sent, style="cyan")
    attempts = int(rec.get("attempts") or 0)
    att = Text(f"{attempts}↻", style="bold black on yellow") if attempts > 1 else Text(str(attempts or ""), style="dim")
    client = (rec.get("client") or "-").split(" ", 1)[0]
    return [
        IdCell(str(rec["id"]), Text(stamp)),
        Text(client, overflow="ellipsis", no_wrap=True),
        model,
        Text(rec.get("provider") or "-"),
        status_text(rec),
        att,
        Text(render.fmt_ms(rec.get("ttfb_ms")), justify="right"),
        Text(render.fmt_ms(rec.get("duration_ms")), justify="right"),
        Text(render.fmt_tokens(rec.get("input_tokens")), justify="right"),
        Text(render.fmt_tokens(rec.get("output_tokens")), justify="right"),
        Text(render.fmt_tokens(rec.get("reasoning_tokens")), justify="right"),
    ]


# -- the call list ------------------------------------------------------------------------------
class CallTable(DataTable[Any]):
    """The list's table: in a list of rows, Home/End mean first/last call, not left/right edge."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("home,g", "scroll_top", "First call", show=False, id="calls.first"),
        Binding("end,G", "scroll_bottom", "Last loaded call", show=False, id="calls.last",
                tooltip="Last loaded call (the next page loads as you near the end)"),
        # mitmproxy's console and less/vim move with j/k; typed into the filter bar they stay
        # text, because the bar (not this table) then has the focus.
        Binding("j", "cursor_down", "Down", show=False, id="calls.down", tooltip="Next (older) call"),
        Binding("k", "cursor_up", "Up", show=False, id="calls.up", tooltip="Previous (newer) call"),
    ]


class CallsScreen(Screen[None]):
    """The list of calls, newest first, growing live; a filter bar above it."""

    # Focus starts on the list, never the filter bar (which would swallow `q` on an empty DB).
    AUTO_FOCUS = "#calls"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "open_call", "Open", id="calls.open", tooltip="Open the highlighted call"),
        Binding("slash", "focus_filter", "Filter", id="calls.filter", tooltip="Edit the filter"),
        Binding("s", "stats", "Stats", id="calls.stats", tooltip="Per-model stats of the filtered calls"),
        Binding("e", "export", "Export", id="calls.export", tooltip="Export the filtered calls to Parquet"),
        Binding("escape", "leave_filter", "List", id="calls.leave_filter", show=False,
                tooltip="Back from the filter bar to the list"),
    ]

    def __init__(self, reader: q.Reader | None, *, note: str | None = None) -> None:
        super().__init__()
        self.reader = reader
        self.note = note
        self.schema = q.Schema()
        self.filter = q.Filter()
        self.generation = 0
        self.oldest_id: str | None = None
        self.exhausted = False
        self._paging = False
        self.first_page_s: float | None = None  # set once, read by the benchmark
        self.pages_loaded = 0
        # Where the time of the last page went (read by scripts/bench_tui.py).
        self.last_page_sql_s = 0.0
        self.last_page_ui_s = 0.0
        self.last_page_windows = 0
        # Live calls not added because the user was reading below the top of a full list.
        self.held_back = 0
        # Called with the records of calls a live update has just added to the table (the
        # benchmark times rows from the client's send to here).
        self.live_rows_added: Callable[[list[Record]], None] | None = None
        # Ids where the newest-first search windows end (see query.load_page), and when
        # they were looked up: written by page workers, read by the next one.
        self._window_bounds: tuple[str, ...] | None = None
        self._window_bounds_at = 0.0

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="filter-bar"):
            yield Input(placeholder="filter — e.g. model:gpt-4o* status:5xx fallbacks since:2h some text   (press / )",
                        id="filter")
            yield Static("", id="filter-error")
        table = CallTable(id="calls", cursor_type="row", zebra_stripes=True)
        for key, label, width in LIST_LAYOUT:
            table.add_column(label, key=key, width=width)
        yield table
        yield Static(EMPTY_HELP, id="empty")
        yield Footer()

    @property
    def table(self) -> DataTable[Any]:
        return self.query_one("#calls", DataTable)

    def on_mount(self) -> None:
        self.query_one("#empty").display = False
        if self.note:
            self.notify(self.note, timeout=8)
        if self.reader is None:
            self._show_empty()
            return
        self.table.focus()
        self._load_schema()

    # -- loading --------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="schema")
    def _load_schema(self) -> None:
        assert self.reader is not None
        try:
            # The live feed's position before the first page is read: later events are then
            # exactly those the page may not show. From 0 instead, attaching to a proxy that
            # has been busy replays its whole event window (or a reset and a second reload).
            latest = getattr(self.reader, "latest_seq", None)
            seq = int(latest()) if latest is not None else 0
            schema = q.load_schema(self.reader)
        except Exception as exc:  # shown, never a traceback on the terminal
            self.post_message(PageFailed(self.generation, f"cannot read the DB: {exc}"))
            return
        self.post_message(SchemaLoaded(schema, seq))

    @on(SchemaLoaded)
    def _schema_loaded(self, message: SchemaLoaded) -> None:
        self.schema = message.schema
        if not self.schema.calls:
            self._show_empty()
            return
        self._reload()
        self._live(message.seq)

    def _reload(self) -> None:
        self.generation += 1
        self.held_back = 0
        self.oldest_id = None
        self.exhausted = False
        self.table.clear()
        self._paging = True
        self._load_page(self.generation, self.filter, None)
        # A search of common words that matches little reads every body (~0.5 s on a million
        # calls; the search index only skips calls missing a word): say so
        # if it takes a while, but not for the usual few ms, where it would only flash.
        generation = self.generation
        self.set_timer(SEARCHING_HINT_AFTER_S,
                       lambda: self._show_empty() if generation == self.generation and self._paging else None)

    @work(thread=True, group="page")
    def _load_page(self, generation: int, flt: q.Filter, before_id: str | None) -> None:
        assert self.reader is not None
        worker = get_current_worker()
        append = before_id is not None

        def partial(cols: list[str], rows: list[tuple]) -> None:
            self.post_message(PageLoaded(generation, _rows_to_records(cols, rows), append=append,
                                         exhausted=False, final=False))

        t0 = time.perf_counter()
        try:
            # A page for a filter the user has replaced stops at the next window: its scan
            # would only compete for the cores with the one now wanted. No bounds yet (the
            # first page) means one window: the plain list needs no more.
            page = q.load_page(self.reader, self.schema, flt, before_id, self._window_bounds or (),
                               on_rows=partial,
                               cancelled=lambda: worker.is_cancelled or self.generation != generation)
        except Exception as exc:
            self.post_message(PageFailed(generation, str(exc)))
            return
        if page is None:
            return
        self.post_message(PageLoaded(generation, _rows_to_records(page.columns, page.rows), append=append,
                                     exhausted=page.exhausted, elapsed_s=time.perf_counter() - t0,
                                     windows=page.windows))
        # Looked up after the page is out, so the first page does not wait for them.
        if self._window_bounds is None or time.monotonic() - self._window_bounds_at > WINDOW_BOUNDS_MAX_AGE_S:
            try:
                self._window_bounds, self._window_bounds_at = q.window_bounds(self.reader), time.monotonic()
            except Exception:
                log.debug("window bounds unavailable", exc_info=True)  # searches then use one window

    @on(PageLoaded)
    def _page_loaded(self, message: PageLoaded) -> None:
        if message.generation != self.generation:
            return  # a page for a filter the user has already replaced
        t0 = time.perf_counter()
        table = self.table
        for rec in message.records:
            if rec["id"] not in table.rows:  # the final message repeats rows already shown
                table.add_row(*list_cells(rec), key=rec["id"])
        if message.records:
            self.oldest_id = min(str(r["id"]) for r in message.records) if self.oldest_id is None else min(
                self.oldest_id, *(str(r["id"]) for r in message.records))
        if not message.final:
            self._show_empty()
            return
        self._paging = False
        self.exhausted = message.exhausted
        self.pages_loaded += 1
        self.last_page_sql_s = message.elapsed_s
        self.last_page_ui_s = time.perf_counter() - t0
        self.last_page_windows = message.windows
        if self.first_page_s is None:
            self.first_page_s = time.perf_counter()
        self._show_empty()
        if self.focused is None and table.row_count:
            table.focus()

    @on(PageFailed)
    def _page_failed(self, message: PageFailed) -> None:
        if message.generation != self.generation:
            return
        self._paging = False
        self._set_filter_error(f"query failed: {message.error}")

    def _show_empty(self) -> None:
        empty = self.query_one("#empty", Static)
        has_rows = self.table.row_count > 0
        if not has_rows:
            listening: Listening | None = getattr(self.app, "listening", None)
            if self.reader is None:
                empty.update(Text(empty_help_running(listening, recording=False)) if listening is not None
                             else "Not recording (--no-record): nothing is kept.")
            elif self._paging:
                empty.update("Searching…")
            elif self.filter.clauses:
                empty.update("No call matches the filter.")
            elif listening is not None:
                empty.update(Text(empty_help_running(listening, recording=True)))
            elif getattr(self.reader, "kind", "") == "remote":
                empty.update(EMPTY_ATTACHED)
            else:
                empty.update(EMPTY_HELP)
        empty.display = not has_rows
        self.table.display = has_rows

    def _maybe_load_more(self) -> None:
        table = self.table
        if (self.reader is None or self._paging or self.exhausted or self.oldest_id is None
                or table.cursor_row < table.row_count - LOAD_MORE_MARGIN):
            return
        self._paging = True
        self._load_page(self.generation, self.filter, self.oldest_id)

    @on(DataTable.RowHighlighted, "#calls")
    def _row_highlighted(self, _: DataTable.RowHighlighted) -> None:
        if self.held_back and self.table.cursor_row <= 0:
            self._reload()  # back at the top: the calls held back meanwhile, newest first
            return
        self._maybe_load_more()

    # -- live -----------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="live")
    def _live(self, seq: int) -> None:
        """Long-poll the reader's event feed from `seq`; fetch list columns of calls that changed."""
        assert self.reader is not None
        worker = get_current_worker()
        failing = False
        while not worker.is_cancelled:
            try:
                seq, events = self.reader.events_after(seq, LIVE_POLL_S)
            except Exception as exc:
                if not failing:
                    self.post_message(LiveError(f"live updates interrupted: {exc}", lost=True))
                failing = True
                threading.Event().wait(2.0)  # back off; the writer may be restarting
                continue
            if failing:
                self.post_message(LiveResumed())
            failing = False
            if not events or worker.is_cancelled:
                continue
            # Dicts as ordered sets: a busy proxy hands over thousands of events at once.
            changed: dict[str, None] = {}
            progress: dict[str, None] = {}
            finished: list[str] = []
            for ev in events:
                kind, call_id = ev.get("kind"), ev.get("id")
                if kind == "reset":
                    self.post_message(LiveReset())
                    changed, progress, finished = {}, {}, []
                    continue
                if not call_id:
                    continue
                if kind in ("started", "finished"):
                    changed[call_id] = None
                if kind == "finished":
                    finished.append(call_id)
                elif kind == "progress":
                    progress[call_id] = None
            if changed:
                generation, flt = self.generation, self.filter  # read once: the UI may change them
                try:
                    sql, params = q.rows_by_id_sql(self.schema, flt, list(changed))
                    cols, rows = self.reader.query(sql, params)
                except Exception as exc:
                    self.post_message(LiveError(f"live update failed: {exc}"))
                    continue
                self.post_message(LiveRows(generation, _rows_to_records(cols, rows), list(changed)))
            if progress:
                self.post_message(LiveProgress(list(progress)))
            if finished:
                self.post_message(LiveFinished(finished))

    @on(LiveRows)
    def _live_rows(self, message: LiveRows) -> None:
        if message.generation != self.generation:
            return
        table = self.table
        at_top = table.cursor_row <= 0
        cursor_key = self._cursor_key()
        added: list[Record] = []
        held_before = self.held_back
        returned = {str(r["id"]) for r in message.records}
        for rec in message.records:
            key = str(rec["id"])
            cells = list_cells(rec)
            if key in table.rows:
                for (col, _, _), cell in zip(LIST_LAYOUT, cells):
                    table.update_cell(key, col, cell)
            elif self.exhausted or self.oldest_id is None or key > self.oldest_id:
                # Inside the loaded window; older calls arrive with their page instead.
                if not at_top and table.row_count >= LIVE_MAX_ROWS:
                    # The user is reading further down: rows cannot be cut above them, so new
                    # ones wait in the DB until they go back to the top (bounded memory).
                    self.held_back += 1
                    continue
                table.add_row(*cells, key=key)
                added.append(rec)
        for key in message.asked:
            if key not in returned and key in table.rows:
                table.remove_row(key)  # no longer admitted by the filter (e.g. `live` ended)
        if added:
            # The key compares ids as str in C rather than through IdCell.__lt__ in Python.
            table.sort("time", key=_cell_id, reverse=True)
            if at_top:
                if table.row_count > LIVE_MAX_ROWS and not self._paging:
                    self._keep_newest(LIVE_KEEP_ROWS)
                table.move_cursor(row=0)
            elif cursor_key is not None and cursor_key in table.rows:
                table.move_cursor(row=table.get_row_index(cursor_key), scroll=False)
        if self.held_back and not held_before:  # said once, when calls first start to wait
            self.notify("Newer calls are waiting while you read further down; Home shows them.", timeout=8)
        self._show_empty()
        if added and self.live_rows_added is not None:
            self.live_rows_added(added)

    def _keep_newest(self, n: int) -> None:
        """Hold only the newest `n` rows (the table is sorted newest first); the rest of the
        list is reached by paging again, as after a fresh load."""
        table = self.table
        kept = [(row.key, table.get_row(row.key)) for row in table.ordered_rows[:n]]
        table.clear()
        for key, cells in kept:
            table.add_row(*cells, key=key.value)
        self.oldest_id = str(kept[-1][0].value) if kept else None
        self.exhausted = not kept

    @on(LiveProgress)
    def _live_progress(self, message: LiveProgress) -> None:
        for screen in self.app.screen_stack:
            if isinstance(screen, DetailScreen) and screen.call_id in message.ids:
                screen.live_progress()

    @on(LiveFinished)
    def _live_finished(self, message: LiveFinished) -> None:
        for screen in self.app.screen_stack:
            if isinstance(screen, DetailScreen) and screen.call_id in message.ids:
                screen.reload()

    @on(LiveReset)
    def _live_reset(self, _: LiveReset) -> None:
        self._reload()

    @on(LiveError)
    def _live_error(self, message: LiveError) -> None:
        self.notify(message.error, severity="warning", timeout=6)
        if message.lost and isinstance(self.app, LlmtapApp):
            self.app.set_live(False)

    @on(LiveResumed)
    def _live_resumed(self, _: LiveResumed) -> None:
        if isinstance(self.app, LlmtapApp):
            self.app.set_live(True)

    # -- filter ---------------------------------------------------------------------------
    @on(Input.Submitted, "#filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        self.apply_filter(event.value)
        if not self.query_one("#filter-error", Static).display:
            self.table.focus()

    def apply_filter(self, text: str) -> bool:
        """Parse and apply; on a parse error keep the current list and say why."""
        try:
            flt = q.parse_filter(text, self.schema)
        except q.FilterError as exc:
            self._set_filter_error(str(exc))
            return False
        self._set_filter_error(None)
        if flt == self.filter:
            return True
        self.filter = flt
        if self.reader is not None and self.schema.calls:
            self._reload()
        return True

    def _set_filter_error(self, error: str | None) -> None:
        label = self.query_one("#filter-error", Static)
        label.update(Text(error or "", style="bold red"))
        label.display = bool(error)

    def _cursor_key(self) -> str | None:
        table = self.table
        if table.row_count == 0:
            return None
        try:
            row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        except Exception:  # cursor outside the rows
            return None
        return str(row_key.value)

    # -- actions --------------------------------------------------------------------------
    def action_focus_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_leave_filter(self) -> None:
        self.table.focus()

    def action_open_call(self) -> None:
        key = self._cursor_key()
        if key is not None and self.reader is not None:
            self.app.push_screen(DetailScreen(self.reader, self.schema, key))

    @on(DataTable.RowSelected, "#calls")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        if self.reader is not None:
            self.app.push_screen(DetailScreen(self.reader, self.schema, str(event.row_key.value)))

    def action_stats(self) -> None:
        if self.reader is not None and self.schema.calls:
            self.app.push_screen(StatsScreen(self.reader, self.schema, self.filter))

    def action_export(self) -> None:
        if self.reader is not None and self.schema.calls:
            self.app.push_screen(ExportScreen(self.reader, self.filter))
        else:
            self.notify("nothing to export: not recording", severity="warning")


# -- one call -----------------------------------------------------------------------------------
def curl_dir() -> Path:
    """Where copied curl commands are written: the user's cache, in a folder only they read
    (a request body can be private even with its keys redacted)."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "llmtap" / "curl"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmtap" / "curl"


def write_private(path: Path, text: str) -> Path:
    """Write `text` to `path`, readable by the user only (0600 in a 0700 folder); never
    through a symlink someone left there."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)  # an older file of that name may have had other bits
        f.write(text)
    return path


def tool_calls_text(tool_calls: Any) -> Text:
    """The `tool_calls` column ([{id, name, arguments}]) as the answer's list of calls."""
    calls = render.as_json_value(tool_calls)
    out = Text()
    if isinstance(calls, list) and calls:
        out.append(f"tool calls ({len(calls)})\n", style="bold")
        for tc in calls:
            if not isinstance(tc, dict):
                out.append(render.pretty_json(tc) + "\n")
                continue
            out.append(f"→ {tc.get('name')}", style="bold cyan")
            if tc.get("id"):
                out.append(f"  ({tc['id']})", style="dim")
            out.append("\n" + render.clip(render.pretty_arguments(tc.get("arguments")), render.TURN_DISPLAY_LIMIT) + "\n")
    return out


TABS: tuple[tuple[str, str], ...] = (
    ("conversation", "Conversation"),
    ("reasoning", "Reasoning"),
    ("response", "Response"),
    ("attempts", "Attempts"),
    ("headers", "Headers"),
    ("raw", "Raw"),
)


class DetailScreen(Screen[None]):
    """Everything recorded about one call, in tabs; follows the call while it streams."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back", id="detail.back", tooltip="Back to the list"),
        # priority: the text areas would otherwise take Left/Right as cursor moves.
        Binding("left", "tab(-1)", "Prev tab", priority=True, id="detail.prev_tab"),
        Binding("right", "tab(1)", "Next tab", priority=True, id="detail.next_tab"),
        Binding("c", "copy_curl", "Copy as curl", id="detail.copy_curl",
                tooltip="Copy a curl command replaying this request"),
        # Not priority: a focused table or text area keeps its own arrows; j/k, which a
        # read-only text area ignores, scroll the tab from anywhere.
        Binding("j,down", "scroll_tab('down')", "Scroll down", show=False, id="detail.down"),
        Binding("k,up", "scroll_tab('up')", "Scroll up", show=False, id="detail.up"),
        Binding("pagedown,space", "scroll_tab('page_down')", "Page down", show=False, id="detail.page_down"),
        Binding("pageup", "scroll_tab('page_up')", "Page up", show=False, id="detail.page_up"),
        Binding("g,home", "scroll_tab('home')", "Top", show=False, id="detail.top", tooltip="Top of the tab"),
        Binding("G,end", "scroll_tab('end')", "Bottom", show=False, id="detail.bottom",
                tooltip="Bottom of the tab"),
    ]

    def __init__(self, reader: q.Reader, schema: q.Schema, call_id: str) -> None:
        super().__init__()
        self.reader = reader
        self.schema = schema
        self.call_id = call_id
        self.record: Record | None = None
        self._dirty = False
        self._fetching_partial = False
        self.last_curl: str | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"call {self.call_id}", id="summary")
        with TabbedContent(id="tabs"):
            with TabPane("Conversation", id="conversation"):
                yield VerticalScroll(id="conversation-body")
            with TabPane("Reasoning", id="reasoning"):
                with VerticalScroll():
                    yield Static("loading…", id="reasoning-text", classes="body")
            with TabPane("Response", id="response"):
                with VerticalScroll():
                    yield Static("loading…", id="response-text", classes="body")
                    yield Static("", id="tool-calls", classes="body")
            with TabPane("Attempts", id="attempts"):
                yield DataTable(id="attempts-table", cursor_type="row")
            with TabPane("Headers", id="headers"):
                with VerticalScroll():
                    yield Static("", id="headers-text", classes="body")
            with TabPane("Raw", id="raw"):
                with VerticalScroll():
                    yield Label("request", classes="raw-title")
                    yield Static("", id="raw-request-note", classes="note")
                    yield TextArea("", id="raw-request", read_only=True, soft_wrap=True)
                    yield Label("response", classes="raw-title")
                    yield Static("", id="raw-response-note", classes="note")
                    yield TextArea("", id="raw-response", read_only=True, soft_wrap=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#attempts-table", DataTable)
        for col in ("#", "provider", "model sent", "status", "ttfb", "duration", "error", "url"):
            table.add_column(col, key=col)
        self.set_interval(0.25, self._poll_partial)
        self.reload()

    def reload(self) -> None:
        self._load()

    @work(thread=True, exclusive=True, group="detail")
    def _load(self) -> None:
        try:
            cols, rows = self.reader.query(q.detail_sql(self.schema), [self.call_id])
            record = dict(zip(cols, rows[0])) if rows else None
            attempts: list[Record] = []
            sql = q.attempts_sql(self.schema)
            if sql is not None:
                acols, arows = self.reader.query(sql, [self.call_id])
                attempts = _rows_to_records(acols, arows)
        except Exception as exc:
            self.post_message(DetailLoaded({"_error": str(exc)}, []))
            return
        self.post_message(DetailLoaded(record, attempts))

    @on(DetailLoaded)
    async def _loaded(self, message: DetailLoaded) -> None:
        rec = message.record
        if rec is None or "_error" in (rec or {}):
            why = (rec or {}).get("_error", "this call is not in the DB (yet)")
            self.query_one("#summary", Static).update(Text(f"call {self.call_id}: {why}", style="bold red"))
            return
        first = self.record is None
        self.record = rec
        self._fill_summary(rec)
        if first:  # the request never changes; only the answer grows
            await self._fill_conversation(rec)
        self._fill_reasoning(rec.get("reasoning"), in_progress(rec))
        self._fill_response(rec.get("content"), rec.get("tool_calls"), rec.get("error"))
        self._fill_answer(rec.get("content"), rec.get("tool_calls"), rec.get("reasoning"), rec.get("error"),
                          in_progress(rec))
        self._fill_attempts(message.attempts)
        self._fill_headers(rec)
        self._fill_raw(rec)

    def _fill_summary(self, rec: Record) -> None:
        started = render.as_datetime(rec.get("started_at"))
        t = Text()
        t.append(f"{rec.get('method') or ''} {rec.get('url') or ''}\n", style="bold")
        t.append(f"{started.astimezone():%Y-%m-%d %H:%M:%S}  " if started else "")
        t.append(f"{rec.get('api') or '-'}  ")
        t.append(f"{rec.get('model_requested') or '-'} → {rec.get('model_sent') or '-'}")
        if rec.get("model_reported"):
            t.append(f" (answered: {rec['model_reported']})", style="dim")
        t.append(f"  {rec.get('provider') or '-'}  ")
        t.append_text(status_text(rec))
        if (rec.get("attempts") or 0) > 1:
            t.append(f"  {rec['attempts']}↻", style="bold black on yellow")
        t.append(f"  ttfb {render.fmt_ms(rec.get('ttfb_ms')) or '-'}  total {render.fmt_ms(rec.get('duration_ms')) or '-'}")
        t.append("  tokens " + " · ".join(
            f"{label} {render.fmt_tokens(rec.get(col)) or '-'}"
            for label, col in (("in", "input_tokens"), ("out", "output_tokens"), ("reasoning", "reasoning_tokens"))))
        if rec.get("error"):
            t.append(f"\nerror: {rec['error']}", style="bold red")
        notes = render.as_json_value(rec.get("notes"))
        if notes:
            t.append(f"\nnotes: {'; '.join(map(str, notes)) if isinstance(notes, list) else notes}", style="yellow")
        self.query_one("#summary", Static).update(t)

    async def _fill_conversation(self, rec: Record) -> None:
        box = self.query_one("#conversation-body", VerticalScroll)
        await box.remove_children()
        body = rec.get("request_body")
        widgets: list[Any] = []
        if body is None and rec.get("request_body_raw") is not None:
            widgets.append(Static("The request body is not UTF-8; see the Raw tab.", classes="note"))
            conv = render.Conversation()
        else:
            conv = render.conversation(render.parse_json(body), rec.get("api"))
        if conv.note:
            widgets.append(Static(conv.note, classes="note"))
        if conv.system:
            widgets.append(Collapsible(Static(Text(render.clip("\n\n".join(conv.system), render.BODY_DISPLAY_LIMIT)),
                                              classes="body"),
                                       title=f"system prompt ({sum(len(s) for s in conv.system):,} chars)",
                                       collapsed=True, id="system-prompt"))
        if conv.tools:
            names = [str((t.get("function") or t).get("name", "?")) if isinstance(t, dict) else "?" for t in conv.tools]
            widgets.append(Collapsible(Static(Text(render.clip(render.pretty_json(conv.tools), render.BODY_DISPLAY_LIMIT)),
                                              classes="body"),
                                       title=f"tools ({len(conv.tools)}): {', '.join(names)[:120]}",
                                       collapsed=True, id="tools"))
        for turn in conv.turns:
            role = turn.role.split(" ", 1)[0]
            widgets.append(Static(Text(turn.role, style="bold"), classes=f"role role-{role}"))
            widgets.append(Static(Text(turn.text), classes=f"turn turn-{role}"))
        if not widgets:
            widgets.append(Static("empty request body", classes="note"))
        # The answer is the conversation's last turn (the request only holds what led to it);
        # filled by _fill_answer as the call loads and streams.
        widgets += [
            Static(Text("assistant (answer)", style="bold"), id="answer-role", classes="role role-assistant"),
            Collapsible(Static("", id="answer-reasoning-text", classes="body"), title="reasoning",
                        collapsed=True, id="answer-reasoning"),
            Static("", id="answer-text", classes="turn turn-assistant"),
            Static("", id="answer-tools", classes="turn turn-assistant"),
        ]
        await box.mount_all(widgets)

    def _fill_answer(self, content: str | None, tool_calls: Any, reasoning: str | None, error: str | None,
                     live: bool) -> None:
        try:
            role = self.query_one("#answer-role", Static)
        except NoMatches:  # the conversation is still being mounted; the next fill comes
            return
        role.update(Text("assistant (answering…)" if live else "assistant (answer)", style="bold"))
        folded = self.query_one("#answer-reasoning", Collapsible)
        folded.display = bool(reasoning)
        if reasoning:
            folded.title = f"reasoning ({len(reasoning):,} chars)"
            self.query_one("#answer-reasoning-text", Static).update(
                Text(render.clip(reasoning, render.BODY_DISPLAY_LIMIT)))
        text = Text()
        if content:
            text.append(render.clip(content, render.BODY_DISPLAY_LIMIT))
        elif error:
            text.append(f"error: {error}", style="bold red")
        elif live:
            text.append("…waiting for the answer", style="dim")
        elif not tool_calls:
            text.append("no text content", style="dim")
        answer = self.query_one("#answer-text", Static)
        answer.update(text)
        answer.display = bool(text.plain)
        tools = self.query_one("#answer-tools", Static)
        calls = tool_calls_text(tool_calls)
        tools.update(calls)
        tools.display = bool(calls.plain)

    def _fill_reasoning(self, reasoning: str | None, live: bool) -> None:
        widget = self.query_one("#reasoning-text", Static)
        if reasoning:
            widget.update(Text(render.clip(reasoning, render.BODY_DISPLAY_LIMIT)))
        else:
            widget.update(Text("…waiting for reasoning" if live else "no reasoning recorded", style="dim"))

    def _fill_response(self, content: str | None, tool_calls: Any, error: str | None) -> None:
        text = Text()
        if content:
            text.append(render.clip(content, render.BODY_DISPLAY_LIMIT))
        elif error:
            text.append(f"error: {error}", style="bold red")
        else:
            text.append("no text content", style="dim")
        self.query_one("#response-text", Static).update(text)
        out = tool_calls_text(tool_calls)
        if out.plain:
            out = Text("\n") + out
        self.query_one("#tool-calls", Static).update(out)

    def _fill_attempts(self, attempts: list[Record]) -> None:
        table = self.query_one("#attempts-table", DataTable)
        table.clear()
        for a in attempts:
            st = a.get("status")
            table.add_row(
                str(a.get("n")), a.get("provider") or "-", Text(a.get("model_sent") or "-"),
                Text(str(st) if st is not None else "-", style="green" if st and st < 400 else "bold red"),
                render.fmt_ms(a.get("ttfb_ms")), render.fmt_ms(a.get("duration_ms")),
                Text(a.get("error") or "", style="red"), Text(a.get("url") or ""),
            )

    def _fill_headers(self, rec: Record) -> None:
        t = Text()
        for title, col in (("request", "request_headers"), ("response", "response_headers")):
            t.append(f"{title}\n", style="bold underline")
            headers = render.as_json_value(rec.get(col))
            if isinstance(headers, dict) and headers:
                for k, v in headers.items():
                    t.append(f"{k}: ", style="bold cyan")
                    t.append(f"{v}\n")
            else:
                t.append("none recorded\n", style="dim")
            t.append("\n")
        self.query_one("#headers-text", Static).update(t)

    def _fill_raw(self, rec: Record, response_body: str | None = None) -> None:
        for side in ("request", "response"):
            if side == "response" and response_body is not None:
                text, note = render.body_for_display(response_body, None)
            else:
                text, note = render.body_for_display(rec.get(f"{side}_body"), rec.get(f"{side}_body_raw"))
            self.query_one(f"#raw-{side}", TextArea).load_text(text)
            label = self.query_one(f"#raw-{side}-note", Static)
            label.update(note or "")
            label.display = bool(note)

    # -- live growth ----------------------------------------------------------------------
    def live_progress(self) -> None:
        self._dirty = True  # coalesced: a fast stream sends many events; refresh at most 4x/s

    def _poll_partial(self) -> None:
        if self._dirty and not self._fetching_partial:
            self._dirty = False
            self._fetching_partial = True
            self._fetch_partial()

    @work(thread=True, exclusive=True, group="partial")
    def _fetch_partial(self) -> None:
        try:
            partial = self.reader.partial(self.call_id)
        except Exception:
            partial = None
        self.post_message(PartialLoaded(partial))

    @on(PartialLoaded)
    def _partial_loaded(self, message: PartialLoaded) -> None:
        self._fetching_partial = False
        p = message.partial
        if not p:
            return
        self._fill_reasoning(p.get("reasoning"), True)
        self._fill_response(p.get("content"), p.get("tool_calls"), None)
        self._fill_answer(p.get("content"), p.get("tool_calls"), p.get("reasoning"), None, True)
        if self.record is not None:
            self._fill_raw(self.record, response_body=p.get("response_body") or "")

    # -- actions --------------------------------------------------------------------------
    def action_back(self) -> None:
        self.app.pop_screen()

    def action_tab(self, step: int) -> None:
        tabs = self.query_one(TabbedContent)
        ids = [tid for tid, _ in TABS]
        current = ids.index(tabs.active) if tabs.active in ids else 0
        tabs.active = ids[(current + step) % len(ids)]

    def tab_scroller(self) -> Widget:
        """What scrolls in the tab shown: its scroll container, or the attempts table."""
        pane = self.query_one(f"#{self.query_one(TabbedContent).active}", TabPane)
        for widget in pane.query("VerticalScroll, DataTable"):
            return widget
        return pane

    def action_scroll_tab(self, how: str) -> None:
        scroller = self.tab_scroller()
        {"down": scroller.scroll_down, "up": scroller.scroll_up, "page_down": scroller.scroll_page_down,
         "page_up": scroller.scroll_page_up, "home": scroller.scroll_home,
         "end": scroller.scroll_end}[how](animate=False)

    def action_copy_curl(self) -> None:
        rec = self.record
        if rec is None:
            self.notify("the call is still loading", severity="warning")
            return
        headers = render.as_json_value(rec.get("request_headers"))
        cmd = render.curl_command(rec.get("method") or "POST", rec.get("url") or "",
                                  headers if isinstance(headers, dict) else {},
                                  rec.get("request_body"), rec.get("request_body_raw"))
        # OSC 52 may never arrive (tmux drops it unless set-clipboard is on, many terminals
        # ignore it) and Textual cannot tell: the file is the copy that surely exists.
        self.app.copy_to_clipboard(cmd)
        self.last_curl = cmd
        keys = "Redacted keys stay redacted: put yours back in."
        try:
            safe_id = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in self.call_id)
            path = write_private(curl_dir() / f"{safe_id}.sh",
                                 f"# llmtap call {self.call_id}. {keys}\n{cmd}\n")
        except OSError as exc:
            self.notify(f"curl command sent to the terminal clipboard only (it may not arrive); "
                        f"writing it to {curl_dir()} failed: {exc}", severity="warning", timeout=10)
            return
        if os.environ.get("TMUX"):
            where = (f"curl command written to {path} (also sent to the terminal clipboard, which tmux "
                     "ignores unless `set -g set-clipboard on`).")
        else:
            where = (f"curl command copied to the clipboard (if the terminal accepts OSC 52) and "
                     f"written to {path}.")
        self.notify(f"{where} {keys}", timeout=10)


# -- stats --------------------------------------------------------------------------------------
class BarChart(Widget):
    """Bars from a zero baseline, one value per bucket spread over the width. (Sparkline
    scales from the data's minimum: 2 and 3 calls a bucket would read as none and many, and
    one error among thousands of calls would not show.) Any value above zero shows."""

    DEFAULT_CSS = """
    BarChart {
        height: 3;
    }
    """
    BLOCKS = " ▁▂▃▄▅▆▇█"

    data: reactive[Sequence[float]] = reactive(list, always_update=True)

    def render(self) -> Text:
        width, height = self.size.width, self.size.height
        values = list(self.data or [])
        if not values or width <= 0 or height <= 0:
            return Text("")
        top = max(values) or 1
        columns = []
        for i in range(width):
            v = values[min(i * len(values) // width, len(values) - 1)]
            columns.append(0 if v <= 0 else max(1, round(v / top * height * 8)))
        rows = []
        for r in range(height):
            floor_ = (height - 1 - r) * 8
            rows.append("".join(self.BLOCKS[min(8, max(0, e - floor_))] for e in columns))
        return Text("\n".join(rows))


def _stamp(ms: int, width_ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000).astimezone()
    return f"{moment:%Y-%m-%d %H:%M:%S}" if width_ms < 60_000 else f"{moment:%Y-%m-%d %H:%M}"


class StatsScreen(Screen[None]):
    """Per model and provider: volume, errors, fallbacks, tokens, latency percentiles; calls,
    errors and p95 latency over the filtered calls' time range; a latency histogram."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back", id="stats.back"),
        Binding("r", "refresh", "Refresh", id="stats.refresh"),
    ]

    def __init__(self, reader: q.Reader, schema: q.Schema, flt: q.Filter) -> None:
        super().__init__()
        self.reader = reader
        self.schema = schema
        self.filter = flt
        self.activity: Activity | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"filter: {self.filter.text or '(none)'}", id="stats-filter")
        yield DataTable(id="stats-table", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="plots"):
            with Vertical(classes="plot", id="over-time"):
                yield Label("over time", id="range-label", classes="plot-title")
                for key, title in (("calls", "calls"), ("errors", "errors"), ("p95", "p95 duration")):
                    yield Label(title, id=f"{key}-label")
                    yield BarChart(id=f"{key}-chart", classes=f"chart chart-{key}")
            with Vertical(classes="plot", id="latency"):
                yield Label("duration histogram (ms, log₂ buckets)", id="histogram-label", classes="plot-title")
                yield BarChart(id="histogram", classes="chart chart-histogram")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#stats-table", DataTable)
        for col in ("model", "provider", "calls", "err %", "fallback %", "in", "out", "reason",
                    "ttfb p50", "p95", "p99", "dur p50", "p95 ", "p99 "):
            table.add_column(col, key=col)
        self.action_refresh()

    def action_refresh(self) -> None:
        self._load()

    def action_back(self) -> None:
        self.app.pop_screen()

    @work(thread=True, exclusive=True, group="stats")
    def _load(self) -> None:
        try:
            rows = q.stats(self.reader, self.schema, self.filter)
            activity = self._activity()
            hsql, hparams = q.latency_histogram_sql(self.schema, self.filter)
            _, hrows = self.reader.query(hsql, hparams)
        except Exception as exc:
            self.post_message(StatsLoaded([], None, [], error=str(exc)))
            return
        self.post_message(StatsLoaded(rows, activity,
                                      [(int(b), int(n)) for b, n in hrows if b is not None]))

    def _activity(self) -> Activity | None:
        """Buckets over the time from the first filtered call to the last."""
        _, rows = self.reader.query(*q.time_range_sql(self.schema, self.filter))
        if not rows or rows[0][0] is None:
            return None
        first, last = int(rows[0][0]), int(rows[0][1])
        start, width, label = q.pick_bucket(first, last)
        n = (last - start) // width + 1
        calls, errors, p95 = [0] * n, [0] * n, [0.0] * n
        _, brows = self.reader.query(*q.activity_sql(self.schema, self.filter, start, width))
        for b, count, errs, p in brows:
            if b is not None and 0 <= int(b) < n:
                calls[int(b)], errors[int(b)], p95[int(b)] = int(count), int(errs or 0), float(p or 0.0)
        return Activity(start, width, label, calls, errors, p95)

    @on(StatsLoaded)
    def _loaded(self, message: StatsLoaded) -> None:
        if message.error:
            self.notify(f"stats failed: {message.error}", severity="error")
            return
        table = self.query_one("#stats-table", DataTable)
        table.clear()

        def pct(rate: float) -> Text:
            v = 100.0 * rate
            return Text(f"{v:.1f}", style="bold red" if v >= 5 else "", justify="right")

        def ms(value: float | None) -> str:
            return "" if value is None else render.fmt_ms(value)

        for r in message.rows:
            table.add_row(
                Text(str(r["model"])), Text(str(r["provider"])), Text(str(r["calls"]), justify="right"),
                pct(r["error_rate"]), pct(r["fallback_rate"]),
                render.fmt_tokens(r["input_tokens"]), render.fmt_tokens(r["output_tokens"]),
                render.fmt_tokens(r["reasoning_tokens"]),
                *(ms(r[f"ttfb_{p}"]) for p in ("p50", "p95", "p99")),
                *(ms(r[f"duration_{p}"]) for p in ("p50", "p95", "p99")),
            )
        self._show_activity(message.activity)
        if message.histogram:
            # A fixed minimum span (32 ms … 16 s) so one busy bucket does not fill the plot.
            lo = min(5, *(b for b, _ in message.histogram))
            hi = max(13, *(b for b, _ in message.histogram))
            counts = dict(message.histogram)
            self.query_one("#histogram", BarChart).data = [counts.get(b, 0) for b in range(lo, hi + 1)]
            self.query_one("#histogram-label", Label).update(
                f"duration histogram: {2 ** lo:,} ms … {2 ** (hi + 1):,} ms (log₂ buckets)")

    def _show_activity(self, activity: Activity | None) -> None:
        self.activity = activity
        if activity is None:
            self.query_one("#range-label", Label).update("over time: no calls")
            for key in ("calls", "errors", "p95"):
                self.query_one(f"#{key}-chart", BarChart).data = []
            return
        end = activity.start_ms + len(activity.calls) * activity.width_ms
        self.query_one("#range-label", Label).update(
            f"per {activity.label}, {_stamp(activity.start_ms, activity.width_ms)} → "
            f"{_stamp(end, activity.width_ms)} ({len(activity.calls)} bucket{'s' * (len(activity.calls) != 1)})")
        total, errs = sum(activity.calls), sum(activity.errors)
        p95 = [v for v in activity.p95_ms if v]
        self.query_one("#calls-label", Label).update(
            f"calls: {total:,}, at most {max(activity.calls):,} per {activity.label}")
        self.query_one("#errors-label", Label).update(
            f"errors: {errs:,} ({100.0 * errs / total if total else 0:.1f}%), at most {max(activity.errors):,} "
            f"per {activity.label}")
        self.query_one("#p95-label", Label).update(
            f"p95 duration: {render.fmt_ms(min(p95))} … {render.fmt_ms(max(p95))}" if p95
            else "p95 duration: no finished calls")
        self.query_one("#calls-chart", BarChart).data = activity.calls
        self.query_one("#errors-chart", BarChart).data = activity.errors
        self.query_one("#p95-chart", BarChart).data = activity.p95_ms


# -- export -------------------------------------------------------------------------------------
class ExportScreen(ModalScreen[None]):
    """Ask where to write the filtered calls as Parquet, then do it with a progress bar."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="export.cancel"),
    ]

    def __init__(self, reader: q.Reader, flt: q.Filter) -> None:
        super().__init__()
        self.reader = reader
        self.filter = flt
        self.running = False

    def compose(self) -> ComposeResult:
        default = Path.cwd() / f"llmtap-export-{datetime.now():%Y%m%d-%H%M%S}.parquet"
        with Vertical(id="export-box"):
            yield Label(f"Export calls matching: {self.filter.text or '(all calls)'}")
            # No select-on-focus: a second `e`, or the first letter typed, would replace the
            # whole path instead of editing it (ctrl+u clears it on purpose).
            yield Input(str(default), id="export-path", select_on_focus=False)
            yield Label("Enter exports · ctrl+u clears the path · Esc cancels", classes="hint")
            yield ProgressBar(id="export-progress", show_eta=False)
            yield Static("", id="export-status")
            with Horizontal(id="export-buttons"):
                yield Button("Export", id="export-go", variant="primary")
                yield Button("Cancel", id="export-cancel")

    def on_mount(self) -> None:
        self.query_one("#export-progress").display = False
        path = self.query_one("#export-path", Input)
        path.focus()
        path.cursor_position = len(path.value)

    @on(Input.Submitted, "#export-path")
    @on(Button.Pressed, "#export-go")
    def _go(self) -> None:
        if self.running:
            return
        text = self.query_one("#export-path", Input).value.strip()
        if not text:
            self.query_one("#export-status", Static).update(Text("give a file path", style="bold red"))
            return
        path = Path(text).expanduser()
        if not path.parent.is_dir():
            self.query_one("#export-status", Static).update(Text(f"no such directory: {path.parent}", style="bold red"))
            return
        self.running = True
        self.query_one("#export-progress").display = True
        self.query_one("#export-status", Static).update("exporting…")
        self._export(path)

    @on(Button.Pressed, "#export-cancel")
    def action_cancel(self) -> None:
        if not self.running:  # an export in flight cannot be interrupted half-written
            self.dismiss(None)

    @work(thread=True, exclusive=True, group="export")
    def _export(self, path: Path) -> None:
        def progress(done: int, total: int) -> None:
            self.post_message(ExportProgress(done, total))

        try:
            count = self.reader.export(path, "parquet", where_sql=self.filter.where_sql,
                                       params=list(self.filter.params), progress=progress)
        except Exception as exc:
            self.post_message(ExportDone(str(path), 0, error=str(exc)))
            return
        self.post_message(ExportDone(str(path), int(count or 0)))

    @on(ExportProgress)
    def _progress(self, message: ExportProgress) -> None:
        self.query_one("#export-progress", ProgressBar).update(total=max(message.total, 1), progress=message.done)

    @on(ExportDone)
    def _done(self, message: ExportDone) -> None:
        self.running = False
        if message.error:
            self.query_one("#export-status", Static).update(Text(f"export failed: {message.error}", style="bold red"))
            return
        self.app.notify(f"exported {message.count:,} calls to {message.path}", timeout=6)
        self.dismiss(None)


# -- help ---------------------------------------------------------------------------------------
class HelpScreen(ModalScreen[None]):
    """Every binding of every screen, read from the BINDINGS themselves (with keymap overrides)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close", id="help.close"),
        Binding("question_mark", "close", "Close", show=False, id="help.close2"),
    ]

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box"):
            yield Label("llmtap keys", id="help-title")
            yield DataTable(id="help-table", cursor_type="row", zebra_stripes=True)
            yield Static(Text("filter syntax: " + q.FILTER_HELP, style="dim"), id="help-filter")

    def on_mount(self) -> None:
        table = self.query_one("#help-table", DataTable)
        for col in ("where", "key", "does", "binding id"):
            table.add_column(col, key=col)
        for where, key, desc, bid in help_rows(self.app):
            table.add_row(where, Text(key, style="bold"), desc, Text(bid, style="dim"))
        table.focus()

    def action_close(self) -> None:
        self.dismiss(None)


HELP_SOURCES: tuple[tuple[str, type], ...] = ()  # filled below, once the classes exist


def help_rows(app: App[Any]) -> list[tuple[str, str, str, str]]:
    """(screen, key, description, binding id) for every binding, after keymap overrides."""
    keymap: dict[str, str] = dict(getattr(app, "_keymap", {}) or {})
    rows: list[tuple[str, str, str, str]] = []
    for where, cls in HELP_SOURCES:
        # Compound keys ("a,b") unroll into several Bindings of one id: one row with every key.
        by_id: dict[str, tuple[list[str], Binding]] = {}
        for n, binding in enumerate(Binding.make_bindings(getattr(cls, "BINDINGS", []))):
            entry = by_id.setdefault(binding.id or f"#{n}", ([], binding))
            entry[0].append(binding.key)
        for bid, (keys, binding) in by_id.items():
            bid = binding.id or ""
            override = keymap.get(bid) if bid else None
            key_list = override.split(",") if override else keys
            display = ", ".join(app.get_key_display(Binding(k.strip(), "")) for k in key_list)
            rows.append((where, display, binding.tooltip or binding.description or binding.action, bid))
    return rows


# -- the app ------------------------------------------------------------------------------------
class LlmtapApp(App[int]):
    """The UI. `reader` None means not recording; `proxy_factory` makes the app run the proxy."""

    CSS_PATH = "app.tcss"
    TITLE = "llmtap"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit", id="app.quit", tooltip="Quit (stops the proxy when it runs here)"),
        Binding("question_mark", "help", "Help", id="app.help", tooltip="List every key"),
    ]

    def __init__(self, reader: q.Reader | None, *, source: str = "",
                 proxy_factory: Callable[[], Any] | None = None, note: str | None = None,
                 listening: Listening | None = None) -> None:
        super().__init__()
        self.reader = q.TerminalSafeReader(reader) if reader is not None else None
        self.source = source
        self.proxy_factory = proxy_factory
        # Where the proxy this app runs listens, for the empty list; the bound ports replace
        # it once the proxy has started.
        self.listening = listening
        self.proxy: Any = None
        self.startup_error: str | None = None
        self._proxy_task: asyncio.Task[None] | None = None
        self._note = note
        self.live_lost = False
        self.sub_title = self._source_title()

    def _source_title(self) -> str:
        """The DB and, when attached to a running `llmtap run`, whether it still answers."""
        if getattr(self.reader, "kind", "") != "remote":
            return self.source
        if self.live_lost:
            # First: a narrow terminal cuts the end of the title.
            return f"llmtap run stopped: not live (resumes when it runs again) — {self.source}"
        return f"{self.source}  (live, attached to llmtap run)"

    def set_live(self, ok: bool) -> None:
        """The live feed was lost (the proxy holding the file stopped) or answers again."""
        self.live_lost = not ok
        if getattr(self.reader, "kind", "") == "remote":
            self.sub_title = self._source_title()

    def get_default_screen(self) -> Screen[Any]:
        return CallsScreen(self.reader, note=self._note)

    @property
    def calls(self) -> CallsScreen:
        screen = self.screen_stack[0]
        assert isinstance(screen, CallsScreen)
        return screen

    def on_mount(self) -> None:
        if self.proxy_factory is not None:
            self._proxy_task = asyncio.create_task(self._run_proxy())

    async def _run_proxy(self) -> None:
        """The proxy lives on this loop (mitmproxy is asyncio); its start-up error ends the app."""
        assert self.proxy_factory is not None
        try:
            proxy = self.proxy_factory()
            await proxy.start()
        # The proxy's StartupError and rules errors alike: a message and code 2. Caught as
        # Exception because the UI does not import the proxy (the import contracts forbid it).
        except Exception as exc:
            self.startup_error = str(exc)
            self.exit(return_code=2)
            return
        self.proxy = proxy
        config = getattr(proxy, "config", None)
        confdir = getattr(config, "confdir", None) or (self.listening.confdir if self.listening else None)
        self.listening = Listening(proxy.proxy_addr, proxy.gateway_addr, confdir)
        if self.screen_stack and isinstance(self.screen_stack[0], CallsScreen) and self.screen_stack[0].is_mounted:
            self.screen_stack[0]._show_empty()
        parts = []
        if proxy.proxy_addr:
            parts.append(f"proxy :{proxy.proxy_addr[1]}")
        if proxy.gateway_addr:
            parts.append(f"gateway :{proxy.gateway_addr[1]}")
        self.sub_title = "  ".join([*parts, self.source])
        await proxy.wait()
        if self.proxy is not None:  # the proxy stopped on its own (not via quit)
            self.proxy = None
            await proxy.close()
            self.exit(return_code=0)

    async def action_quit(self) -> None:
        await self.stop_proxy()
        self.exit(return_code=0)

    async def stop_proxy(self) -> None:
        proxy, self.proxy = self.proxy, None
        if proxy is not None:
            proxy.stop()
            try:
                await proxy.close()
            except Exception:
                log.exception("closing the proxy failed")
        if self._proxy_task is not None:
            self._proxy_task.cancel()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())


HELP_SOURCES = (
    ("everywhere", LlmtapApp),
    ("list", CallsScreen),
    ("list", CallTable),
    ("call", DetailScreen),
    ("stats", StatsScreen),
    ("export", ExportScreen),
    ("help", HelpScreen),
)

