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
    from llmtap.helpformat import HelpFormatter, add_db_argument
    from llmtap.recorder.export import FORMATS

    exp = sub.add_parser(
        "export",
        help="export recorded calls to Parquet, CSV or JSON lines",
        description="Export the calls table (one row per call, every column), or another with "
        "--table, with DuckDB's own COPY. The format follows the file's extension: .parquet, .csv, .jsonl (.ndjson and "
        ".json are JSON lines too), or --format. Works while `llmtap run` is recording: the "
        "export then runs inside it.",
        epilog="examples:\n"
        "  llmtap export --out calls.parquet\n"
        "  llmtap export --out today.csv --since 24h\n"
        "  llmtap export --out claude.jsonl --model 'claude-*' --since 2026-11-01 \\\n"
        "                --until 2026-12-01\n"
        "  llmtap export --table attempts --out attempts.parquet --since 7d\n"
        "\n"
        "then query the file with the DuckDB that llmtap installs (no duckdb CLI needed):\n"
        "  .venv/bin/python -c \"import duckdb; print(duckdb.sql(\\\"FROM 'calls.parquet' LIMIT 5\\\"))\"",
        formatter_class=HelpFormatter,
    )
    add_db_argument(exp)
    exp.add_argument("--out", type=Path, default=None, metavar="FILE",
                     help="where to write (required); replaced only once the export is complete")
    exp.add_argument("--format", choices=FORMATS, default=None,
                     help="parquet, csv or jsonl (default: from FILE's extension; an extension "
                     "that names no format is an error)")
    exp.add_argument("--since", metavar="WHEN", help=f"only calls started at or after WHEN: {TIME_HELP}")
    exp.add_argument("--until", metavar="WHEN", help="only calls started before WHEN (same forms)")
    exp.add_argument("--model", metavar="GLOB",
                     help="only calls whose model asked for or sent matches, e.g. 'gpt-4o*'")
    exp.add_argument("--table", default="calls", metavar="NAME",
                     help="the table to export: calls (the default), attempts, dropped, or any other "
                     "of the database's (`llmtap sql 'SHOW TABLES'`); --since/--until apply to those "
                     "with a started_at, --model to calls only")
    exp.set_defaults(func=cmd_export)
    _register_export_otlp(exp)

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
    add_db_argument(st)
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

    # -- llmtap archive (recorder/archive.py)
    ar = sub.add_parser(
        "archive",
        help="archive finished calls as Parquet, by day, to a folder or S3",
        description="Write the finished calls (and their attempts; sessions where the DB has them) as "
        "Parquet partitioned by day, hive layout: TARGET/calls/date=YYYY-MM-DD/*.parquet, "
        "TARGET/attempts/..., one dataset for DuckDB, polars, Spark or Trino. Running it again "
        "writes only what is not archived yet; many llmtap files can archive into one prefix. With "
        "--delete the archived calls then leave the DB, once their files are written and read back. "
        "Works while `llmtap run` is recording: the archive then runs inside it.",
        epilog="examples:\n"
        "  llmtap archive --to ~/llmtap-archive\n"
        "  llmtap archive --to s3://my-bucket/llmtap --older-than 30d --delete\n"
        "  AWS_ENDPOINT_URL=http://127.0.0.1:9000 llmtap archive --to s3://bucket/llmtap   (MinIO)\n"
        "\n"
        "query the archive with the DuckDB that llmtap installs:\n"
        "  .venv/bin/python -c \"import duckdb; print(duckdb.sql(\\\"SELECT date, count(*) FROM \\\n"
        "    read_parquet('$HOME/llmtap-archive/calls/**/*.parquet', hive_partitioning=true) GROUP BY 1\\\"))\"\n"
        "\n"
        "S3 credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), or AWS_PROFILE;\n"
        "AWS_REGION; AWS_ENDPOINT_URL for a server other than AWS. On a schedule, inside the proxy:\n"
        "  llmtap run --archive-to s3://my-bucket/llmtap --archive-every 1h --keep 30d",
        formatter_class=HelpFormatter,
    )
    ar.add_argument("--to", required=True, metavar="DIR|s3://BUCKET/PREFIX",
                    help="the archive: a folder (made if missing) or an S3 prefix")
    add_db_argument(ar)
    ar.add_argument("--older-than", metavar="AGE",
                    help="only calls started before AGE ago (or a date), e.g. 30d; default: every finished call")
    ar.add_argument("--delete", action="store_true",
                    help="then remove the archived calls (and their attempts) from the DB; calls in "
                    "progress, newer than --older-than or not archived stay. The file shrinks (it is "
                    "rewritten) when no `llmtap run` holds it")
    ar.set_defaults(func=cmd_archive)
    from llmtap.recorder import sql

    sql.register(sub)
    from llmtap.recorder.costcmd import register as register_cost

    register_cost(sub)

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
    add_db_argument(ss)
    ss.add_argument("--since", metavar="WHEN", help=f"only sessions active at or after WHEN: {TIME_HELP}")
    ss.add_argument("--client", metavar="GLOB", help="only sessions of clients (User-Agent) matching GLOB, "
                    "ignoring case; without * or ? it matches anywhere in the name")
    ss.add_argument("--failed", action="store_true", help="only sessions that failed")
    ss.add_argument("--limit", type=int, default=50, metavar="N", help="list at most N (default: %(default)s)")
    ss.add_argument("--json", action="store_true",
                    help="a JSON array on stdout: one object per session with the `sessions` table's "
                    "columns (with ID: that session, its calls in `calls_list`)")
    ss.set_defaults(func=cmd_sessions)


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
        rows = reader.export(args.out, fmt, since=since, until=until, model=args.model, progress=progress,
                             table=args.table)
    except (ExportError, ReaderError) as exc:
        print(f"llmtap export: {exc}", file=sys.stderr)
        return 2
    finally:
        if task is not None:
            bar.stop()
        reader.close()
    via = " (through the running llmtap)" if reader.kind == "remote" else ""
    what = "calls" if args.table == "calls" else f"rows of {args.table}"
    print(f"exported {rows} {what} to {args.out}{via}", file=sys.stderr)
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
    priced = [r["cost_usd"] for r in rows if r["cost_usd"] is not None]
    # No priced call: the cost is not known, which "$0" would claim it is.
    n = sum(r["calls"] for r in rows)
    title = f"{n:,} call{'' if n == 1 else 's'}, {usd(sum(priced, Decimal(0))) if priced else 'cost unknown'}"
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


