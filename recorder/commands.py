"""`llmtap export` and `llmtap stats`: both work while `llmtap run` holds the file."""

from __future__ import annotations

import argparse
import json
import sys
from decimal import Decimal
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
        help="calls, errors, fallbacks, tokens, latency and cost per model and provider",
        description="Per model and provider: calls, errors and error rate, fallbacks (calls "
        "that needed more than one attempt), tokens in/out/reasoning, TTFB and duration "
        "p50/p95/p99 in ms, and cost in USD with the number of calls left unpriced (a model no "
        "price is known for: give it one in rules.yaml). Works while `llmtap run` is recording.",
        epilog="examples:\n"
        "  llmtap stats\n"
        "  llmtap stats --since 2h\n"
        "  llmtap stats --model 'claude-*' --since 1d\n"
        "  llmtap stats --by client --since 1d          # cost per tool\n"
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
                    help="a JSON list on stdout (one object per model and provider) instead of a table; "
                    "cost_usd is a number of USD (null when no call of the group was priced) and "
                    "unpriced the group's calls with tokens but no known price")
    st.add_argument("--by", metavar="KEYS", default="model,provider", type=_group_keys,
                    help="what a row is: model, provider, client, or several joined by commas "
                    "(default: model,provider)")
    st.set_defaults(func=cmd_stats)

    from llmtap.recorder.costcmd import register as register_cost

    register_cost(sub)


def _group_keys(text: str) -> tuple[str, ...]:
    from llmtap.recorder.stats import GROUPS

    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in keys if k not in GROUPS]
    if bad or not keys or len(set(keys)) != len(keys):
        raise argparse.ArgumentTypeError(f"{text!r}: give model, provider or client, or several joined by "
                                         "commas, each once, e.g. --by model,client")
    return keys


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
    from llmtap.recorder.pricing import usd
    from llmtap.recorder.reader import ReaderError, open_reader
    from llmtap.recorder.stats import GROUPS, stats_rows

    try:
        since = parse_time(args.since, "--since")
        until = parse_time(args.until, "--until")
        reader = open_reader(args.db or paths.default_db())
    except (ExportError, ReaderError) as exc:
        print(f"llmtap stats: {exc}", file=sys.stderr)
        return 2
    try:
        rows = stats_rows(reader, *flags_where(since, until, args.model), by=args.by)
    except ReaderError as exc:
        print(f"llmtap stats: {exc}", file=sys.stderr)
        return 2
    finally:
        reader.close()
    if args.json:
        print(json.dumps([{**r, "cost_usd": float(r["cost_usd"]) if r["cost_usd"] is not None else None}
                          for r in rows], indent=2))
        return 0
    unpriced = sum(r["unpriced"] for r in rows)
    total = sum((r["cost_usd"] for r in rows if r["cost_usd"] is not None), Decimal(0))
    title = f"{sum(r['calls'] for r in rows)} calls, {usd(total)}"
    if unpriced:
        title += (f" ({unpriced} call{'s' if unpriced != 1 else ''} unpriced: no price known for the model; "
                  "give one in rules.yaml, then `llmtap cost backfill`)")
    table = Table(title=title, title_justify="left")
    for name in (*args.by, "calls", "errors", "err %", "fallbacks", "tokens in", "out", "reasoning",
                 "ttfb p50/p95/p99", "duration p50/p95/p99", "cost"):
        table.add_column(name, justify="left" if name in GROUPS else "right")

    def ms(*values: float | None) -> str:
        return "/".join("-" if v is None else f"{v:.0f}" for v in values)

    from rich.text import Text

    from llmtap.recorder.redact import printable

    for r in rows:
        # Model names are what clients asked for: plain text (no markup) with controls escaped.
        cost = usd(r["cost_usd"]) + (f" (+{r['unpriced']} unpriced)" if r["unpriced"] else "")
        table.add_row(*(Text(printable(str(r[k]))) for k in args.by), str(r["calls"]), str(r["errors"]), f"{r['error_rate'] * 100:.1f}",
                      str(r["fallbacks"]), str(r["input_tokens"]), str(r["output_tokens"]), str(r["reasoning_tokens"]),
                      ms(r["ttfb_p50"], r["ttfb_p95"], r["ttfb_p99"]),
                      ms(r["duration_p50"], r["duration_p95"], r["duration_p99"]), cost)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 170))  # piped: never squash the columns
    console.print(table if rows else "no calls recorded yet")
    return 0
