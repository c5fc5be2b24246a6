"""`llmtap cost backfill` and `llmtap prices update`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from llmtap import paths

BATCH = 2000


def register(sub: argparse._SubParsersAction) -> None:
    from llmtap.helpformat import HelpFormatter, add_db_argument
    from llmtap.recorder.commands import TIME_HELP

    cost = sub.add_parser(
        "cost", help="price calls recorded before, or again after a price change",
        description="Work with the cost of recorded calls.", formatter_class=HelpFormatter)
    csub = cost.add_subparsers(dest="cost_command", metavar="SUBCOMMAND", required=True)
    back = csub.add_parser(
        "backfill",
        help="price the calls that have no cost yet (or all of them again, with --all)",
        description="Price recorded calls the way `llmtap run` prices new ones: the provider's own "
        "figure where it stated one, else the prices in rules.yaml, else genai-prices' table "
        "(the one `llmtap prices update` saved, or the one it ships with), at each call's date. "
        "Without --all only calls without a cost are priced (recorded before llmtap priced calls, "
        "or whose model had no known price then). The sessions of the calls priced get their "
        "cost summed again. Offline. The file must not be held by "
        "`llmtap run`: stop the run first (its own calls are priced as they finish).",
        epilog="examples:\n"
        "  llmtap cost backfill                     # calls that have no cost yet\n"
        "  llmtap cost backfill --since 7d --all    # re-price last week after editing rules.yaml\n"
        "  llmtap cost backfill --rules ~/work/rules.yaml --db ~/work/calls.duckdb",
        formatter_class=HelpFormatter)
    add_db_argument(back)
    back.add_argument("--rules", type=Path, default=None, metavar="PATH",
                      help="the rules file whose prices apply (default: ./rules.yaml if present, else "
                      f"{paths.config_dir() / 'rules.yaml'}, if present)")
    back.add_argument("--since", metavar="WHEN", help=f"only calls started at or after WHEN: {TIME_HELP}")
    back.add_argument("--all", action="store_true",
                      help="price every call again, priced or not (a provider's own figure is kept)")
    back.set_defaults(func=cmd_backfill)

    prices = sub.add_parser("prices", help="the price table llmtap prices calls with",
                            description="The genai-prices table llmtap prices calls with.",
                            formatter_class=HelpFormatter)
    psub = prices.add_subparsers(dest="prices_command", metavar="SUBCOMMAND", required=True)
    upd = psub.add_parser(
        "update", help="fetch genai-prices' newest table (the only command that goes online for prices)",
        description="Fetch the newest genai-prices table and save it where llmtap reads it "
        f"({paths.default_prices()}). Nothing else in llmtap fetches prices: without this, calls are "
        "priced with the table the installed genai-prices ships with. A running `llmtap run` uses "
        "the new table once restarted; `llmtap cost backfill --all` prices recorded calls with it. "
        "Exit code 2 when it cannot be fetched (offline): the table in use stays.",
        epilog="examples:\n"
        "  llmtap prices update\n"
        "  llmtap prices update && llmtap cost backfill --all --since 30d",
        formatter_class=HelpFormatter)
    upd.add_argument("--url", default=None, help="where to fetch it from (default: genai-prices' own)")
    upd.set_defaults(func=cmd_prices_update)


# -- backfill -----------------------------------------------------------------------------------
def _rules_path(given: Path | None) -> Path | None:
    if given is not None:
        return given
    path = paths.default_rules()
    return path if path.is_file() else None


def cmd_backfill(args: argparse.Namespace) -> int:
    from llmtap.recorder.export import ExportError, parse_time

    db: Path = (args.db or paths.default_db()).expanduser()
    rules = _rules_path(args.rules)
    if rules is not None and not rules.is_file():
        print(f"llmtap cost backfill: --rules {rules}: no such file", file=sys.stderr)
        return 2
    try:
        since = parse_time(args.since, "--since")
    except ExportError as exc:
        print(f"llmtap cost backfill: {exc}", file=sys.stderr)
        return 2
    if not db.is_file():
        print(f"llmtap cost backfill: {db}: no such file (give the file with --db PATH)", file=sys.stderr)
        return 2
    try:
        done = backfill(db, rules, since=since, everything=args.all, progress=_bar())
    except BackfillError as exc:
        print(f"llmtap cost backfill: {exc}", file=sys.stderr)
        return 2
    priced, unknown, kept = done
    print(f"priced {priced} calls in {db}" + (f"; {unknown} left unpriced (no price known for their model: "
                                              "give one in rules.yaml and run this again)" if unknown else "")
          + (f"; {kept} keep the cost their provider stated" if kept else ""), file=sys.stderr)
    return 0


class BackfillError(Exception):
    pass


def _bar() -> Callable[[int, int], None]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("pricing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   transient=True, console=None)
    task: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal task
        if task is None and (total < 5000 or done >= total):
            return  # small backfills finish before a bar would be read
        if task is None:
            bar.start()
            task = bar.add_task("pricing", total=total)
        bar.update(task, completed=done)
        if done >= total:
            bar.stop()

    return progress


def _open(db: Path) -> Any:
    import duckdb

    from llmtap.recorder.endpoint import discovery_path
    from llmtap.recorder.recorder import _other_run

    other = _other_run(db.absolute())
    if other is not None:
        raise BackfillError(f"{db} is held by the `llmtap run` with pid {other}: stop it (Ctrl-C), then run "
                            "`llmtap cost backfill` again. The calls it records meanwhile are priced as they "
                            "finish.")
    try:
        return duckdb.connect(str(db))
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            held = " (an `llmtap run`: stop it first)" if discovery_path(db).exists() else ""
            raise BackfillError(f"{db} is held by another program{held}: DuckDB lets one process at a time "
                                "write a file. Close it and run `llmtap cost backfill` again.") from None
        raise BackfillError(f"cannot open {db}: {exc}") from None


def backfill(db: Path, rules: Path | None, *, since: str | None = None, everything: bool = False,
             progress: Callable[[int, int], None] | None = None,
             prices_file: Path | None = None) -> tuple[int, int, int]:
    """Price the calls of `db` (`since`: as export.parse_time gives it); returns (priced, left
    unpriced, kept the provider's figure)."""
    from llmtap.dialects.anthropic import one_hour_writes
    from llmtap.dialects.shapes import Usage
    from llmtap.recorder import schema
    from llmtap.recorder.pricing import Pricer

    con = _open(db)
    try:
        schema.migrate(con)  # a file from before llmtap priced calls gains the cost columns
        have = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                          "WHERE table_name = 'calls' AND table_schema = 'main'").fetchall()}

        def c(name: str) -> str:
            return name if name in have else "NULL"

        where = ["(input_tokens IS NOT NULL OR output_tokens IS NOT NULL)"]
        params: list[Any] = []
        if not everything:
            where.append("cost_usd IS NULL")
        else:
            where.append("coalesce(cost_source, '') <> 'provider'")
        if since is not None:
            where.append("started_at >= ?")
            params.append(since)
        cond = " AND ".join(where)
        total = con.execute(f"SELECT count(*) FROM calls WHERE {cond}", params).fetchone()[0]
        kept = 0
        if everything:
            kept = con.execute("SELECT count(*) FROM calls WHERE cost_source = 'provider'"
                               + (" AND started_at >= ?" if since else ""), params).fetchone()[0]
        pricer = Pricer(rules, prices_file if prices_file is not None else paths.default_prices())
        priced = unknown = done = 0
        after = ""
        sessions: set[str] = set()
        while True:
            rows = con.execute(
                f"SELECT id, started_at, provider, url, model_reported, model_sent, model_requested, input_tokens, "
                f"output_tokens, reasoning_tokens, {c('cache_read_tokens')}, {c('cache_write_tokens')}, "
                f"{c('usage_raw')}, {c('session_id')} FROM calls WHERE {cond} AND id > ? ORDER BY id LIMIT {BATCH}",
                [*params, after]).fetchall()
            if not rows:
                break
            updates = []
            for (cid, started, provider, url, reported, sent, asked, inp, out, reasoning, read, write,
                 raw, session) in rows:
                if session is not None:
                    sessions.add(session)
                stated = _usage_raw(raw)
                usage = Usage(input_tokens=inp, output_tokens=out, reasoning_tokens=reasoning,
                              cache_read_tokens=read, cache_write_tokens=write, cost_usd=_stated_cost(stated),
                              cache_write_1h_tokens=one_hour_writes(stated))
                p = pricer.price(usage, provider=provider, models=(reported, sent, asked), url=url, when=started)
                updates.append((cid, p.cost_usd, p.source, p.detail_json()))
                if p.cost_usd is None:
                    unknown += 1
                else:
                    priced += 1
            after = rows[-1][0]
            with schema.transaction(con):
                con.execute("CREATE OR REPLACE TEMP TABLE _backfill (id VARCHAR, cost_usd DECIMAL(18,10), "
                            "cost_source VARCHAR, cost_detail JSON)")
                con.executemany("INSERT INTO _backfill VALUES (?, ?, ?, ?)", updates)
                con.execute("UPDATE calls SET cost_usd = b.cost_usd, cost_source = b.cost_source, "
                            "cost_detail = b.cost_detail FROM _backfill b WHERE calls.id = b.id")
            done += len(rows)
            if progress is not None:
                progress(done, total)
        _resum_sessions(con, sessions)
        return priced, unknown, kept
    finally:
        con.close()