def cmd_archive(args: argparse.Namespace) -> int:
    from llmtap.recorder.archive import ArchiveError, Result, open_target, parse_age

    try:
        older_than = parse_age(args.older_than, "--older-than")
        to = args.to if args.to.startswith("s3://") else str(Path(args.to).expanduser().absolute())
        target = open_target(to)
    except ArchiveError as exc:
        print(f"llmtap archive: {exc}", file=sys.stderr)
        return 2
    db = Path(args.db or paths.default_db()).expanduser().absolute()
    with _ProgressBar("archiving") as bar:
        try:
            remote = _archive_remote(db, to, older_than, args.delete, bar.update)
            if remote is not None:
                result, via = remote, " (inside the running llmtap)"
            else:
                result, via = _archive_local(db, target, older_than, args.delete, bar.update), ""
        except ArchiveError as exc:
            bar.stop()
            print(f"llmtap archive: {exc}", file=sys.stderr)
            return 2
    assert isinstance(result, Result)
    said = f"archived {result.calls} calls ({result.attempts} attempts"
    said += f", {result.sessions} sessions)" if result.sessions else ")"
    said += f" to {target.display} in {len(result.files)} files{via}"
    if result.already:
        said += f"; {result.already} were archived before"
    if args.delete:
        said += f"; removed {result.deleted} archived calls from {db}"
        if result.compacted:
            before, after = result.compacted
            said += f" ({before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB)"
        elif via and result.deleted:
            said += (" (DuckDB reuses their space for new calls; the file itself shrinks when `llmtap "
                     "archive --delete` runs with the proxy stopped)")
    print(said, file=sys.stderr)
    return 0


class _ProgressBar:
    """A rich bar for runs long enough to read one; quiet for small ones."""

    def __init__(self, label: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), transient=True)
        self.tasks: dict[str, object] = {}
        self.started = False

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.started:
            self.bar.stop()
            self.started = False

    def update(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            if total < 20_000:
                return
            if not self.started:
                self.bar.start()
                self.started = True
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done)  # type: ignore[arg-type]


