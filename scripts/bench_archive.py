#!/usr/bin/env python3
"""Archive benchmark: `llmtap archive` of a generated DB vs a plain COPY of the same rows.

On a DB from scripts/make_big_db.py (N calls over a year, ~12 KB of bodies each):
  - baseline: one `COPY (SELECT * FROM calls) TO 'x.parquet' (zstd)` and the same for attempts,
    on a DuckDB connection of its own (what DuckDB alone does);
  - archive: `recorder.archive.archive()` to a folder, as `llmtap archive --to DIR` runs it
    (day partitions, the id read-back of every day, files fsynced and renamed into place, the
    row count of each read back), then a second run that finds everything archived;
  - archive --delete of the calls older than 30 days on a copy, with the file's rewrite.
Reports times, the ratio to the baseline, and Parquet bytes per call.

    .venv/bin/python scripts/bench_archive.py --calls 1000000          # makes /tmp/bench-archive.duckdb
    .venv/bin/python scripts/bench_archive.py --db /tmp/big.duckdb     # an existing one
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmtap.recorder import archive as archive_mod  # noqa: E402
from llmtap.recorder.endpoint import READ_CONFIG  # noqa: E402


def size_of(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.parquet"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, default=None, help="an existing DB (default: make one with --calls)")
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--work", type=Path, default=None, help="where to write (default: a temporary folder)")
    a = ap.parse_args()
    db = a.db
    if db is None:
        db = Path(f"/tmp/bench-archive-{a.calls}.duckdb")
        if not db.exists():
            subprocess.run([sys.executable, str(ROOT / "scripts" / "make_big_db.py"), "--db", str(db),
                            "--calls", str(a.calls)], check=True)
    work = Path(tempfile.mkdtemp(prefix="bench-archive-", dir=a.work))
    try:
        con = duckdb.connect(str(db), read_only=True)
        calls = con.execute("SELECT count(*) FROM calls").fetchall()[0][0]
        t = time.perf_counter()
        con.execute(f"COPY (SELECT * FROM calls) TO '{work}/plain-calls.parquet' (FORMAT parquet, COMPRESSION zstd)")
        con.execute(f"COPY (SELECT * FROM attempts) TO '{work}/plain-attempts.parquet' "
                    "(FORMAT parquet, COMPRESSION zstd)")
        plain = time.perf_counter() - t
        plain_size = sum(p.stat().st_size for p in work.glob("plain-*.parquet"))
        con.close()
        print(f"{db}: {calls:,} calls, {db.stat().st_size / 2**20:.0f} MiB")
        print(f"plain COPY to one Parquet file:  {plain:7.1f} s   {plain_size / calls:6.0f} bytes per call")

        copy = work / "copy.duckdb"
        shutil.copy(db, copy)  # the archive makes its instance id in the file: leave the source as it is
        con = duckdb.connect(str(copy), config=READ_CONFIG)
        target = archive_mod.open_target(str(work / "archive"))
        t = time.perf_counter()
        first = archive_mod.archive(con.cursor, target)
        took = time.perf_counter() - t
        arch_size = size_of(work / "archive")
        print(f"llmtap archive --to DIR:         {took:7.1f} s   {arch_size / calls:6.0f} bytes per call   "
              f"{took / plain:.2f}x the plain COPY   ({first.calls:,} calls, {len(first.files)} day files)")
        t = time.perf_counter()
        again = archive_mod.archive(con.cursor, target)
        print(f"second run (nothing new):        {time.perf_counter() - t:7.1f} s   ({again.calls} calls written, "
              f"{again.already:,} found archived)")
        cutoff = (datetime.now(timezone.utc) - timedelta(days=30)).isoformat()
        t = time.perf_counter()
        gone = archive_mod.archive(con.cursor, target, older_than=cutoff, delete=True)
        deleted = time.perf_counter() - t
        con.close()
        before = copy.stat().st_size
        t = time.perf_counter()
        archive_mod.compact(copy)
        compacted = time.perf_counter() - t
        print(f"--older-than 30d --delete:       {deleted:7.1f} s   ({gone.deleted:,} calls removed), then the "
              f"rewrite {compacted:.1f} s: {before / 2**20:.0f} MiB -> {copy.stat().st_size / 2**20:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
