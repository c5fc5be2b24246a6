"""The terminal UI: pilot tests against real DuckDB files built in tmp_path."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from textual.containers import VerticalScroll
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Label, Static, TabbedContent, TextArea

from llmtap.tui import query as q
from llmtap.tui import render
from llmtap.tui.app import (
    HELP_SOURCES,
    CallsScreen,
    DetailScreen,
    ExportScreen,
    HelpScreen,
    LlmtapApp,
    StatsScreen,
)
from tuihelpers import BASE_TIME, DuckReader, make_reader

SIZE = (160, 45)


@pytest.fixture(autouse=True)
def _no_blink(monkeypatch: pytest.MonkeyPatch) -> None:
    """A blinking cursor would make screens differ between two identical runs."""
    from textual.widgets import Input as _Input

    monkeypatch.setattr(_Input, "cursor_blink", False, raising=False)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Copy as curl writes to the user's cache: a test's own, here."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("TMUX", raising=False)
    return cache


async def wait_for(pilot: Pilot[Any], cond: Callable[[], bool], what: str = "condition", timeout: float = 10.0) -> None:
    """Let the app run until `cond()` holds; fail with `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


def calls(app: LlmtapApp) -> CallsScreen:
    return app.calls


def table(app: LlmtapApp) -> DataTable[Any]:
    return app.calls.table


def first_key(app: LlmtapApp) -> str:
    t = table(app)
    return str(t.coordinate_to_cell_key((0, 0)).row_key.value)


async def loaded(pilot: Pilot[Any], app: LlmtapApp, n: int | None = None) -> None:
    await wait_for(pilot, lambda: app.calls.pages_loaded > 0 and (n is None or table(app).row_count == n),
                   f"{n} rows")


def static_text(widget: Static) -> str:
    return str(widget.render())


ROWS: list[dict[str, Any]] = [
    {"model_requested": "gpt-4o", "model_sent": "gpt-4o", "provider": "openai", "content": "the weather is fine"},
    {"model_requested": "claude-sonnet", "model_sent": "claude-sonnet-4", "provider": "anthropic",
     "api": "anthropic.messages", "status": 503, "attempts": 2, "client": "cline/3.1 node/22",
     "error": "all routes failed",
     "_attempts": [
         {"call_id": "X", "n": 1, "provider": "anthropic", "url": "https://api.anthropic.com/v1/messages",
          "model_sent": "claude-sonnet-4", "status": 529, "error": "overloaded", "started_at": "2026-11-20T12:00:00Z"},
         {"call_id": "X", "n": 2, "provider": "openrouter", "url": "https://openrouter.ai/api/v1/chat/completions",
          "model_sent": "anthropic/claude-sonnet-4", "status": 503, "error": "no capacity",
          "started_at": "2026-11-20T12:00:01Z"},
     ]},
    {"model_requested": "qwen3", "model_sent": "qwen3:8b", "provider": "ollama", "api": "ollama.chat",
     "reasoning": "Let me think about rate limits.", "complete": False, "stream": True},
]


def reader_with_rows(tmp_path: Path, rows: list[dict[str, Any]] = ROWS) -> DuckReader:
    reader = make_reader(tmp_path, [])
    for i, fields in enumerate(rows):
        fields = dict(fields)
        fields.setdefault("started_at", BASE_TIME + timedelta(seconds=i))
        atts = fields.pop("_attempts", None)
        call_id = reader.insert(**fields)
        for att in atts or []:
            reader.con.execute(
                "INSERT INTO attempts (call_id, n, provider, url, model_sent, status, error, started_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [call_id, att["n"], att["provider"], att["url"], att["model_sent"], att["status"], att["error"],
                 att["started_at"]])
    return reader


# -- the filter language ------------------------------------------------------------------------
SCHEMA = q.Schema(calls=frozenset(q.DETAIL_COLUMNS))


@pytest.mark.parametrize("text", [
    "model:gpt-4o*", "provider:openrouter client:cline", "status:5xx", "status:>=400", "status:404",
    "status:400-499", "status:live", "errors fallbacks incomplete live", "since:2026-11-01 until:2026-11-02T10:00",
    "since:2h", "-model:gpt*", '"rate limit" weather', "text:\"a:b\"", "http://x", "id:01M7",
])
def test_filter_parses_to_sql_that_runs(tmp_path: Path, text: str) -> None:
    reader = reader_with_rows(tmp_path)
    flt = q.parse_filter(text, SCHEMA)
    assert flt.clauses
    sql, params = q.page_sql(SCHEMA, flt, None)
    reader.query(sql, params)  # no syntax or binder error
    assert "gpt" not in sql.replace("gpt-4o", "")  # user text only ever travels as a parameter


@pytest.mark.parametrize("text, message", [
    ("status:abc", "status:abc"), ("since:yesterday", "since:yesterday"), ('"unclosed', "quote"),
    ("modle:gpt", "unknown filter modle"), ("model:", "needs a value"),
])
def test_filter_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(q.FilterError, match=message):
        q.parse_filter(text, SCHEMA)


def test_filter_semantics(tmp_path: Path) -> None:
    reader = reader_with_rows(tmp_path)

    def models(text: str) -> set[str]:
        sql, params = q.page_sql(SCHEMA, q.parse_filter(text, SCHEMA), None)
        cols, rows = reader.query(sql, params)
        return {r[cols.index("model_requested")] for r in rows}

    assert models("model:claude*") == {"claude-sonnet"}
    assert models("model:QWEN3:8B") == {"qwen3"}  # model_sent matches too, case-insensitively
    assert models("fallbacks") == {"claude-sonnet"}
    assert models("errors") == {"claude-sonnet"}
    assert models("status:5xx") == {"claude-sonnet"}
    assert models("incomplete") == {"qwen3"}
    assert models("client:cline") == {"claude-sonnet"}
    assert models("weather") == {"gpt-4o"}
    assert models("\"rate limits\"") == {"qwen3"}  # reasoning is searched too
    assert models("-provider:openai") == {"claude-sonnet", "qwen3"}
    assert models("since:2026-11-20T11:00Z until:2026-11-20T12:00:01Z") == {"gpt-4o"}


# Strings where case-insensitive matching is subtle: non-ASCII code points lowercasing to ASCII
# (İ, the Kelvin sign), ß, final sigma, LIKE's own wildcards and escape, regex syntax.
TRICKY_TEXTS = ["İstanbul", "the KELVIN sign \u212a", "Straße", "STRASSE", "ſtop", "ΣΑΣ", "σας", "a_b", "a%b",
                "back\\slash", "Rate Limit hit", "x.y", "[a]", "", "naïve", "NAÏVE", "emoji 😀 here",
                "line\nbreak", "Weather", "WEATHER", "wEaThEr", "50%", "(?i)", "A" * 300, "tab\there", None]
TRICKY_PATTERNS = ["weather", "WEATHER", "i", "k", "K", "I", "%", "_", "\\", "a_b", "50%", "ß", "ss", "İ",
                   "straße", "", "rate limit", "x.y", "[a]", "(?i)", "$", "ſ", "s", "σ", "Σ", "ï", "😀", "\n",
                   "a" * 64, "a" * 65, "a" * 300, "a" * 301, "\t", "-", "kelvin \u212a", "{1}", "^", "ǅ"]


def test_text_search_matches_exactly_what_ilike_matched() -> None:
    """The faster search clauses admit the same rows as `ILIKE '%text%' ESCAPE '\\'` did."""
    con = duckdb.connect()
    con.execute("CREATE TABLE calls (id INTEGER, content VARCHAR, reasoning VARCHAR)")
    for i, text in enumerate(TRICKY_TEXTS):
        con.execute("INSERT INTO calls VALUES (?, ?, NULL), (?, NULL, ?)", [2 * i, text, 2 * i + 1, text])
    schema = q.Schema(calls=frozenset({"id", "content", "reasoning"}))
    for pattern in TRICKY_PATTERNS:
        like = "%" + q._like_escape(pattern) + "%"
        old = {r[0] for r in con.execute("SELECT id FROM calls WHERE content ILIKE ? ESCAPE '\\' "
                                         "OR reasoning ILIKE ? ESCAPE '\\'", [like, like]).fetchall()}
        clause, params = q._text_clause(pattern, schema)
        new = {r[0] for r in con.execute(f"SELECT id FROM calls WHERE {clause}", params).fetchall()}
        assert new == old, pattern
        negated = {r[0] for r in con.execute(f"SELECT id FROM calls WHERE NOT COALESCE(({clause}), false)",
                                             params).fetchall()}
        assert negated == set(range(2 * len(TRICKY_TEXTS))) - old, pattern


def test_the_table_of_non_ascii_letters_lowering_to_ascii_is_duckdbs() -> None:
    """The RE2 classes add these code points to `i` and `k`; a DuckDB whose lower() maps more
    code points onto ASCII letters must fail here rather than make searches miss rows."""
    rows = duckdb.connect().execute(
        "SELECT lower(chr(i::INTEGER)), chr(i::INTEGER) FROM range(128, 1114112) t(i) "
        "WHERE (i < 55296 OR i > 57343) AND lower(chr(i::INTEGER)) < chr(128)").fetchall()
    found: dict[str, str] = {}
    for low, char in rows:
        found[low] = found.get(low, "") + char
    assert found == q.NON_ASCII_LOWERING_TO_ASCII


def test_cheap_filters_run_before_text_searches() -> None:
    flt = q.parse_filter('"rate limit" model:gpt* -weather status:5xx', SCHEMA)
    kinds = ["regexp_matches" in c for c in flt.clauses]
    assert kinds == [False, False, True, True]
    assert flt.params[:3] == ("gpt%",) * 3 and flt.params[3:5] == (500, 599)


# Where the matches of "needle" lie among 60 calls (0 oldest): one in the newest window of
# 3 calls, two in the next 9, the rest further back.
NEEDLES = {58, 55, 50, 40, 33, 20, 7, 2, 1}
WINDOWS = (3, 12)


def reader_with_needles(tmp_path: Path) -> DuckReader:
    reader = make_reader(tmp_path, [])
    for i in range(60):
        reader.insert(started_at=BASE_TIME + timedelta(seconds=i), reasoning=None,
                      content=f"a Needle {i}" if i in NEEDLES else f"hay {i}", status=503 if i % 4 == 0 else 200)
    return reader


def page_ids(page: q.Page) -> list[str]:
    return [str(row[page.columns.index("id")]) for row in page.rows]


def test_windowed_pages_return_exactly_what_one_query_did(tmp_path: Path) -> None:
    reader = reader_with_needles(tmp_path)
    schema = q.load_schema(reader)
    bounds = q.window_bounds(reader, WINDOWS)
    assert len(bounds) == 2
    for text in ["needle", "status:5xx", "", "-needle", "nothing-matches-this"]:
        flt = q.parse_filter(text, schema)
        cols, rows = reader.query(*q.page_sql(schema, flt, None, limit=1000))
        one_query = [str(r[cols.index("id")]) for r in rows]
        for limit in (1, 2, 4, 200):
            got: list[str] = []
            before: str | None = None
            while True:
                shown: list[str] = []
                page = q.load_page(reader, schema, flt, before, bounds, limit, offsets=WINDOWS,
                                   on_rows=lambda c, rs, shown=shown: shown.extend(str(r[c.index("id")]) for r in rs))
                assert page is not None
                ids = page_ids(page)
                assert len(ids) <= limit and ids[:len(shown)] == shown  # early rows are the page's first
                got += ids
                if page.exhausted:
                    break
                before = ids[-1]
            assert got == one_query, (text, limit)
    reader.close()


def test_a_search_spread_over_windows_reads_them_newest_first(tmp_path: Path) -> None:
    reader = reader_with_needles(tmp_path)
    schema = q.load_schema(reader)
    bounds = q.window_bounds(reader, WINDOWS)
    flt = q.parse_filter("needle", schema)
    shown: list[list[str]] = []
    page = q.load_page(reader, schema, flt, None, bounds, 4, offsets=WINDOWS,
                       on_rows=lambda c, rs: shown.append([str(r[c.index("id")]) for r in rs]))
    assert page is not None and page.windows == 3 and not page.exhausted
    assert [len(batch) for batch in shown] == [1, 2]  # the newest window's match first, then the next two
    contents = [reader.query("SELECT content FROM calls WHERE id = ?", [i])[1][0][0] for i in page_ids(page)]
    assert contents == ["a Needle 58", "a Needle 55", "a Needle 50", "a Needle 40"]
    reader.close()


def test_a_search_matching_nothing_reads_the_rest_in_one_query(tmp_path: Path) -> None:
    reader = reader_with_needles(tmp_path)
    schema = q.load_schema(reader)
    bounds = q.window_bounds(reader, WINDOWS)
    before = len(reader.queries)
    page = q.load_page(reader, schema, q.parse_filter("nothing-matches-this", schema), None, bounds, offsets=WINDOWS)
    assert page is not None and page.rows == [] and page.exhausted
    # The newest window, then all older calls (the empty search index is asked first).
    assert page.windows == 2 and len([sql for sql in reader.queries[before:] if "FROM calls" in sql]) == 2
    # A replaced filter stops between windows.
    assert q.load_page(reader, schema, q.parse_filter("needle", schema), None, bounds, 4, offsets=WINDOWS,
                       cancelled=lambda: True) is None
    reader.close()


# -- rendering ------------------------------------------------------------------------------------
def test_conversation_of_every_dialect() -> None:
    openai = render.conversation({"messages": [
        {"role": "system", "content": "be terse"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "function": {"name": "get", "arguments": "{\"a\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ], "tools": [{"type": "function", "function": {"name": "get"}}]})
    assert openai.system == ["be terse"]
    assert [t.role for t in openai.turns] == ["user", "assistant", "tool (c1)"]
    assert "[image]" in openai.turns[0].text and '"a": 1' in openai.turns[1].text
    assert len(openai.tools) == 1

    anthropic = render.conversation({"system": [{"type": "text", "text": "sys"}], "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm"},
                                          {"type": "tool_use", "name": "t", "input": {"x": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "u1", "content": "ok"}]},
    ]})
    assert anthropic.system == ["sys"]
    assert "hmm" in anthropic.turns[1].text and "→ t(" in anthropic.turns[1].text
    assert "ok" in anthropic.turns[2].text

    responses = render.conversation({"instructions": "inst", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hello"}]},
        {"type": "function_call", "name": "f", "arguments": "{}", "call_id": "k"},
        {"type": "function_call_output", "call_id": "k", "output": "done"},
    ]})
    assert responses.system == ["inst"] and [t.role for t in responses.turns] == ["user", "assistant", "tool (k)"]
    assert render.conversation({"input": "just text"}).turns[0].text == "just text"

    gemini = render.conversation({"systemInstruction": {"parts": [{"text": "gsys"}]}, "contents": [
        {"role": "user", "parts": [{"text": "gq"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "fc", "args": {"y": 2}}}]},
    ], "tools": [{"functionDeclarations": [{"name": "fc"}, {"name": "fd"}]}]})
    assert gemini.system == ["gsys"] and gemini.turns[1].role == "model" and len(gemini.tools) == 2

    ollama = render.conversation({"model": "qwen3", "messages": [
        {"role": "system", "content": "osys"}, {"role": "user", "content": "look", "images": ["aGk="]},
        {"role": "tool", "tool_name": "weather", "content": "sunny"}]}, "ollama.chat")
    assert ollama.system == ["osys"] and [t.text for t in ollama.turns] == ["look\n[image]", "sunny"]
    # The call's own dialect reads it: Gemini's answers by name, Anthropic's by id.
    gemini_result = render.conversation({"contents": [{"role": "user", "parts": [
        {"functionResponse": {"name": "fc", "response": {"ok": True}}}]}]}, "gemini.generate")
    assert gemini_result.turns[0].text.startswith("← fc:") and '"ok": true' in gemini_result.turns[0].text
    assert render.conversation("not an object").note
    assert render.conversation({"foo": 1}).note


def test_body_display_and_curl() -> None:
    text, note = render.body_for_display('{"a":1}', None)
    assert text == '{\n  "a": 1\n}' and note is None
    sse = "data: {\"x\": 1}\n\ndata: [DONE]\n\n"
    assert render.body_for_display(sse, None) == (sse, None)
    text, note = render.body_for_display("x" * 1000, None, limit=100)
    assert len(text) == 100 and note and "1,000 characters" in note
    text, note = render.body_for_display(None, b"\xff\xfe{bad")
    assert "ff fe 7b" in text and note and "not UTF-8" in note
    cmd = render.curl_command("POST", "https://api.openai.com/v1/chat/completions",
                              {"authorization": "Bearer sk-…REDACTED", "content-length": "9"}, "{\"it's\":1}")
    assert cmd.startswith("curl -X POST 'https://api.openai.com/v1/chat/completions'")
    assert "-H 'authorization: Bearer sk-…REDACTED'" in cmd and "content-length" not in cmd
    assert "--data-binary" in cmd and "it'\"'\"'s" in cmd
    raw = render.curl_command("POST", "http://x", {}, None, b"\xff")
    assert "base64 -d" in raw


# -- the app --------------------------------------------------------------------------------------
async def test_list_shows_calls_newest_first_with_markers(tmp_path: Path) -> None:
    reader = reader_with_rows(tmp_path)
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 3)
        t = table(app)
        rows = [[str(c) for c in t.get_row_at(i)] for i in range(3)]
        assert "qwen3 → qwen3:8b" in rows[0][2] and rows[0][4] == "200✂"  # cut stream
        assert rows[1][5] == "2↻" and rows[1][4] == "503"  # fallback at a glance
        assert rows[2][2] == "gpt-4o"
    reader.close()


async def test_filter_narrows_the_list_and_errors_inline(tmp_path: Path) -> None:
    reader = reader_with_rows(tmp_path)
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 3)
        await pilot.press("slash")
        assert isinstance(app.focused, Input)
        await pilot.press(*"model:claude*", "enter")
        await wait_for(pilot, lambda: table(app).row_count == 1, "the filter to narrow the list")
        assert app.focused is table(app)
        # A bad filter keeps the list and says why, under the bar.
        await pilot.press("slash", "ctrl+a", "ctrl+k", *"status:abc", "enter")
        error = app.calls.query_one("#filter-error", Static)
        await wait_for(pilot, lambda: bool(error.display), "the parse error")
        assert "status:abc" in static_text(error)
        assert table(app).row_count == 1
        # Nothing matches: the empty state says so.
        await pilot.press("ctrl+a", "ctrl+k", *"model:nothing*", "enter")
        empty = app.calls.query_one("#empty", Static)
        await wait_for(pilot, lambda: bool(empty.display) and "No call matches" in static_text(empty),
                       "the no-match message")
    reader.close()


async def test_enter_opens_detail_right_switches_tabs_escape_returns(tmp_path: Path) -> None:
    reader = reader_with_rows(tmp_path)
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 3)
        await pilot.press("down")  # the claude call with the fallback chain
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailScreen), "the detail screen")
        detail = app.screen
        assert isinstance(detail, DetailScreen)
        await wait_for(pilot, lambda: detail.record is not None, "the call to load")
        tabs = detail.query_one(TabbedContent)
        assert tabs.active == "conversation"
        await pilot.press("right")
        assert tabs.active == "reasoning"
        await pilot.press("right", "right")
        assert tabs.active == "attempts"
        attempts = detail.query_one("#attempts-table", DataTable)
        await wait_for(pilot, lambda: attempts.row_count == 2, "two attempts")
        assert "overloaded" in str(attempts.get_row_at(0)[6])
        await pilot.press("left")
        assert tabs.active == "response"
        # Copy as curl: redacted values stay redacted.
        await pilot.press("c")
        assert app.clipboard.startswith("curl -X POST 'http://127.0.0.1:8081/openai/chat/completions'")
        assert "REDACTED" in app.clipboard
        await pilot.press("escape")
        assert isinstance(app.screen, CallsScreen)
    reader.close()


async def test_conversation_tab_renders_turns_and_collapses_system(tmp_path: Path) -> None:
    reader = reader_with_rows(tmp_path, [{}])
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 1)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailScreen) and app.screen.record is not None,
                       "the call")
        screen = app.screen
        await wait_for(pilot, lambda: len(screen.query(".turn")) > 0, "turns")
        turns = [static_text(w) for w in screen.query(".turn").results(Static) if w.display]
        assert turns == ["Say hi", "hi"]  # the answer is the last turn
        system = screen.query_one("#system-prompt")
        assert system.collapsed  # type: ignore[attr-defined]
    reader.close()


async def test_empty_db_says_how_to_send_traffic(tmp_path: Path) -> None:
    reader = make_reader(tmp_path, [])
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 0)
        empty = app.calls.query_one("#empty", Static)
        assert empty.display
        text = static_text(empty)
        assert "llmtap run" in text and "llmtap env" in text
        await pilot.press("enter", "s")  # nothing to open; stats of nothing must not crash
        await pilot.pause()
    reader.close()


async def test_huge_and_non_utf8_bodies_render(tmp_path: Path) -> None:
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * 3_000_000}]})
    reader = reader_with_rows(tmp_path, [
        {"request_body": None, "request_body_raw": b"\xff\xfe\x00binary", "response_body": None,
         "response_body_raw": b"\x80\x81"},
        {"request_body": huge, "response_body": "data: " + "y" * 1_000_000},
    ])
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 2)
        for row in (0, 1):
            await pilot.press("home", *(["down"] * row), "enter")
            await wait_for(pilot, lambda: isinstance(app.screen, DetailScreen) and app.screen.record is not None,
                           "the call")
            screen = app.screen
            screen.query_one(TabbedContent).active = "raw"
            await pilot.pause()
            note = static_text(screen.query_one("#raw-request-note", Static))
            raw = screen.query_one("#raw-request", TextArea).text
            if row == 0:  # the huge one is newest
                assert "characters" in note and len(raw) <= render.BODY_DISPLAY_LIMIT
            else:
                assert "not UTF-8" in note and "ff fe 00" in raw
                conv = [static_text(w) for w in screen.query(".note").results(Static)]
                assert any("not UTF-8" in c for c in conv)
            await pilot.press("escape")
    reader.close()


async def test_call_without_reasoning_says_so(tmp_path: Path) -> None:
    reader = reader_with_rows(tmp_path, [{"reasoning": None, "reasoning_tokens": None}])
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 1)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailScreen) and app.screen.record is not None,
                       "the call")
        assert static_text(app.screen.query_one("#reasoning-text", Static)) == "no reasoning recorded"
    reader.close()


async def test_db_from_an_older_schema_opens(tmp_path: Path) -> None:
    """A DB lacking columns added by later migrations (and the attempts table): NULLs instead."""
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("""CREATE TABLE calls (id VARCHAR PRIMARY KEY, started_at TIMESTAMPTZ NOT NULL, client VARCHAR,
                   api VARCHAR, method VARCHAR, url VARCHAR, status INTEGER, model_requested VARCHAR,
                   provider VARCHAR, duration_ms DOUBLE, request_body VARCHAR, content VARCHAR)""")
    con.execute("INSERT INTO calls VALUES ('01AAAAAAAAAAAAAAAAAAAAAAAA', TIMESTAMPTZ '2026-11-01 10:00:00+00', "
                "'curl/8', 'openai.chat', 'POST', 'http://x/v1/chat/completions', 200, 'gpt-4o', 'openai', 12.5, "
                "'{\"messages\": [{\"role\": \"user\", \"content\": \"old\"}]}', 'answer')")
    con.close()
    reader = DuckReader(path, do_migrate=False)
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 1)
        await pilot.press("slash", *"weather fallbacks", "enter")  # filters over missing columns
        await wait_for(pilot, lambda: table(app).row_count == 0 and app.calls.pages_loaded > 1, "filtered list")
        await pilot.press("slash", "ctrl+a", "ctrl+k", "enter")
        await loaded(pilot, app, 1)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailScreen) and app.screen.record is not None,
                       "the call")
        assert static_text(app.screen.query_one("#response-text", Static)) == "answer"
        await pilot.press("escape", "s")
        await wait_for(pilot, lambda: isinstance(app.screen, StatsScreen)
                       and app.screen.query_one("#stats-table", DataTable).row_count == 1, "stats")
    reader.close()


async def test_help_lists_every_binding(tmp_path: Path) -> None:
    reader = make_reader(tmp_path, [])
    app = LlmtapApp(reader)
    app.update_keymap({"calls.stats": "S"})  # remapped keys show as remapped
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
        help_table = app.screen.query_one("#help-table", DataTable)
        rows = [[str(c) for c in help_table.get_row_at(i)] for i in range(help_table.row_count)]
        ids = {r[3] for r in rows}
        expected = {b.id for _, cls in HELP_SOURCES for b in cls.BINDINGS if b.id}  # type: ignore[union-attr]
        assert expected <= ids
        assert all(b.id for _, cls in HELP_SOURCES for b in cls.BINDINGS)  # type: ignore[union-attr]
        assert {"app.quit", "calls.open", "detail.copy_curl", "calls.export"} <= ids
        assert next(r for r in rows if r[3] == "calls.stats")[1] == "S"
        await pilot.press("escape")
        assert isinstance(app.screen, CallsScreen)
    reader.close()


async def test_live_rows_arrive_and_update(tmp_path: Path) -> None:
    reader = reader_with_rows(tmp_path, [{}])
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 1)
        call_id = reader.insert(status=None, duration_ms=None, content=None, reasoning=None,
                                model_requested="live-model", model_sent="live-model")
        reader.publish("started", call_id)
        await wait_for(pilot, lambda: table(app).row_count == 2, "the live row")
        assert first_key(app) == call_id
        assert str(table(app).get_row(call_id)[4]) == "…"
        # Open it while it streams: the detail grows from reader.partial().
        await pilot.press("home", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailScreen) and app.screen.record is not None,
                       "the live call")
        detail = app.screen
        reader.partials[call_id] = {"response_body": "data: {}\n\n", "reasoning": "thinking so far",
                                    "content": "partial answer", "tool_calls": None}
        reader.publish("progress", call_id)
        reasoning = detail.query_one("#reasoning-text", Static)
        await wait_for(pilot, lambda: static_text(reasoning) == "thinking so far", "the partial reasoning")
        reader.update(call_id, status=200, duration_ms=900.0, content="final answer", reasoning="all thought")
        reader.publish("finished", call_id)
        await wait_for(pilot, lambda: static_text(reasoning) == "all thought", "the finished call")
        await pilot.press("escape")
        await wait_for(pilot, lambda: str(table(app).get_row(call_id)[4]) == "200", "the finished row")
        # A call the filter does not admit stays out.
        await pilot.press("slash", *"model:live*", "enter")
        await wait_for(pilot, lambda: table(app).row_count == 1, "filtered")
        other = reader.insert(model_requested="gpt-4o")
        reader.publish("started", other)
        mine = reader.insert(model_requested="live-2")
        reader.publish("started", mine)
        await wait_for(pilot, lambda: table(app).row_count == 2, "the matching live row")
        assert first_key(app) == mine and other not in table(app).rows
    reader.close()


async def test_paging_loads_more_near_the_end(tmp_path: Path) -> None:
    reader = make_reader(tmp_path, [{} for _ in range(q.PAGE_SIZE * 2 + 10)])
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, q.PAGE_SIZE)
        await pilot.press("end")
        await wait_for(pilot, lambda: table(app).row_count == q.PAGE_SIZE * 2, "the second page")
        await pilot.press("end")
        await wait_for(pilot, lambda: table(app).row_count == q.PAGE_SIZE * 2 + 10, "the last page")
        keys = [str(k.value) for k in table(app).rows]
        assert keys == sorted(keys, reverse=True) and len(set(keys)) == len(keys)
    # Only narrow columns in the list queries: never a body.
    page_queries = [s for s in reader.queries if "ORDER BY id DESC" in s]
    assert page_queries and not any("request_body" in s or "response_body" in s for s in page_queries)
    reader.close()


async def test_windowed_search_in_the_ui_lists_every_match_in_order(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Small windows and pages, so that pages span windows; the list must end up as one query
    with the former ILIKE search would have listed it."""
    from llmtap.tui import app as app_module

    monkeypatch.setattr(q, "WINDOW_OFFSETS", WINDOWS)
    monkeypatch.setattr(q, "PAGE_SIZE", 4)
    monkeypatch.setattr(app_module, "LOAD_MORE_MARGIN", 1)  # the next page when the cursor is on the last row
    reader = reader_with_needles(tmp_path)
    _, rows = reader.query("SELECT id FROM calls WHERE content ILIKE '%needle%' ESCAPE '\\' "
                           "OR reasoning ILIKE '%needle%' ESCAPE '\\' ORDER BY id DESC")
    expected = [str(r[0]) for r in rows]
    assert len(expected) == len(NEEDLES)
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.calls
        await loaded(pilot, app, 4)
        await pilot.press("slash", *"NEEDLE", "enter")
        await wait_for(pilot, lambda: screen.pages_loaded > 1, "the search's first page")
        assert screen.last_page_windows > 1
        while not screen.exhausted:
            n = screen.pages_loaded
            await pilot.press("end")
            await wait_for(pilot, lambda n=n: screen.pages_loaded > n, "the next page")
        assert [str(k.value) for k in table(app).rows] == expected
        # And a search that matches nothing says so.
        await pilot.press("slash", "ctrl+a", "ctrl+k", *"no-such-text", "enter")
        empty = screen.query_one("#empty", Static)
        await wait_for(pilot, lambda: bool(empty.display) and "No call matches" in static_text(empty),
                       "the no-match message")
        assert screen.exhausted and table(app).row_count == 0
    assert any("id >= ?" in sql for sql in reader.queries)  # it did search by windows
    reader.close()


async def test_a_slow_search_says_it_is_searching(tmp_path: Path) -> None:
    reader = reader_with_rows(tmp_path)
    release = threading.Event()
    query = reader.query

    def slow_search(sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]:
        if "regexp_matches" in sql:
            release.wait(20)
        return query(sql, params)

    reader.query = slow_search  # type: ignore[method-assign]
    app = LlmtapApp(reader)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app, 3)
            assert app.calls.apply_filter("weather")
            empty = app.calls.query_one("#empty", Static)
            await wait_for(pilot, lambda: bool(empty.display) and static_text(empty) == "Searching…", "the hint")
            release.set()
            await wait_for(pilot, lambda: table(app).row_count == 1 and not empty.display, "the search's result")
    finally:
        release.set()
        reader.close()


async def test_a_busy_live_list_holds_only_the_newest_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmtap.tui import app as app_module

    monkeypatch.setattr(app_module, "LIVE_MAX_ROWS", 6)
    monkeypatch.setattr(app_module, "LIVE_KEEP_ROWS", 3)
    monkeypatch.setattr(app_module, "LOAD_MORE_MARGIN", 1)  # else 3 rows would page the rest in at once
    reader = make_reader(tmp_path, [{} for _ in range(2)])
    # Events of the past (before the UI opened) are not replayed to it.
    old_ids = [str(r[0]) for r in reader.query("SELECT id FROM calls")[1]]
    for call_id in old_ids:
        reader.publish("finished", call_id)
    fetched: list[Any] = []  # the parameters of every live fetch
    query = reader.query

    def recording_query(sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]:
        if "id IN (" in sql:
            fetched.extend(params or [])
        return query(sql, params)

    reader.query = recording_query  # type: ignore[method-assign]
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 2)
        for i in range(5):
            call_id = reader.insert(started_at=BASE_TIME + timedelta(minutes=1, seconds=i), model_requested=f"live-{i}")
            reader.publish("started", call_id)
        await wait_for(pilot, lambda: table(app).row_count == 3, "the list cut back to the newest rows")
        _, rows = reader.query("SELECT id FROM calls ORDER BY id DESC")
        everything = [str(r[0]) for r in rows]
        assert [str(k.value) for k in table(app).rows] == everything[:3]
        assert app.calls.oldest_id == everything[2] and not app.calls.exhausted
        # Scrolling brings the older calls back, in order.
        await pilot.press("end")
        await wait_for(pilot, lambda: table(app).row_count == 7, "the older calls paged in again")
        assert [str(k.value) for k in table(app).rows] == everything
    assert len(fetched) == 5 and not set(old_ids) & set(fetched)
    reader.close()


async def test_live_rows_wait_while_the_user_reads_below_a_full_list(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from llmtap.tui import app as app_module

    monkeypatch.setattr(app_module, "LIVE_MAX_ROWS", 4)
    reader = make_reader(tmp_path, [{} for _ in range(4)])
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 4)
        await pilot.press("down", "down")
        new_ids = []
        for i in range(3):
            new_ids.append(reader.insert(started_at=BASE_TIME + timedelta(minutes=1, seconds=i),
                                         model_requested=f"live-{i}"))
            reader.publish("started", new_ids[-1])
        await wait_for(pilot, lambda: app.calls.held_back == 3, "the live rows held back")
        assert table(app).row_count == 4 and not set(new_ids) & {str(k.value) for k in table(app).rows}
        await pilot.press("home")
        await wait_for(pilot, lambda: table(app).row_count == 7, "the list reloaded from the top")
        assert first_key(app) == new_ids[-1] and app.calls.held_back == 0
    reader.close()


async def test_stats_screen(tmp_path: Path) -> None:
    reader = reader_with_rows(tmp_path)
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 3)
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, StatsScreen)
                       and app.screen.query_one("#stats-table", DataTable).row_count == 3, "stats rows")
        rows = {str(r[0]): [str(c) for c in r] for r in
                (app.screen.query_one("#stats-table", DataTable).get_row_at(i) for i in range(3))}
        assert rows["claude-sonnet-4"][3] == "100.0" and rows["claude-sonnet-4"][4] == "100.0"
        await pilot.press("escape")
        assert isinstance(app.screen, CallsScreen)
    reader.close()


async def test_export_current_filter_to_parquet(tmp_path: Path) -> None:
    reader = reader_with_rows(tmp_path)
    app = LlmtapApp(reader)
    out = tmp_path / "out.parquet"
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 3)
        await pilot.press("slash", *"provider:o*", "enter")
        await wait_for(pilot, lambda: table(app).row_count == 2, "filtered")
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, ExportScreen), "the export prompt")
        path_input = app.screen.query_one("#export-path", Input)
        assert path_input.value.endswith(".parquet") and "llmtap-export-" in path_input.value
        path_input.value = str(out)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, CallsScreen), "the export to finish")
    assert duckdb.sql(f"SELECT count(*) FROM '{out}'").fetchall() == [(2,)]
    reader.close()


# -- with the proxy in the same loop ----------------------------------------------------------------
def _busy_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


async def test_proxy_startup_error_exits_with_code_2(confdir: Path) -> None:
    from llmtap.addons.runner import Proxy, RunConfig
    from llmtap.recorder.record import MemorySink

    sock, port = _busy_port()
    config = RunConfig(proxy=("127.0.0.1", port), gateway=None, confdir=confdir)
    app = LlmtapApp(None, proxy_factory=lambda: Proxy(config, MemorySink()))
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.return_code is not None, "the app to exit", timeout=30)
    finally:
        sock.close()
    assert app.return_code == 2
    assert app.startup_error and f"{port}" in app.startup_error and "--proxy" in app.startup_error


async def test_proxy_runs_in_the_ui_loop_and_quit_stops_it(confdir: Path) -> None:
    from llmtap.addons.runner import Proxy, RunConfig
    from llmtap.recorder.record import MemorySink

    config = RunConfig(proxy=None, gateway=("127.0.0.1", 0), confdir=confdir)
    app = LlmtapApp(None, proxy_factory=lambda: Proxy(config, MemorySink()), note="not recording")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.proxy is not None, "the proxy to start", timeout=30)
        port = app.proxy.gateway_addr[1]
        assert "gateway" in app.sub_title
        empty = app.calls.query_one("#empty", Static)
        assert "Not recording" in static_text(empty)
        # The gateway answers while the UI runs (an unknown provider path: llmtap's own 4xx/5xx).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.read(12), 30)
        writer.close()
        assert head.startswith(b"HTTP/1.1 ")
        await pilot.press("q")
        await wait_for(pilot, lambda: app.return_code is not None, "quit")
    assert app.return_code == 0 and app.proxy is None
    with pytest.raises(OSError):  # the listener is closed
        await asyncio.open_connection("127.0.0.1", port)


# -- layout ---------------------------------------------------------------------------------------
def test_list_layout_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, snap_compare: Any) -> None:
    """The call list as drawn (SVG snapshot; update with `pytest --snapshot-update`)."""
    import time as _time

    monkeypatch.setenv("TZ", "UTC")  # the time column shows local time
    _time.tzset()
    reader = reader_with_rows(tmp_path)
    app = LlmtapApp(reader, source="snapshot.duckdb")

    async def until_loaded(pilot: Pilot[Any]) -> None:
        await loaded(pilot, app, 3)

    try:
        assert snap_compare(app, terminal_size=SIZE, run_before=until_loaded)
    finally:
        reader.close()
        monkeypatch.delenv("TZ")
        _time.tzset()


def test_query_and_render_import_without_textual() -> None:
    """The SQL and rendering helpers stay headless: usable by scripts and other areas."""
    import subprocess
    import sys

    code = "import sys, llmtap.tui.query, llmtap.tui.render; sys.exit('textual' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- against the recorder's real readers (skipped until llmtap.recorder.reader exists) ---------------
def test_cli_tui_on_an_unreadable_db_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("llmtap.recorder.reader")
    from llmtap.cli import main

    bad = tmp_path / "not-a-db.duckdb"
    bad.write_bytes(b"this is not a DuckDB file" * 100)
    assert main(["tui", "--db", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmtap: ") and "Conflicting lock" not in err


async def test_attach_to_a_running_recorder_and_see_calls_live(tmp_path: Path) -> None:
    """A recorder holds the file (as `llmtap run` does); the UI attaches through open_reader."""
    reader_mod = pytest.importorskip("llmtap.recorder.reader")
    recorder_mod = pytest.importorskip("llmtap.recorder.recorder")
    from llmtap.recorder.record import Call, new_id, utcnow

    db = tmp_path / "live.duckdb"
    recorder = recorder_mod.Recorder(db)
    recorder.start()
    try:
        reader = reader_mod.open_reader(db)
        assert reader.kind == "remote"
        app = LlmtapApp(reader)
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app, 0)
            call = Call(id=new_id(), started_at=utcnow(), method="POST", url="http://127.0.0.1:8081/openai/chat/completions",
                        api="openai.chat", model_requested="attach-model", model_sent="attach-model", provider="openai",
                        request_body=b'{"model": "attach-model", "messages": [{"role": "user", "content": "hi"}]}')
            recorder.call_started(call)
            await wait_for(pilot, lambda: call.id in table(app).rows, "the started call", timeout=20)
            call.status, call.duration_ms, call.ttfb_ms, call.attempts = 200, 12.0, 5.0, 1
            call.response_body = b'{"choices": [{"message": {"role": "assistant", "content": "hello"}}]}'
            recorder.call_finished(call, [])
            await wait_for(pilot, lambda: str(table(app).get_row(call.id)[4]) == "200", "the finished call", timeout=20)
        reader.close()
    finally:
        recorder.close()


# -- what a new user runs into --------------------------------------------------------------------
async def open_detail(pilot: Pilot[Any], app: LlmtapApp) -> DetailScreen:
    await pilot.press("enter")
    await wait_for(pilot, lambda: isinstance(app.screen, DetailScreen) and app.screen.record is not None,
                   "the call")
    screen = app.screen
    assert isinstance(screen, DetailScreen)
    return screen


async def test_vim_keys_move_in_the_list_but_type_in_the_filter(tmp_path: Path) -> None:
    reader = make_reader(tmp_path, [{} for _ in range(5)])
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 5)
        t = table(app)
        await pilot.press("j", "j")
        assert t.cursor_row == 2
        await pilot.press("k")
        assert t.cursor_row == 1
        await pilot.press("G")
        assert t.cursor_row == 4
        await pilot.press("g")
        assert t.cursor_row == 0
        await pilot.press("slash", *"jkgG")
        assert app.calls.query_one("#filter", Input).value == "jkgG" and t.cursor_row == 0
        await pilot.press("escape", "question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
        help_table = app.screen.query_one("#help-table", DataTable)
        keys = {(str(help_table.get_row_at(i)[0]), str(help_table.get_row_at(i)[1]))
                for i in range(help_table.row_count)}
        assert {("list", "j"), ("list", "k"), ("list", "home, g"), ("list", "end, G"),
                ("call", "j, ↓"), ("call", "g, home")} <= keys, keys
    reader.close()


async def test_vim_keys_scroll_the_detail_tabs(tmp_path: Path) -> None:
    long = "\n".join(f"line {i}" for i in range(300))
    reader = reader_with_rows(tmp_path, [{"content": long, "reasoning": long}])
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 1)
        screen = await open_detail(pilot, app)
        for tab in ("reasoning", "response"):
            screen.query_one(TabbedContent).active = tab
            await pilot.pause()
            scroller = screen.query_one(f"#{tab}").query_one(VerticalScroll)
            await wait_for(pilot, lambda scroller=scroller: scroller.max_scroll_y > 0, "a scrollable tab")
            await pilot.press("j", "j", "j")
            assert scroller.scroll_y == 3
            await pilot.press("k")
            assert scroller.scroll_y == 2
            await pilot.press("G")
            assert scroller.scroll_y == scroller.max_scroll_y
            await pilot.press("g")
            assert scroller.scroll_y == 0
            await pilot.press("pagedown")
            assert scroller.scroll_y > 3
    reader.close()


async def test_detail_header_labels_the_token_counts(tmp_path: Path) -> None:
    reader = reader_with_rows(tmp_path, [{"input_tokens": 12, "output_tokens": 19, "reasoning_tokens": None}])
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 1)
        screen = await open_detail(pilot, app)
        assert "tokens in 12 · out 19 · reasoning -" in static_text(screen.query_one("#summary", Static))
    reader.close()


async def test_export_path_is_edited_not_replaced_by_typing(tmp_path: Path) -> None:
    reader = reader_with_rows(tmp_path)
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 3)
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, ExportScreen), "the export prompt")
        path_input = app.screen.query_one("#export-path", Input)
        default = path_input.value
        assert default.endswith(".parquet")
        await pilot.press("e")  # the impatient second press
        assert path_input.value == default + "e"
        await pilot.press("backspace")
        assert path_input.value == default
        # ctrl+u clears it for a path of one's own.
        await pilot.press("ctrl+u", *str(tmp_path / "mine.parquet"), "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, CallsScreen), "the export to finish")
    assert duckdb.sql(f"SELECT count(*) FROM '{tmp_path / 'mine.parquet'}'").fetchall() == [(3,)]
    reader.close()


async def test_conversation_ends_with_the_answer_and_its_tool_calls(tmp_path: Path) -> None:
    reader = reader_with_rows(tmp_path, [
        {"content": "Checking the weather.", "reasoning": "The user wants the weather in Paris.",
         "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}]},
    ])
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 1)
        screen = await open_detail(pilot, app)
        assert screen.query_one(TabbedContent).active == "conversation"
        await wait_for(pilot, lambda: "Checking" in static_text(screen.query_one("#answer-text", Static)), "answer")
        body = screen.query_one("#conversation-body", VerticalScroll)
        shown = [w for w in body.children if w.display]
        # The request's turns, then the answer: role, folded reasoning, text, tool calls.
        roles = [static_text(w) for w in shown if w.has_class("role")]
        assert roles == ["user", "assistant (answer)"]
        reasoning = screen.query_one("#answer-reasoning")
        assert reasoning.collapsed and "reasoning (36 chars)" in str(reasoning.title)  # type: ignore[attr-defined]
        assert shown[-1].id == "answer-tools"
        tools = static_text(screen.query_one("#answer-tools", Static))
        assert "→ get_weather  (call_1)" in tools and '"city": "Paris"' in tools
    reader.close()


async def test_run_tui_with_no_calls_says_where_its_proxy_listens(tmp_path: Path, confdir: Path) -> None:
    """`llmtap run --tui --proxy 127.0.0.1:0 --gateway 127.0.0.1:0` on an empty DB."""
    import re

    from llmtap.addons.runner import Proxy, RunConfig
    from llmtap.recorder.record import MemorySink
    from llmtap.tui.app import Listening

    reader = make_reader(tmp_path, [])
    config = RunConfig(proxy=("127.0.0.1", 0), gateway=("127.0.0.1", 0), confdir=confdir)
    app = LlmtapApp(reader, proxy_factory=lambda: Proxy(config, MemorySink()),
                    listening=Listening(config.proxy, config.gateway, config.confdir))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.proxy is not None, "the proxy to start", timeout=30)
        await loaded(pilot, app, 0)
        proxy_port, gateway_port = app.proxy.proxy_addr[1], app.proxy.gateway_addr[1]
        empty = app.calls.query_one("#empty", Static)
        await wait_for(pilot, lambda: f":{gateway_port}/openai" in static_text(empty), "the gateway's address")
        text = static_text(empty)
        assert "proxy is running" in text and "Start the proxy" not in text and ":8081" not in text
        assert f"http://127.0.0.1:{proxy_port}" in text
        assert f'eval "$(llmtap env --proxy 127.0.0.1:{proxy_port} --confdir {confdir})"' in text
        # The base URL it names is where the gateway answers.
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/openai", text).group(1))  # type: ignore[union-attr]
        conn_reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(conn_reader.read(12), 30)).startswith(b"HTTP/1.1 ")
        writer.close()
        await pilot.press("q")
        await wait_for(pilot, lambda: app.return_code is not None, "quit")
    reader.close()


async def test_an_attached_ui_says_when_the_proxy_has_stopped(tmp_path: Path) -> None:
    """`llmtap tui` attached to the recorder process of a `llmtap run`, which stops (as when
    the proxy is stopped), then runs again."""
    from llmtap.recorder import reader as reader_mod
    from llmtap.recorder.process import RecorderProcess
    from llmtap.recorder.record import Call, new_id, utcnow

    db = tmp_path / "live.duckdb"
    recorder = RecorderProcess(db)
    recorder.start()
    second = None
    try:
        reader = reader_mod.open_reader(db)
        app = LlmtapApp(reader, source=str(db))
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app, 0)
            assert app.sub_title == f"{db}  (live, attached to llmtap run)"
            recorder.close()
            await wait_for(pilot, lambda: "stopped" in app.sub_title, "the title to say the proxy stopped", timeout=20)
            assert "live, attached" not in app.sub_title and str(db) in app.sub_title
            # Started again (a new endpoint): the UI follows it and is live once more.
            second = RecorderProcess(db)
            second.start()
            await wait_for(pilot, lambda: "live, attached" in app.sub_title, "live again", timeout=20)
            call = Call(id=new_id(), started_at=utcnow(), method="POST", url="http://127.0.0.1:8081/openai/chat/completions",
                        api="openai.chat", model_requested="again", model_sent="again", provider="openai",
                        request_body=b'{"model": "again", "messages": []}')
            second.call_started(call)
            await wait_for(pilot, lambda: call.id in table(app).rows, "a call on the new endpoint", timeout=20)
        reader.close()
    finally:
        recorder.close()
        if second is not None:
            second.close()


def toasts(app: LlmtapApp) -> list[str]:
    return [str(n.message) for n in app._notifications]


@pytest.mark.parametrize("tmux", [False, True])
async def test_copy_as_curl_says_where_it_went_and_writes_a_private_file(
        tmp_path: Path, _private_cache: Path, monkeypatch: pytest.MonkeyPatch, tmux: bool) -> None:
    import stat

    if tmux:
        monkeypatch.setenv("TMUX", "/tmp/tmux-1000/default,1234,0")
    reader = reader_with_rows(tmp_path, [{"request_headers": {"authorization": "Bearer sk-…3f9a",
                                                              "x-api-key": "sk-ant-…77aa",
                                                              "content-type": "application/json"}}])
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 1)
        screen = await open_detail(pilot, app)
        await pilot.press("c")
        path = _private_cache / "llmtap" / "curl" / f"{screen.call_id}.sh"
        assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        written = path.read_text()
        assert app.clipboard in written and written.count("curl -X POST") == 1
        assert "-H 'authorization: Bearer sk-…3f9a'" in written and "-H 'x-api-key: sk-ant-…77aa'" in written
        message = toasts(app)[-1]
        assert str(path) in message and "put yours back in" in message
        assert ("set-clipboard on" in message) == tmux
        # The text runs as a shell script: the comment line does not break it.
        assert written.splitlines()[0].startswith("# ")
    reader.close()


async def test_copy_as_curl_does_not_follow_a_planted_symlink(tmp_path: Path, _private_cache: Path) -> None:
    reader = reader_with_rows(tmp_path, [{}])
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 1)
        screen = await open_detail(pilot, app)
        folder = _private_cache / "llmtap" / "curl"
        folder.mkdir(parents=True)
        (folder / f"{screen.call_id}.sh").symlink_to(victim)
        await pilot.press("c")
        assert victim.read_text() == "keep me"
        assert "clipboard only" in toasts(app)[-1]
    reader.close()


async def test_stats_chart_calls_errors_and_p95_over_the_filtered_range(tmp_path: Path) -> None:
    # Three hours of openai calls: errors in the second hour, slow calls in the third; and an
    # anthropic call two days later, which the filter leaves out (else the range would be days).
    rows: list[dict[str, Any]] = []
    for minute in range(0, 180, 2):
        rows.append({"started_at": BASE_TIME + timedelta(minutes=minute), "provider": "openai",
                     "status": 500 if 60 <= minute < 120 else 200,
                     "duration_ms": 9000.0 if minute >= 120 else 300.0})
    rows.append({"started_at": BASE_TIME + timedelta(days=2), "provider": "anthropic"})
    reader = reader_with_rows(tmp_path, rows)
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("slash", *"provider:openai", "enter")
        await wait_for(pilot, lambda: table(app).row_count == 90, "the filter")
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, StatsScreen) and app.screen.activity is not None,
                       "the charts")
        screen = app.screen
        assert isinstance(screen, StatsScreen)
        activity = screen.activity
        assert activity is not None and activity.label == "5 min" and len(activity.calls) == 36
        calls = screen.query_one("#calls-chart").data  # type: ignore[attr-defined]
        errors = screen.query_one("#errors-chart").data  # type: ignore[attr-defined]
        p95 = screen.query_one("#p95-chart").data  # type: ignore[attr-defined]
        assert sum(calls) == 90 and set(calls) <= {2, 3}
        assert errors == [0] * 12 + [c for c in calls[12:24]] + [0] * 12
        assert p95[:24] == [300.0] * 24 and p95[24:] == [9000.0] * 12
        labels = " | ".join(static_text(w) for w in screen.query(Label).results(Label))
        assert "per 5 min, " in labels and "calls: 90" in labels and "errors: 30 (33.3%)" in labels
        assert "p95 duration: 300ms … 9000ms" in labels
        app.save_screenshot(str(tmp_path / "stats.svg"))
    reader.close()


@pytest.mark.parametrize("span_ms, label, buckets", [
    (0, "1 s", 1), (59_000, "1 s", 60), (60_000, "5 s", 13), (3 * 3600_000, "5 min", 37),
    (400 * 86400_000, "1 week", 58), (100 * 365 * 86400_000, "1 year", 101),
])
def test_stats_buckets_follow_the_time_range(span_ms: int, label: str, buckets: int) -> None:
    first = int(BASE_TIME.timestamp() * 1000) + 1234
    start, width, got = q.pick_bucket(first, first + span_ms)
    assert got == label and start <= first and start % width == 0
    assert (first + span_ms - start) // width + 1 == buckets


async def test_curl_of_a_call_recorded_through_the_proxy_carries_no_key(tmp_path: Path, confdir: Path,
                                                                         _private_cache: Path) -> None:
    """A real SDK call with its key in a header and in the query string, through the real
    proxy into a real DB: the curl the UI hands out holds fingerprints only, and the
    Conversation tab ends with the provider's answer."""
    import openai

    from fakeprovider import FakeProvider
    from llmtap.recorder.recorder import Recorder
    from proxyharness import RunningProxy

    key = "sk-proj-PLANTED-curl-0123456789abcdef"
    db = tmp_path / "llmtap.duckdb"
    with FakeProvider() as fake:
        rules = tmp_path / "rules.yaml"
        rules.write_text(f'providers:\n  o1: {{base_url: "{fake.url}/v1", api: openai}}\n')
        recorder = Recorder(db)
        recorder.start()
        try:
            with RunningProxy(rules, confdir, sink=recorder) as proxy:
                client = openai.OpenAI(base_url=f"{proxy.gateway_url}/o1", api_key=key, max_retries=0,
                                       default_headers={"x-api-key": key}, default_query={"key": key})
                client.chat.completions.create(model="o-mini", messages=[{"role": "user", "content": "hello"}])
        finally:
            recorder.close()
        reply = fake.reply_text
    reader = DuckReader(db)
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 1)
        screen = await open_detail(pilot, app)
        await wait_for(pilot, lambda: reply in static_text(screen.query_one("#answer-text", Static)), "the answer")
        await pilot.press("c")
        written = (_private_cache / "llmtap" / "curl" / f"{screen.call_id}.sh").read_text()
    reader.close()
    for text in (app.clipboard, written):
        assert key not in text and "PLANTED" not in text
        assert "-H 'authorization: Bearer sk-proj-…" in text and "-H 'x-api-key: sk-proj-…" in text
        assert "key=sk-proj-…" in text and "/chat/completions" in text


async def test_escape_sequences_from_the_network_never_reach_the_terminal(tmp_path: Path) -> None:
    # What a hostile upstream (or client) would plant: a clipboard write (OSC 52), a screen
    # clear, a window title, a colour; each must show as visible text, never act.
    hostile = "\x1b]52;c;ZXZpbA==\x07\x1b[2J\x1b]0;owned\x07\x1b[31m"
    reader = reader_with_rows(tmp_path, [{"client": f"agent{hostile}/1", "model_requested": f"gpt{hostile}",
                                          "content": f"answer{hostile}", "reasoning": f"think{hostile}",
                                          "error": f"boom{hostile}"}])
    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, 1)
        cells = [str(c) for c in table(app).get_row_at(0)]
        assert not any("\x1b" in c or "\x07" in c for c in cells), cells
        assert any("agent\\x1b]52" in c for c in cells)
        screen = await open_detail(pilot, app)
        await pilot.pause(0.1)
        shown = [static_text(w) for w in screen.query(Static)]
        assert any("answer\\x1b" in s for s in shown) and any("think\\x1b" in s for s in shown)
        assert not any("\x1b" in s or "\x07" in s for s in shown)
    reader.close()


# What each dialect sends, with the user's words where that dialect puts them.
def _prompt_bodies(words: str) -> dict[str, dict[str, Any]]:
    return {
        "openai.chat": {"model": "gpt-4o", "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": f"Why do we keep hitting {words}?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]}]},
        "anthropic.messages": {"model": "claude-sonnet-4-5", "max_tokens": 100,
                               "system": [{"type": "text", "text": f"Always respect {words}."}],
                               "messages": [{"role": "user", "content": "Plan the crawl."}]},
        "gemini.generate": {"contents": [{"role": "user", "parts": [{"text": f"Explain {words} to me"}]}]},
        "openai.responses": {"model": "gpt-5", "instructions": "Be brief.",
                             "input": [{"role": "user", "content": [{"type": "input_text", "text": f"About {words}"}]}]},
        "ollama.chat": {"model": "qwen3", "messages": [{"role": "user", "content": f"What are {words}?"}]},
    }


async def test_a_search_finds_a_call_by_what_its_prompt_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`/rate limits` lists the calls whose prompt (not answer) said it, in any dialect, and the
    search index still rules out the chunks of calls that did not."""
    from llmtap.recorder import search_index
    from llmtap.recorder.record import Attempt, Call, new_id, utcnow
    from llmtap.recorder.recorder import Recorder

    monkeypatch.setattr(search_index, "CHUNK_CALLS", 4)
    monkeypatch.setattr(search_index, "MAX_LEVEL", 0)  # four chunks stay four: each can be ruled out
    db = tmp_path / "calls.duckdb"
    rec = Recorder(db, flush_interval_s=0.02, serve=False)
    rec.start()
    ids: list[str] = []
    # Chunk by chunk: the words in a prompt, in chunks 0 and 2; the chunks between hold only
    # one of the two words each, which the index must tell apart from both.
    plan = [["moles", "voles", "rate limits", "moles"],
            ["rate", "rate", "voles", "moles"],
            ["moles", "moles", "voles", "rate limits"],
            ["limits", "limits", "voles", "moles"]]
    apis = list(_prompt_bodies("").keys())
    try:
        for chunk in plan:
            for words in chunk:
                api = apis[len(ids) % len(apis)]
                c = Call(id=new_id(), started_at=utcnow(), method="POST", url="http://127.0.0.1:1/v1/x", api=api,
                         client="t", model_requested="m", stream=False, request_headers={},
                         request_body=json.dumps(_prompt_bodies(words)[api]).encode())
                c.status, c.duration_ms, c.response_headers = 200, 5.0, {"content-type": "application/json"}
                c.response_body = b'{"answer": "fine"}'
                rec.call_finished(c, [Attempt(c.id, 1, "p", c.url, "m", utcnow(), 200, None, 5.0)])
                ids.append(c.id)
        deadline = asyncio.get_running_loop().time() + 30
        while rec.index is None or rec.index.covered_to != ids[-1]:
            assert asyncio.get_running_loop().time() < deadline, "the recorder indexes the four chunks"
            await asyncio.sleep(0.02)
    finally:
        rec.close()
    reader = DuckReader(db)
    expected = [ids[11], ids[2]]  # newest first
    schema = q.load_schema(reader)
    clause = q.index_clause(reader, schema, q.parse_filter("rate limits", schema))
    assert clause is not None
    read = {str(r[0]) for r in reader.query(f"SELECT id FROM calls WHERE {clause[0]}", clause[1])[1]}
    assert read == {*ids[0:4], *ids[8:12]}  # chunks 0 and 2 only
    app = LlmtapApp(reader)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app, 16)
            await pilot.press("slash", *"rate limits", "enter")
            await wait_for(pilot, lambda: [str(k.value) for k in table(app).rows] == expected,
                           "the two calls whose prompt says rate limits")
            assert app.calls.exhausted
    finally:
        reader.close()


async def test_stats_command_and_stats_screen_give_the_same_numbers_for_the_same_filter(tmp_path: Path) -> None:
    """`llmtap stats --json` with flags and the UI's stats screen with the same filter typed
    in: one computation, so every number agrees, including the cases the two once counted
    differently (a finished call that never got a status is an error; NULL tokens sum to 0)."""
    import subprocess
    import sys

    hour = timedelta(hours=1)
    rows: list[dict[str, Any]] = [
        {},  # gpt-4o, 200
        {"status": 500, "error": "upstream said 500", "ttfb_ms": 80.0, "duration_ms": 90.0},
        {"status": None, "duration_ms": 3000.0, "ttfb_ms": None, "input_tokens": None},  # no answer ever came
        {"status": None, "duration_ms": None, "ttfb_ms": None, "complete": None},  # still in progress
        {"model_requested": "GPT-4o-mini", "model_sent": "gpt-4o-mini", "provider": "openrouter",
         "attempts": 2, "ttfb_ms": 300.0, "duration_ms": 900.0, "input_tokens": None, "output_tokens": None},
        {"model_requested": "gpt-4o-mini", "model_sent": "gpt-4o-mini", "provider": "openrouter",
         "ttfb_ms": 50.0, "duration_ms": 200.0, "input_tokens": 1000, "output_tokens": 333},
        {"model_requested": "fast", "model_sent": "gpt-4o", "provider": "azure", "ttfb_ms": 77.0},
        {"model_requested": "x", "model_sent": "y", "model_reported": "gpt-4o-2024-08-06", "provider": "other"},
        {"model_requested": "claude-sonnet-4", "model_sent": "claude-sonnet-4", "model_reported": None,
         "provider": "anthropic"},  # the model filter leaves it out
        {"started_at": BASE_TIME - 3 * hour},  # before --since
        {"started_at": BASE_TIME + 3 * hour, "status": 503},  # after --until
    ]
    reader = reader_with_rows(tmp_path, rows)
    db = reader.path
    reader.close()  # the command opens the file itself, read-only
    since, until = (BASE_TIME - hour).isoformat(), (BASE_TIME + hour).isoformat()
    done = subprocess.run([sys.executable, "-m", "llmtap", "stats", "--db", str(db), "--json",
                           "--since", since, "--until", until, "--model", "gpt-4o*"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    cli = json.loads(done.stdout)
    assert sum(r["calls"] for r in cli) == 8

    reader = DuckReader(db)
    flt_text = f"model:gpt-4o* since:{since} until:{until}"
    schema = q.load_schema(reader)
    assert q.stats(reader, schema, q.parse_filter(flt_text, schema)) == cli
    openai = next(r for r in cli if r["provider"] == "openai")
    assert (openai["calls"], openai["errors"], openai["input_tokens"]) == (4, 2, 36)

    app = LlmtapApp(reader)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("slash", *flt_text, "enter")
        await wait_for(pilot, lambda: table(app).row_count == 8, "the filter to narrow the list")
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, StatsScreen)
                       and app.screen.query_one("#stats-table", DataTable).row_count == len(cli), "stats rows")
        grid = app.screen.query_one("#stats-table", DataTable)
        shown = [[str(c) for c in grid.get_row_at(i)] for i in range(len(cli))]
    reader.close()
    expected = [[r["model"], r["provider"], str(r["calls"]), f"{100 * r['error_rate']:.1f}",
                 f"{100 * r['fallback_rate']:.1f}", render.fmt_tokens(r["input_tokens"]),
                 render.fmt_tokens(r["output_tokens"]), render.fmt_tokens(r["reasoning_tokens"]),
                 *(render.fmt_ms(r[f"{k}_{p}"]) for k in ("ttfb", "duration") for p in ("p50", "p95", "p99"))]
                for r in cli]
    assert shown == expected
