"""`llmtap tui`, and the log handler of `llmtap run --tui` (wired in llmtap.compose)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from llmtap import paths


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add this area's subcommands; each sets `func` to a callable(args) -> exit code."""
    tui = sub.add_parser(
        "tui",
        help="browse recorded calls in a terminal UI (live while `llmtap run` records)",
        description="Browse the calls in the DuckDB file: filter, open a call's conversation, "
        "reasoning, response, fallback attempts and raw bodies, see per-model stats, export to "
        "Parquet. When a running `llmtap run` holds the file, the UI attaches to it and "
        "updates live. Press ? inside for every key.",
        epilog="filter examples:  model:gpt-4o*  provider:openrouter status:5xx  fallbacks since:2h  "
        "\"rate limit\" (free text: searches what was sent -- system prompt and messages -- and "
        "the answers and reasoning)",
    )
    tui.add_argument("--db", metavar="PATH", type=Path, default=None,
                     help=f"DuckDB file to read (default: {paths.default_db()})")
    tui.set_defaults(func=cmd_tui)


# DuckDB keeps what it read cached up to its limit, 80% of RAM by default: a few searches
# over a year of bodies would leave the UI holding over 600 MB. With this bound it stays under
# 300 MB on a million calls; a search that reads every body (common words, rare text) is then
# ~1.6x slower.
UI_MEMORY_LIMIT = "192MB"


def cmd_tui(args: argparse.Namespace) -> int:
    from llmtap.recorder.reader import ReaderError, open_reader

    db = args.db or paths.default_db()
    try:
        reader = open_reader(db, memory_limit=UI_MEMORY_LIMIT)
    except ReaderError as exc:
        # The reader's message is written for people (never DuckDB's lock error).
        print(f"llmtap: {exc}", file=sys.stderr)
        return 2
    from llmtap.tui.app import LlmtapApp

    try:
        app = LlmtapApp(reader, source=str(db))  # it says itself whether it is attached, and live
        code = app.run()
    finally:
        reader.close()
    return int(code or 0)


class UILogHandler(logging.Handler):
    """Routes log records to toasts: a StreamHandler on the real stderr would scribble over the
    screen Textual draws."""

    def __init__(self, app: Any, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(logging.WARNING)
        self.app = app
        self.loop = loop

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            severity = "error" if record.levelno >= logging.ERROR else "warning"
            loop = self.loop or getattr(self.app, "_loop", None)
            if loop is None or loop.is_closed():
                return
            # Records come from the loop thread and from recorder threads alike.
            loop.call_soon_threadsafe(lambda: self.app.notify(msg, severity=severity, timeout=8))
        except Exception:  # logging must never take the UI down
            pass