def _archive_remote(db: Path, to: str, older_than: str | None, delete: bool, progress) -> object | None:
    """Through the `llmtap run` holding `db`, if one does; None when none does."""
    import os

    import httpx

    from llmtap.recorder.archive import S3_ENV, ArchiveError, Result
    from llmtap.recorder.reader import _discover

    info = _discover(db)
    if info is None or Path(str(info.get("db", ""))).absolute() != db:
        return None
    payload = {"to": to, "older_than": older_than, "delete": delete,
               # The recorder's process was started with the proxy's environment, not this one's.
               "env": {k: os.environ[k] for k in S3_ENV if k in os.environ}}
    reply: dict = {}
    try:
        with httpx.Client(base_url=info["url"], headers={"authorization": f"Bearer {info['token']}"},
                          timeout=httpx.Timeout(None, connect=5.0), trust_env=False) as client:
            with client.stream("POST", "/archive", json=payload) as r:
                if r.status_code != 200:
                    raise ArchiveError(f"the running llmtap at {info['url']} refused the archive "
                                       f"(HTTP {r.status_code}): is it an older llmtap? Restart it")
                for line in r.iter_lines():
                    if not line:
                        continue
                    item = json.loads(line)
                    if "stage" in item:
                        progress(item["stage"], item["done"], item["total"])
                    elif "ok" in item:
                        reply = item
    except httpx.ConnectError:
        return None  # its endpoint is gone: the file may be free now
    except httpx.HTTPError as exc:
        raise ArchiveError(f"the running llmtap at {info['url']} stopped answering: {exc}") from None
    if not reply.get("ok"):
        raise ArchiveError(reply.get("error") or "the running llmtap did not finish the archive")
    return Result(calls=reply["calls"], attempts=reply["attempts"], sessions=reply.get("sessions", 0),
                  files=reply["files"], already=reply["already"], deleted=reply["deleted"])


def _archive_local(db: Path, target, older_than: str | None, delete: bool, progress) -> object:
    """No `llmtap run` holds the file: open it here (and rewrite it smaller after --delete)."""
    import duckdb

    from llmtap.recorder.archive import ArchiveError, archive, compact
    from llmtap.recorder.endpoint import READ_CONFIG
    from llmtap.recorder.schema import migrate

    if not db.exists():
        raise ArchiveError(f"no database at {db}: pass --db PATH, or run `llmtap run` first")
    try:
        con = duckdb.connect(str(db), config=READ_CONFIG)
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise ArchiveError(f"{db} is held by another program that is not a running `llmtap run` (a DuckDB "
                               "shell or script?). Close it and try again; while `llmtap run` records, "
                               "`llmtap archive` runs inside it.") from None
        raise ArchiveError(f"cannot open {db}: {exc}") from None
    try:
        migrate(con)  # a file of an older llmtap: the columns the archive writes
        result = archive(con.cursor, target, older_than=older_than, delete=delete, progress=progress)
        # Space freed by deletes made while `llmtap run` held the file is given back now too.
        row = con.execute("SELECT free_blocks, total_blocks FROM pragma_database_size()").fetchone()
        spare = bool(row and row[1] and row[0] / row[1] > 0.25)
    finally:
        con.close()
    if delete and (result.deleted or spare):
        try:
            result.compacted = compact(db)
        except Exception as exc:  # the calls are archived and removed; only the space is not given back
            print(f"llmtap archive: the archived calls are removed, but {db} could not be rewritten smaller "
                  f"({exc}); DuckDB reuses the space for new calls", file=sys.stderr)
    return result


def _count(tokens: int | None) -> str:
    """A token count for people: '-' when the provider reported none (0 would claim it did)."""
    return "-" if tokens is None else f"{tokens:,}"


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
                      f"tokens {_count(session['input_tokens'])} in / {_count(session['output_tokens'])} out"
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
                          f"{_count(c['input_tokens'])}/{_count(c['output_tokens'])}",
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
                      str(r["errors"]), "FAILED" if r["failed"] else "", f"{_count(r['input_tokens'])}/{_count(r['output_tokens'])}",
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


# -- llmtap export otlp (recorder/otlp.py) -----------------------------------------------------------
def _register_export_otlp(exp: argparse.ArgumentParser) -> None:
    from llmtap.helpformat import HelpFormatter, add_db_argument

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
    add_db_argument(otlp)
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
