"""`llmtap export` and `llmtap stats`: both work while `llmtap run` holds the file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmtap import paths

TIME_HELP = ("an age (2h, 30m, 7d, 1w) or a date, e.g. 2026-11-01 or 2026-11-01T08:00 "
             "(your local time unless it names a zone); the same forms as since: in the UI")


def register(sub: argparse._SubParsersAction) -> None:
    from llmtap.helpformat import HelpFormatter
    from llmtap.recorder.export import FORMATS

    exp = sub.add_parser(
        "export",
        help="export recorded calls to Parquet, CSV or JSON lines",
        description="Export the calls table (one row per call, every column) with DuckDB's own "
        "COPY. The format follows the file's extension: .parquet, .csv, .jsonl (.ndjson and "
        ".json are JSON lines too), or --format. Works while `llmtap run` is recording: the "
        "export then runs inside it.",
        epilog="examples:\n"
        "  llmtap export --out calls.parquet\n"
        "  llmtap export --out today.csv --since 24h\n"
        "  llmtap export --out claude.jsonl --model 'claude-*' --since 2026-11-01 \\\n"
        "                --until 2026-12-01\n"
        "\n"
        "then query the file with the DuckDB that llmtap installs (no duckdb CLI needed):\n"
        "  .venv/bin/python -c \"import duckdb; print(duckdb.sql(\\\"FROM 'calls.parquet' LIMIT 5\\\"))\"",
        formatter_class=HelpFormatter,
    )
    exp.add_argument("--db", type=Path, default=None, metavar="PATH",
                     help=f"the DuckDB file (default: {paths.default_db()})")
    exp.add_argument("--out", type=Path, required=True, metavar="FILE",
                     help="where to write; replaced only once the export is complete")
    exp.add_argument("--format", choices=FORMATS, default=None,
                     help="parquet, csv or jsonl (default: from FILE's extension; an extension "
                     "that names no format is an error)")
    exp.add_argument("--since", metavar="WHEN", help=f"only calls started at or after WHEN: {TIME_HELP}")
    exp.add_argument("--until", metavar="WHEN", help="only calls started before WHEN (same forms)")
    exp.add_argument("--model", metavar="GLOB",
                     help="only calls whose model asked for or sent matches, e.g. 'gpt-4o*'")
    exp.set_defaults(func=cmd_export)

    st = sub.add_parser(
        "stats",
        help="calls, errors, fallbacks, tokens and latency per model and provider",
        description="Per model and provider: calls, errors and error rate, fallbacks (calls "
        "that needed more than one attempt), tokens in/out/reasoning, and TTFB and duration "
        "p50/p95/p99 in ms. Works while `llmtap run` is recording.",
        epilog="examples:\n"
        "  llmtap stats\n"
        "  llmtap stats --since 2h\n"
        "  llmtap stats --model 'claude-*' --since 1d\n"
        "  llmtap stats --since 2026-11-20 --until 2026-11-21 --json | jq '.[0]'",
        formatter_class=HelpFormatter,
    )
    st.add_argument("--db", type=Path, default=None, metavar="PATH",
                    help=f"the DuckDB file (default: {paths.default_db()})")
    st.add_argument("--since", metavar="WHEN", help=f"only calls started at or after WHEN: {TIME_HELP}")
    st.add_argument("--until", metavar="WHEN", help="only calls started before WHEN (same forms)")
    st.add_argument("--model", metavar="GLOB",
                    help="only calls whose model asked for, sent or reported matches GLOB, ignoring "
                    "case, e.g. 'gpt-4o*' (the same as the UI's model: filter)")
    st.add_argument("--json", action="store_true",
                    help="a JSON list on stdout (one object per model and provider) instead of a table")
    st.set_defaults(func=cmd_stats)

    # Sessions (recorder/sessions.py, session_view.py)
    ss = sub.add_parser(
        "sessions",
        help="agent runs rebuilt from the traffic: calls, failures, tokens per session",
        description="Sessions newest first: the calls of one agent run, grouped by the strongest "
        "evidence each call carries (an id the client sends, a `wrap --session` or /s/NAME/ label, "
        "tool results answering earlier tool calls, a history that grows), with the share of "
        "failed sessions per client (a session failed when a call in it ended in an error the "
        "client saw or a cut stream). Given an ID, one session as a timeline. Works while "
        "`llmtap run` is recording.",
        epilog="examples:\n"
        "  llmtap sessions\n"
        "  llmtap sessions --since 1d --failed\n"
        "  llmtap sessions --client 'Cline*' --json | jq '.[0]'\n"
        "  llmtap sessions 01JD3X4E8Q2W6ZK0C9B7MVN5RT     # one session, by id\n"
        "  llmtap sessions deploy-42                      # by its label: llmtap wrap --session deploy-42",
        formatter_class=HelpFormatter,
    )
    ss.add_argument("id", nargs="?", metavar="ID",
                    help="show this session as a timeline: its id, or the name it was given (a --session "
                    "label, an x-llmtap-session header's value)")
    ss.add_argument("--db", type=Path, default=None, metavar="PATH",
                    help=f"the DuckDB file (default: {paths.default_db()})")
    ss.add_argument("--since", metavar="WHEN", help=f"only sessions active at or after WHEN: {TIME_HELP}")
    ss.add_argument("--client", metavar="GLOB", help="only sessions of clients (User-Agent) matching GLOB, "
                    "ignoring case; without * or ? it matches anywhere in the name")
    ss.add_argument("--failed", action="store_true", help="only sessions that failed")
    ss.add_argument("--limit", type=int, default=50, metavar="N", help="list at most N (default: %(default)s)")
    ss.add_argument("--json", action="store_true",
                    help="a JSON array on stdout: one object per session with the `sessions` table's "
                    "columns (with ID: that session, its calls in `calls_list`)")
    ss.set_defaults(func=cmd_sessions)


def cmd_export(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from llmtap.recorder.export import ExportError, format_for, parse_time
    from llmtap.recorder.reader import ReaderError, open_reader

    try:
        fmt = format_for(args.out, args.format)
        since = parse_time(args.since, "--since")
        until = parse_time(args.until, "--until")
        reader = open_reader(args.db or paths.default_db())
    except (ExportError, ReaderError) as exc:
        print(f"llmtap export: {exc}", file=sys.stderr)
        return 2
    bar = Progress(TextColumn("exporting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   transient=True, console=None)
    task = None

    def progress(done: int, total: int) -> None:
        nonlocal task
        if total < 20_000 and task is None:
            return  # small exports finish before a bar would be read
        if task is None:
            bar.start()
            task = bar.add_task("export", total=total)
        bar.update(task, completed=done)

    try:
        rows = reader.export(args.out, fmt, since=since, until=until, model=args.model, progress=progress)
    except (ExportError, ReaderError) as exc:
        print(f"llmtap export: {exc}", file=sys.stderr)
        return 2
    finally:
        if task is not None:
            bar.stop()
        reader.close()
    via = " (through the running llmtap)" if reader.kind == "remote" else ""
    print(f"exported {rows} calls to {args.out}{via}", file=sys.stderr)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from llmtap.recorder.export import ExportError, parse_time
    from llmtap.recorder.filters import flags_where
    from llmtap.recorder.reader import ReaderError, open_reader
    from llmtap.recorder.stats import stats_rows

    try:
        since = parse_time(args.since, "--since")
        until = parse_time(args.until, "--until")
        reader = open_reader(args.db or paths.default_db())
    except (ExportError, ReaderError) as exc:
        print(f"llmtap stats: {exc}", file=sys.stderr)
        return 2
    try:
        rows = stats_rows(reader, *flags_where(since, until, args.model))
    except ReaderError as exc:
        print(f"llmtap stats: {exc}", file=sys.stderr)
        return 2
    finally:
        reader.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"{sum(r['calls'] for r in rows)} calls", title_justify="left")
    for name in ("model", "provider", "calls", "errors", "err %", "fallbacks", "tokens in", "out", "reasoning",
                 "ttfb p50/p95/p99", "duration p50/p95/p99"):
        table.add_column(name, justify="left" if name in ("model", "provider") else "right")

    def ms(*values: float | None) -> str:
        return "/".join("-" if v is None else f"{v:.0f}" for v in values)

    from rich.text import Text

    from llmtap.recorder.redact import printable

    for r in rows:
        # Model names are what clients asked for: plain text (no markup) with controls escaped.
        table.add_row(Text(printable(str(r["model"]))), Text(printable(str(r["provider"]))), str(r["calls"]), str(r["errors"]), f"{r['error_rate'] * 100:.1f}",
                      str(r["fallbacks"]), str(r["input_tokens"]), str(r["output_tokens"]), str(r["reasoning_tokens"]),
                      ms(r["ttfb_p50"], r["ttfb_p95"], r["ttfb_p99"]),
                      ms(r["duration_p50"], r["duration_p95"], r["duration_p99"]))
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 170))  # piped: never squash the columns
    console.print(table if rows else "no calls recorded yet")
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from llmtap.recorder.endpoint import jsonable
    from llmtap.recorder.export import ExportError, parse_time
    from llmtap.recorder.reader import ReaderError, open_reader
    from llmtap.recorder.redact import printable
    from llmtap.recorder.session_view import failed_share, find_session, list_sessions, session_calls

    try:
        since = parse_time(args.since, "--since")
        reader = open_reader(args.db or paths.default_db())
    except (ExportError, ReaderError) as exc:
        print(f"llmtap sessions: {exc}", file=sys.stderr)
        return 2
    try:
        if args.id:
            session = find_session(reader, args.id)
            if session is None:
                print(f"llmtap sessions: no session {args.id!r}: `llmtap sessions` lists them", file=sys.stderr)
                return 1
            calls = session_calls(reader, session)
        else:
            rows = list_sessions(reader, since=since, client=args.client, failed=args.failed, limit=args.limit)
            shares = failed_share(reader, since=since, client=args.client)
    except ReaderError as exc:
        print(f"llmtap sessions: {exc}", file=sys.stderr)
        return 2
    finally:
        reader.close()

    def plain(v: object) -> Text:
        return Text(printable("" if v is None else str(v)))

    def when(v: object) -> str:
        return v.astimezone().strftime("%Y-%m-%d %H:%M:%S") if hasattr(v, "astimezone") else str(v or "")

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 170))  # piped: never squash the columns
    if args.id:
        assert session is not None
        if args.json:
            print(json.dumps(jsonable({**session, "calls_list": calls}), indent=2, default=str))
            return 0
        console.print(Text(f"session {session['id']}  {printable(session['title'] or '')}", style="bold"))
        console.print(f"found by {session['source']}{'  (' + printable(session['key']) + ')' if session['key'] else ''}"
                      f"   client {printable(session['client'] or '-')}   {session['calls']} calls, "
                      f"{session['errors']} errors, {session['fallbacks']} fallbacks   "
                      f"tokens {session['input_tokens'] or 0} in / {session['output_tokens'] or 0} out"
                      + (f"   ${session['cost_usd']}" if session.get("cost_usd") is not None else "")
                      + ("   FAILED" if session["failed"] else ""))
        table = Table(title_justify="left")
        for name in ("turn", "time", "linked by", "model", "status", "ms", "tokens", "tool calls / said"):
            table.add_column(name, justify="right" if name in ("turn", "status", "ms", "tokens") else "left")
        for c in calls:
            failed = c["status"] is None or c["status"] >= 400 or c["error"] is not None
            tools = ", ".join(f"{t.get('name')}#{t.get('id')}" for t in json.loads(c["tool_calls"] or "[]"))
            said = tools or (c["error"] or c["content"] or "")
            table.add_row(str(c["turn"] or ""), when(c["started_at"]), plain(c["session_link"]),
                          plain(c["model_sent"] or c["model_requested"]), str(c["status"] or "-"),
                          f"{c['duration_ms']:.0f}" if c["duration_ms"] is not None else "-",
                          f"{c['input_tokens'] or 0}/{c['output_tokens'] or 0}",
                          Text(printable(" ".join(str(said).split())[:80]), style="bold red" if failed else ""),
                          style="red" if failed else None)
        console.print(table)
        return 0
    if args.json:
        print(json.dumps(jsonable(rows), indent=2, default=str))
        return 0
    if not rows:
        console.print("no sessions recorded yet")
        return 0
    table = Table(title_justify="left")
    for name in ("id", "started", "client", "title", "calls", "errors", "failed", "tokens in/out", "cost $",
                 "found by"):
        table.add_column(name, justify="right" if name in ("calls", "errors", "tokens in/out", "cost $") else "left")
    for r in rows:
        table.add_row(r["id"], when(r["started_at"]), plain(r["client"]), plain(r["title"]), str(r["calls"]),
                      str(r["errors"]), "FAILED" if r["failed"] else "", f"{r['input_tokens'] or 0}/{r['output_tokens'] or 0}",
                      "-" if r.get("cost_usd") is None else str(r["cost_usd"]), plain(r["source"]),
                      style="red" if r["failed"] else None)
    console.print(table)
    total = sum(s["sessions"] for s in shares)
    failed = sum(s["failed"] for s in shares)
    console.print(f"{failed} of {total} sessions failed ({failed / total:.0%})" if total else "")
    for s in shares:
        console.print(Text(f"  {printable(s['client'])}: {s['failed']} of {s['sessions']} failed "
                           f"({s['failed_share']:.0%})"))
    return 0
