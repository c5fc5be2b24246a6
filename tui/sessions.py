"""The sessions view: the list of sessions, and one session as a tree of its calls.

The same queries as `llmtap sessions` (recorder/session_view.py). A session's tree hangs each
call under the call it continues (`parent_call_id`), labelled with the evidence that tied them
(the tool call its results answer, a grown history, a header); the call that failed is red.
Opening a call goes back to the app's call view through `open_call`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static, Tree

from llmtap.recorder.session_view import failed_share, find_session, list_sessions, session_calls
from llmtap.tui import query as q
from llmtap.tui import render

OpenCall = Callable[[str], Any]


class _Loaded(Message):
    def __init__(self, data: Any, error: str | None = None) -> None:
        super().__init__()
        self.data = data
        self.error = error


def _failed(c: dict[str, Any]) -> bool:
    return c["status"] is None or c["status"] >= 400 or c["error"] is not None


def _when(v: Any) -> str:
    return v.astimezone().strftime("%m-%d %H:%M:%S") if hasattr(v, "astimezone") else str(v or "")


class SessionsScreen(Screen[None]):
    """Sessions newest first, with the share failed per client."""

    AUTO_FOCUS = "#sessions"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back", id="sessions.back", tooltip="Back to the calls"),
        Binding("enter", "open", "Open", id="sessions.open", tooltip="Open the highlighted session"),
        Binding("f", "failed", "Failed only", id="sessions.failed", tooltip="Show only failed sessions, or all"),
        Binding("r", "refresh", "Refresh", id="sessions.refresh"),
    ]

    def __init__(self, reader: q.Reader, open_call: OpenCall) -> None:
        super().__init__()
        self.reader = reader
        self.open_call = open_call
        self.failed_only = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("sessions", id="sessions-summary")
        yield DataTable(id="sessions", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#sessions", DataTable)
        for col in ("started", "client", "title", "calls", "errors", "tokens in/out", "cost $", "found by"):
            table.add_column(col, key=col)
        self.action_refresh()

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_failed(self) -> None:
        self.failed_only = not self.failed_only
        self.action_refresh()

    def action_refresh(self) -> None:
        self._load()

    @work(thread=True, exclusive=True, group="sessions")
    def _load(self) -> None:
        try:
            rows = list_sessions(self.reader, failed=self.failed_only, limit=500)
            shares = failed_share(self.reader)
        except Exception as exc:
            self.post_message(_Loaded(None, str(exc)))
            return
        self.post_message(_Loaded((rows, shares)))

    @on(_Loaded)
    def _loaded(self, message: _Loaded) -> None:
        if message.error:
            self.notify(f"sessions failed: {message.error}", severity="error")
            return
        rows, shares = message.data
        total, failed = sum(s["sessions"] for s in shares), sum(s["failed"] for s in shares)
        per_client = "; ".join(f"{s['client']}: {s['failed']}/{s['sessions']} failed" for s in shares[:4])
        self.query_one("#sessions-summary", Static).update(Text(
            f"{total} sessions, {failed} failed ({failed / total:.0%})   {per_client}"
            + ("   [failed only]" if self.failed_only else "") if total else "no sessions recorded yet"))
        table = self.query_one("#sessions", DataTable)
        table.clear()
        for r in rows:
            style = "bold red" if r["failed"] else ""
            table.add_row(_when(r["started_at"]), Text(str(r["client"] or "-")), Text(str(r["title"] or ""), style=style),
                          Text(str(r["calls"]), justify="right"), Text(str(r["errors"]), style=style, justify="right"),
                          f"{render.fmt_tokens(r['input_tokens'])}/{render.fmt_tokens(r['output_tokens'])}",
                          "-" if r.get("cost_usd") is None else str(r["cost_usd"]), Text(str(r["source"])),
                          key=r["id"])

    def action_open(self) -> None:
        table = self.query_one("#sessions", DataTable)
        if table.row_count:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            self.app.push_screen(SessionScreen(self.reader, str(key), self.open_call))

    @on(DataTable.RowSelected, "#sessions")
    def _selected(self, event: DataTable.RowSelected) -> None:
        self.app.push_screen(SessionScreen(self.reader, str(event.row_key.value), self.open_call))


class SessionScreen(Screen[None]):
    """One session: its totals, and its calls as a tree by the call each continues."""

    AUTO_FOCUS = "#session-tree"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back", id="session.back"),
        Binding("enter", "open_call", "Open call", id="session.open", tooltip="Open the highlighted call"),
    ]

    def __init__(self, reader: q.Reader, ref: str, open_call: OpenCall) -> None:
        super().__init__()
        self.reader = reader
        self.ref = ref
        self.open_call = open_call
        self.session: dict[str, Any] | None = None
        self.calls: list[dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"session {self.ref}", id="session-summary")
        yield Tree("calls", id="session-tree")
        yield Footer()

    def on_mount(self) -> None:
        self._load()

    def action_back(self) -> None:
        self.app.pop_screen()

    @work(thread=True, exclusive=True, group="session")
    def _load(self) -> None:
        try:
            session = find_session(self.reader, self.ref)
            calls = session_calls(self.reader, session) if session else []
        except Exception as exc:
            self.post_message(_Loaded(None, str(exc)))
            return
        self.post_message(_Loaded((session, calls)))

    @on(_Loaded)
    def _loaded(self, message: _Loaded) -> None:
        if message.error:
            self.notify(f"session failed to load: {message.error}", severity="error")
            return
        self.session, self.calls = message.data
        s = self.session
        summary = self.query_one("#session-summary", Static)
        if s is None:
            summary.update(Text(f"no session {self.ref}: this call was recorded before sessions, or is in progress"))
            return
        summary.update(Text.assemble(
            (f"{s['title'] or '(no title)'}\n", "bold"),
            f"{s['calls']} calls, {s['errors']} errors, {s['fallbacks']} fallbacks, tokens "
            f"{render.fmt_tokens(s['input_tokens'])} in / {render.fmt_tokens(s['output_tokens'])} out"
            + (f", ${s['cost_usd']}" if s.get("cost_usd") is not None else "")
            + f", {render.fmt_ms(s['duration_ms'] or 0)}   found by {s['source']}   client {s['client'] or '-'}",
            ("   FAILED" if s["failed"] else "", "bold red")))
        tree: Tree[str] = self.query_one("#session-tree", Tree)
        tree.clear()
        tree.root.set_label(Text(f"session {s['id']}"))
        tree.root.data = None
        nodes: dict[str, Any] = {}
        first_failed = None
        for c in self.calls:
            parent = nodes.get(c["parent_call_id"] or "", tree.root)
            node = parent.add(self._label(c), data=c["id"], expand=True)
            nodes[c["id"]] = node
            if first_failed is None and _failed(c):
                first_failed = node
        tree.root.expand_all()
        if first_failed is not None:
            # The call that failed, first thing to see (once the tree has laid out its lines).
            self.call_after_refresh(tree.move_cursor, first_failed)

    @staticmethod
    def _label(c: dict[str, Any]) -> Text:
        tools = [f"{t.get('name')}#{t.get('id')}" for t in json.loads(c["tool_calls"] or "[]") if isinstance(t, dict)]
        said = ("→ " + ", ".join(tools)) if tools else " ".join(str(c["error"] or c["content"] or "").split())[:60]
        failed = _failed(c)
        return Text.assemble(
            (f"{c['turn'] or '?'}. ", "bold"), (f"[{c['session_link']}] ", "cyan"),
            f"{c['model_sent'] or c['model_requested'] or '-'} ",
            (f"{c['status'] or 'no status'} ", "bold red" if failed else ""),
            f"{render.fmt_ms(c['duration_ms']) if c['duration_ms'] is not None else ''} ",
            (said, "bold red" if failed else "dim"))

    def action_open_call(self) -> None:
        node = self.query_one("#session-tree", Tree).cursor_node
        if node is not None and node.data:
            self.open_call(str(node.data))

    @on(Tree.NodeSelected, "#session-tree")
    def _selected(self, event: Tree.NodeSelected) -> None:
        if event.node.data:
            self.open_call(str(event.node.data))