def _resum_sessions(con: Any, ids: set[str]) -> None:
    """The sessions of the calls just priced get their cost summed again from their calls
    (the recorder sums it as calls arrive; a price change would leave it stale)."""
    if not ids:
        return
    from llmtap.recorder import schema

    with schema.transaction(con):
        con.execute("CREATE OR REPLACE TEMP TABLE _resum AS SELECT unnest(?::VARCHAR[]) AS id", [sorted(ids)])
        con.execute("UPDATE sessions SET cost_usd = t.cost FROM (SELECT session_id, sum(cost_usd) AS cost FROM calls "
                    "WHERE session_id IN (SELECT id FROM _resum) GROUP BY session_id) t WHERE sessions.id = t.session_id")


def _usage_raw(raw: Any) -> dict | None:
    """The provider's usage object kept in `usage_raw` (JSON text), or None."""
    try:
        obj = json.loads(raw) if isinstance(raw, str) and raw else None
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _stated_cost(usage: dict | None) -> Decimal | None:
    """The cost a provider stated in its usage object (OpenRouter's `cost`)."""
    value = usage.get("cost") if usage is not None else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    return None


# -- prices update --------------------------------------------------------------------------------
def cmd_prices_update(args: argparse.Namespace) -> int:
    import httpx
    from genai_prices import __version__ as genai_version
    from genai_prices.types import _providers_from_raw
    from genai_prices.update_prices import DEFAULT_UPDATE_URL

    url = args.url or DEFAULT_UPDATE_URL
    target = paths.default_prices()
    in_use = (f"the table saved on {_saved_at(target)}" if target.is_file()
              else f"the table genai-prices {genai_version} ships with")
    try:
        r = httpx.get(url, timeout=httpx.Timeout(15.0, connect=5.0), follow_redirects=True)
        r.raise_for_status()
        raw = r.json()
        if not isinstance(raw, list):
            raise ValueError("not a list of providers")
        providers = _providers_from_raw(raw)
    except httpx.HTTPError as exc:
        print(f"llmtap prices update: cannot fetch {url} ({type(exc).__name__}: {exc or 'no answer'}). Are you "
              f"offline? llmtap keeps pricing with {in_use}; run this again once online, or give another "
              "source with --url.", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"llmtap prices update: {url} did not hold a genai-prices table ({exc}); llmtap keeps pricing "
              f"with {in_use}.", file=sys.stderr)
        return 2
    fetched = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps({"fetched_at": fetched, "url": url, "providers": raw}), encoding="utf-8")
    tmp.chmod(0o600)
    tmp.replace(target)
    models = sum(len(p.models) for p in providers)
    print(f"saved {len(providers)} providers and {models} models to {target}. A running `llmtap run` prices "
          "with it once restarted; `llmtap cost backfill --all` prices recorded calls with it.")
    return 0


def _saved_at(path: Path) -> str:
    try:
        return str(json.loads(path.read_text(encoding="utf-8")).get("fetched_at") or "an unknown date")
    except (OSError, ValueError, AttributeError):
        return "an unknown date"
