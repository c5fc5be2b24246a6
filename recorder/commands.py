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
    exp.add_argument("--out", type=Path, default=None, metavar="FILE",
                     help="where to write (required); replaced only once the export is complete")
    exp.add_argument("--format", choices=FORMATS, default=None,
                     help="parquet, csv or jsonl (default: from FILE's extension; an extension "
                     "that names no format is an error)")
    exp.add_argument("--since", metavar="WHEN", help=f"only calls started at or after WHEN: {TIME_HELP}")
    exp.add_argument("--until", metavar="WHEN", help="only calls started before WHEN (same forms)")
    exp.add_argument("--model", metavar="GLOB",
                     help="only calls whose model asked for or sent matches, e.g. 'gpt-4o*'")
    exp.set_defaults(func=cmd_export)
    _register_export_otlp(exp)

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


def cmd_export(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from llmtap.recorder.export import ExportError, format_for, parse_time
    from llmtap.recorder.reader import ReaderError, open_reader

    if args.out is None:
        print("llmtap export: --out FILE is required (e.g. --out calls.parquet); to send calls to an "
              "OpenTelemetry collector instead: llmtap export otlp --since 1d --otlp URL", file=sys.stderr)
        return 2
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


# -- llmtap export otlp (recorder/otlp.py) -----------------------------------------------------------
def _register_export_otlp(exp: argparse.ArgumentParser) -> None:
    from llmtap.helpformat import HelpFormatter

    targets = exp.add_subparsers(dest="target", metavar="[otlp]", required=False,
                                 help="`llmtap export otlp`: send the calls to an OpenTelemetry collector "
                                 "instead of writing a file (see `llmtap export otlp --help`)")
    otlp = targets.add_parser(
        "otlp",
        help="send recorded calls to an OpenTelemetry collector (OTLP/HTTP) instead of a file",
        description="Send finished calls as spans over OTLP/HTTP, as `llmtap run --otlp` does live: "
        "to backfill a collector that was down, or traces recorded before --otlp was on. Each span "
        "keeps the ids derived from its call, so sending a call twice gives the collector the same "
        "span again, not a second one. Works while `llmtap run` is recording (it reads through it).",
        epilog="examples:\n"
        "  llmtap export otlp --since 1d --otlp http://127.0.0.1:4318\n"
        "  OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 llmtap export otlp --since 2026-11-01\n"
        "  llmtap export otlp --since 7d --model 'claude-*' --otlp-content full \\\n"
        "                     --otlp https://cloud.langfuse.com/api/public/otel",
        formatter_class=HelpFormatter,
    )
    otlp.add_argument("--db", type=Path, default=None, metavar="PATH",
                      help=f"the DuckDB file (default: {paths.default_db()})")
    otlp.add_argument("--since", metavar="WHEN", help=f"only calls started at or after WHEN: {TIME_HELP}")
    otlp.add_argument("--until", metavar="WHEN", help="only calls started before WHEN (same forms)")
    otlp.add_argument("--model", metavar="GLOB",
                      help="only calls whose model asked for or sent matches, e.g. 'gpt-4o*'")
    otlp.add_argument("--otlp", metavar="URL", default=None,
                      help="the collector's base URL; spans go to URL/v1/traces (default: "
                      "$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT as given, or $OTEL_EXPORTER_OTLP_ENDPOINT); "
                      "headers from $OTEL_EXPORTER_OTLP_HEADERS")
    otlp.add_argument("--otlp-content", choices=("none", "full"), default=None,
                      help="full: also send prompts, answers and reasoning, masked as the record is "
                      "(default: none)")
    otlp.add_argument("--otlp-content-max", metavar="CHARS", type=int, default=None,
                      help="with --otlp-content full, the most characters of each content attribute "
                      "(default: 32768)")
    otlp.set_defaults(func=cmd_export_otlp)


PAGE = 256


def cmd_export_otlp(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from llmtap.recorder.export import ExportError, parse_time, where_clause
    from llmtap.recorder.otlp import EDGE, OtlpError, backfill, resolve, shown
    from llmtap.recorder.reader import ReaderError, open_reader

    try:
        options = resolve(args.otlp, args.otlp_content, args.otlp_content_max)
        if not options:
            raise OtlpError("no collector given: pass --otlp URL (e.g. http://127.0.0.1:4318) or set "
                            "OTEL_EXPORTER_OTLP_ENDPOINT")
        since = parse_time(args.since, "--since")
        until = parse_time(args.until, "--until")
        reader = open_reader(args.db or paths.default_db())
    except (ExportError, ReaderError, OtlpError) as exc:
        print(f"llmtap export otlp: {exc}", file=sys.stderr)
        return 2
    where, params = where_clause(since, until, args.model)
    where += " AND duration_ms IS NOT NULL"  # calls in progress are sent once they finish
    # Of an answer's body a span needs its edges only (its id, its final usage): the rest stays
    # in the file, and the pages stay small through the running llmtap's endpoint.
    drop = "response_body, response_body_raw, request_body_raw, response_headers"
    if options["content"] != "full":
        drop += ", request_body"
    select = (f"SELECT * EXCLUDE ({drop}), left(response_body, {EDGE}) AS _head, "
              f"CASE WHEN length(response_body) > {EDGE} THEN right(response_body, {EDGE}) ELSE '' END AS _tail "
              f"FROM calls WHERE {where} AND id > ? ORDER BY id LIMIT {PAGE}")

    def rows():
        last = ""
        while True:
            columns, page = reader.query(select, [*params, last])
            if not page:
                return
            calls = [dict(zip(columns, r)) for r in page]
            ids = [c["id"] for c in calls]
            acols, arows = reader.query(f"SELECT * FROM attempts WHERE call_id IN ({', '.join('?' * len(ids))}) "
                                        "ORDER BY call_id, n", ids)
            by_call: dict[str, list[dict]] = {}
            for a in arows:
                row = dict(zip(acols, a))
                by_call.setdefault(row["call_id"], []).append(row)
            for c in calls:
                yield c, by_call.get(c["id"], [])
            last = ids[-1]

    bar = Progress(TextColumn("sending spans"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   transient=True)
    try:
        total = reader.query(f"SELECT count(*) FROM calls WHERE {where}", params)[1][0][0]
        task = bar.add_task("otlp", total=total)
        with bar:
            sent = backfill(rows(), options, progress=lambda n: bar.update(task, completed=n))
    except (ReaderError, OtlpError) as exc:
        print(f"llmtap export otlp: {exc}", file=sys.stderr)
        return 1
    finally:
        reader.close()
    via = " (read through the running llmtap)" if reader.kind == "remote" else ""
    print(f"sent {sent} calls as traces to {shown(options['endpoint'])}{via}", file=sys.stderr)
    return 0
