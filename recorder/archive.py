"""`llmtap archive`: finished calls as Parquet on a folder or S3, partitioned by day, and retention.

Layout (hive partitioning, one dataset for DuckDB, polars, Spark, Trino):

    TARGET/calls/date=YYYY-MM-DD/<instance>-<first id>-<last id>.parquet
    TARGET/attempts/date=YYYY-MM-DD/<same name>.parquet     the attempts of exactly those calls
    TARGET/sessions/date=YYYY-MM-DD/<instance>-...parquet   when the DB has a `sessions` table

`date` is the call's start day in UTC. `<instance>` is a random id kept in the DB
(`_archive_instance`), so many llmtap files archive into one prefix without their names ever
meeting.

Idempotence keeps no state beside the archive itself: a run lists this instance's files of the
days its candidate calls fall in, reads their `id` column and writes only the calls none of them
holds. Calls of one day archived in two runs are two disjoint files (whose first ids differ, so
their names do too); a call finished late (a long stream, a spool import) is written by the
next run; a run that died before its upload finished left no file (a folder's files are
renamed into place, an S3 upload appears whole), so the next run writes those calls again. A
calls file is written after its attempts file: an attempts file without its calls file is a
dead run's leftover and is removed.

Calls leave the local file (`--delete`, `--keep`) only once their calls file is written and
read back (its row count, from the stored file), in short transactions so the writer never
waits long. The search index (search_index.py) rules calls out by chunks of ids: a chunk left
with no call is dropped with its words, on the writer's thread (it merges chunks too).

The recorder's connection has no file access (endpoint.READ_CONFIG): rows stream as Arrow
into an in-memory DuckDB that may write only in the run's temporary folder (export._writer),
then go to the target through pyarrow's file systems (local or S3).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from llmtap.recorder.times import TIME_FORMS, parse_when

if TYPE_CHECKING:
    import duckdb
    from pyarrow import fs as pafs

# Calls per Parquet file: a file is one COPY (and one upload), so progress moves per file and
# memory stays bounded on a long day.
ROWS_PER_FILE = 100_000
# Ids per DELETE transaction: the writer waits on none, but each is a commit to the WAL.
DELETE_BATCH = 5_000
# A call still in progress has none of these yet (recorder._close_interrupted uses the same).
FINISHED = "NOT (status IS NULL AND duration_ms IS NULL AND error IS NULL)"
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
          "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")
_running = threading.Lock()  # one archive at a time per process: two would write the same calls


class ArchiveError(Exception):
    """The archive cannot go on; the message names the flag and the fix. Nothing was deleted."""


def parse_age(text: str | None, flag: str) -> str | None:
    """`--older-than 30d` / `--keep 30d`: the moment before which calls qualify, as ISO."""
    if text is None:
        return None
    try:
        return parse_when(text, datetime.now(timezone.utc))
    except ValueError:
        raise ArchiveError(f"{flag} {text!r}: expected {TIME_FORMS}; e.g. {flag} 30d") from None


def age_seconds(text: str) -> float:
    """`1h` -> 3600.0: an age as --since takes it (s, m, h, d, w); ValueError otherwise."""
    now = datetime.now(timezone.utc)
    if not re.match(r"^\s*\d+(\.\d+)?\s*[smhdw]\s*$", text.lower()):
        raise ValueError(text)
    return (now - datetime.fromisoformat(parse_when(text, now))).total_seconds()


@dataclass
class Target:
    fs: pafs.FileSystem
    root: str  # the target's folder inside `fs`, without a trailing slash
    display: str  # what the user wrote, for messages
    local: bool

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def url(self, path: str) -> str:
        return path if self.local else "s3://" + path


def open_target(spec: str, env: Mapping[str, str] | None = None, flag: str = "--to") -> Target:
    """The folder or `s3://bucket/prefix` named by `spec`. S3 takes credentials the standard
    way: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), else the SDK's chain
    (AWS_PROFILE, ~/.aws); AWS_ENDPOINT_URL(_S3) for a server other than AWS (MinIO, R2)."""
    from pyarrow import fs as pafs

    env = os.environ if env is None else env
    if spec.startswith("s3://"):
        rest = spec[len("s3://"):].strip("/")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ArchiveError(f"{flag} {spec}: name a bucket, e.g. {flag} s3://my-bucket/llmtap")
        kwargs: dict[str, Any] = {
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            # An unreachable server must fail the run in seconds, not after the SDK's minutes.
            "connect_timeout": 5, "request_timeout": 30,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        }
        if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            kwargs.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                          session_token=env.get("AWS_SESSION_TOKEN"))
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            url = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
            kwargs.update(endpoint_override=url.netloc, scheme=url.scheme or "https")
            if url.hostname in ("127.0.0.1", "localhost", "::1"):
                kwargs.update(force_virtual_addressing=False)
        try:
            s3 = pafs.S3FileSystem(**kwargs)
        except Exception as exc:
            raise ArchiveError(f"{flag} {spec}: cannot set up S3 ({exc}); check the AWS_* variables") from None
        return Target(s3, "/".join(p for p in (bucket, prefix.strip("/")) if p), spec, local=False)
    root = Path(spec).expanduser().absolute()
    return Target(pafs.LocalFileSystem(), str(root), str(root), local=True)


def check(target: Target, flag: str = "--to") -> None:
    """Fail now, with the fix, when the target cannot take files: before anything is read, and
    long before anything would be deleted."""
    from pyarrow import fs as pafs

    if target.local:
        root = Path(target.root)
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            probe = root / f".llmtap-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ArchiveError(f"{flag} {target.display}: cannot write there ({exc.strerror or exc}); "
                               f"give a folder you can write, e.g. {flag} ~/llmtap-archive") from None
        return
    bucket = target.root.split("/", 1)[0]
    try:
        info = target.fs.get_file_info(bucket)
    except Exception as exc:
        raise ArchiveError(f"{flag} {target.display}: cannot reach S3 ({_one_line(exc)}); check "
                           "AWS_ENDPOINT_URL, the network and the credentials (AWS_ACCESS_KEY_ID / "
                           "AWS_SECRET_ACCESS_KEY or AWS_PROFILE)") from None
    if info.type == pafs.FileType.NotFound:
        raise ArchiveError(f"{flag} {target.display}: the bucket {bucket!r} does not exist; create it "
                           f"(aws s3 mb s3://{bucket}) or name another one")
    key = target.path(f".llmtap-probe-{secrets.token_hex(4)}")
    try:
        with target.fs.open_output_stream(key) as f:
            f.write(b"")
        target.fs.delete_file(key)
    except Exception as exc:
        raise ArchiveError(f"{flag} {target.display}: cannot write to the bucket ({_one_line(exc)}); "
                           "check the credentials' permissions (s3:PutObject, s3:DeleteObject)") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300]


@dataclass
class Result:
    calls: int = 0  # written in this run
    attempts: int = 0
    sessions: int = 0
    files: list[str] = field(default_factory=list)
    already: int = 0  # candidates some earlier run had archived
    deleted: int = 0
    compacted: tuple[int, int] | None = None  # the DB file's bytes before and after its rewrite

    def as_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "attempts": self.attempts, "sessions": self.sessions, "files": self.files,
                "already": self.already, "deleted": self.deleted}


Progress = Callable[[str, int, int], None]


def instance_id(con: duckdb.DuckDBPyConnection) -> str:
    """This DB's name in archive file names, made on first use and kept in the file."""
    from llmtap.recorder.schema import transaction

    con.execute("CREATE TABLE IF NOT EXISTS _archive_instance (id VARCHAR NOT NULL, made_at TIMESTAMPTZ "
                "DEFAULT now())")
    row = con.execute("SELECT id FROM _archive_instance ORDER BY made_at LIMIT 1").fetchone()
    if row:
        return str(row[0])
    made = secrets.token_hex(6)
    with transaction(con):
        con.execute("INSERT INTO _archive_instance (id) VALUES (?)", [made])
    row = con.execute("SELECT id FROM _archive_instance ORDER BY made_at LIMIT 1").fetchone()
    return str(row[0]) if row else made


def _files(target: Target, table: str, day: str, instance: str) -> dict[str, str]:
    """name -> path of this instance's Parquet files of `table` for `day`."""
    from pyarrow import fs as pafs

    sel = pafs.FileSelector(target.path(table, f"date={day}"), allow_not_found=True)
    out: dict[str, str] = {}
    for info in target.fs.get_file_info(sel):
        if info.type == pafs.FileType.File and info.base_name.startswith(instance + "-") \
                and info.base_name.endswith(".parquet"):
            out[info.base_name] = info.path
    return out


def _ids_in(target: Target, paths: Iterable[str], column: str = "id") -> set[str]:
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for p in paths:
        ids.update(str(v) for v in pq.read_table(p, columns=[column], filesystem=target.fs).column(column).to_pylist())
    return ids


class _Writer:
    """Parquet files made locally by an in-memory DuckDB, then put in place on the target."""

    def __init__(self, target: Target) -> None:
        from llmtap.recorder.export import _writer

        self.target = target
        # For a folder, the temporary files sit in it: the move into place is a rename.
        base = Path(target.root) if target.local else None
        self.tmp = Path(tempfile.mkdtemp(prefix=".llmtap-archive-", dir=base))
        self.db = _writer(self.tmp)

    def close(self) -> None:
        self.db.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def write(self, rows: duckdb.DuckDBPyRelation, dest: str, expect: int | None = None, also: Any = None) -> int:
        """COPY `rows` (and the Arrow table `also`, its columns matched by name) to a local file,
        then put it at `dest` whole and check what landed (the rows COPY wrote, and `expect`
        when given). Returns the number of rows."""
        import pyarrow.parquet as pq

        from llmtap.recorder.export import _quoted, _Rows

        local = self.tmp / "part.parquet"
        self.db.register("rows", _Rows(rows))
        query = "SELECT * FROM rows"
        if also is not None:
            self.db.register("also", also)
            query += " UNION ALL BY NAME SELECT * FROM also"
        try:
            row = self.db.execute(f"COPY ({query}) TO {_quoted(local)} (FORMAT parquet, "
                                  "COMPRESSION zstd)").fetchone()
            written = int(row[0]) if row else 0
        finally:
            self.db.unregister("rows")
            if also is not None:
                self.db.unregister("also")
        size = local.stat().st_size
        if self.target.local:
            final = Path(dest)
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(local, 0o600)
            with open(local, "rb") as f:
                os.fsync(f.fileno())  # durable before the rename makes it count as archived
            os.replace(local, final)
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        else:
            with open(local, "rb") as src, self.target.fs.open_output_stream(dest) as out:
                shutil.copyfileobj(src, out, 8 << 20)
            local.unlink()
        info = self.target.fs.get_file_info(dest)
        rows_there = pq.read_metadata(dest, filesystem=self.target.fs).num_rows
        want = written if expect is None else expect
        if info.size != size or rows_there != want or written != want:
            raise ArchiveError(f"{dest}: the stored file does not match what was written "
                               f"({info.size} bytes and {rows_there} rows, expected {size} and {want})")
        return written


def _day_of(table_cols: list[tuple[str, str]]) -> str | None:
    for name, typ in table_cols:
        if typ.startswith("TIMESTAMP"):
            return name
    return None


def archive(cursor: Callable[[], duckdb.DuckDBPyConnection], target: Target, *, older_than: str | None = None,
            delete: bool = False, keep: str | None = None, in_progress: Callable[[], Iterable[str]] | None = None,
            progress: Progress | None = None, on_writer: Callable[[Callable[[], None]], None] | None = None,
            flag: str = "--to") -> Result:
    """Archive the finished calls (those started before `older_than`, if given) to `target`.
    Then, with `delete`, remove from the DB every candidate call the archive holds; with
    `keep`, those started before `keep` only. `cursor()` gives a new cursor of the recorder's
    database; `on_writer(fn)` runs fn on the writer's thread and waits (the index cleanup).
    Raises ArchiveError with nothing deleted when the target fails."""
    if not _running.acquire(blocking=False):
        raise ArchiveError("an archive is already running in this llmtap; wait for it to finish")
    try:
        return _archive(cursor, target, older_than, delete, keep, in_progress, progress, on_writer, flag)
    finally:
        _running.release()


def _archive(cursor: Callable[[], duckdb.DuckDBPyConnection], target: Target, older_than: str | None,
             delete: bool, keep: str | None, in_progress: Callable[[], Iterable[str]] | None,
             progress: Progress | None, on_writer: Callable[[Callable[[], None]], None] | None,
             flag: str) -> Result:
    import duckdb

    check(target, flag)
    result = Result()
    con = cursor()
    try:
        instance = instance_id(con)
        con.execute("BEGIN TRANSACTION READ ONLY")  # one snapshot for the ids and every file
        try:
            busy = set(in_progress() if in_progress else ())
            where, args = FINISHED, []
            if older_than:
                where += " AND started_at < CAST(? AS TIMESTAMPTZ)"
                args.append(older_than)
            rows = con.execute(f"SELECT id, strftime(timezone('UTC', started_at), '%Y-%m-%d'), "
                               f"started_at < CAST(? AS TIMESTAMPTZ) FROM calls WHERE {where} ORDER BY id",
                               [keep or "infinity", *args]).fetchall()
            by_day: dict[str, list[str]] = {}
            old_enough: set[str] = set()
            for cid, day, old in rows:
                if cid in busy:
                    continue
                by_day.setdefault(day, []).append(cid)
                if old:
                    old_enough.add(cid)
            archived: set[str] = set()
            plan: list[tuple[str, list[str]]] = []
            try:
                for day, ids in by_day.items():
                    calls_files = _files(target, "calls", day, instance)
                    for name, path in _files(target, "attempts", day, instance).items():
                        if name not in calls_files:
                            target.fs.delete_file(path)  # a dead run's leftover, see the docstring
                    there = _ids_in(target, calls_files.values())
                    todo = [i for i in ids if i not in there]
                    archived.update(i for i in ids if i in there)
                    for s in range(0, len(todo), ROWS_PER_FILE):
                        plan.append((day, todo[s:s + ROWS_PER_FILE]))
            except ArchiveError:
                raise
            except Exception as exc:
                raise ArchiveError(f"{flag} {target.display}: cannot read the archive ({_one_line(exc)})") from None
            result.already = len(archived)
            total = sum(len(ids) for _, ids in plan)
            if progress:
                progress("archiving", 0, total)
            writer = _Writer(target)
            try:
                done = 0
                for day, ids in plan:
                    name = f"{instance}-{ids[0]}-{ids[-1]}.parquet"
                    # The id range lets DuckDB skip every row group outside it (ids sort by
                    # time, as rows are appended); the list then picks the slice's calls.
                    span = [ids[0], ids[-1], ids]
                    n_att = writer.write(con.sql("SELECT * FROM attempts WHERE call_id BETWEEN ? AND ? "
                                                 "AND call_id IN (SELECT unnest(?)) ORDER BY call_id, n",
                                                 params=span),
                                         target.path("attempts", f"date={day}", name))
                    writer.write(con.sql("SELECT * FROM calls WHERE id BETWEEN ? AND ? "
                                         "AND id IN (SELECT unnest(?)) ORDER BY id", params=span),
                                 target.path("calls", f"date={day}", name), len(ids))
                    archived.update(ids)
                    result.calls += len(ids)
                    result.attempts += int(n_att)
                    result.files.append(target.url(target.path("calls", f"date={day}", name)))
                    done += len(ids)
                    if progress:
                        progress("archiving", done, total)
                result.sessions = _archive_sessions(con, target, writer, instance)
            except ArchiveError:
                raise
            except duckdb.Error as exc:
                raise ArchiveError(f"archive to {target.display} failed reading the DB: {_one_line(exc)}") from None
            except Exception as exc:
                raise ArchiveError(f"{flag} {target.display}: writing the archive failed ({_one_line(exc)}); "
                                   "nothing was deleted, and the next run writes what is missing") from None
            finally:
                writer.close()
        finally:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass
        if delete or keep:
            doomed = sorted(i for i in archived if (keep is None or i in old_enough))
            result.deleted = delete_calls(cursor, doomed, progress, on_writer)
    finally:
        con.close()
    return result


def _archive_sessions(con: duckdb.DuckDBPyConnection, target: Target, writer: _Writer, instance: str) -> int:
    """Sessions, when the DB has that table, by the day of their first timestamp column (their
    start), keyed by their first column, never deleted locally. A session is written once its
    last call ended on a day that is over (UTC; `ended_at`, where the table has it). One that
    went on after it was archived (a named session resumed days later, a task over midnight)
    has changed (`calls`, `last_call_id`): its day's files of this instance are then written
    again as one, holding every session of that day as it is now, and the old ones removed;
    a run that dies in between leaves a row twice, which the next run's rewrite mends."""
    cols = [(str(r[0]), str(r[1])) for r in con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = 'main' "
        "AND table_name = 'sessions' ORDER BY ordinal_position").fetchall()]
    when = _day_of(cols)
    if not cols or when is None:
        return 0
    names = [n for n, _ in cols]
    key = names[0]
    marks: list[str] = [m for m in ("calls", "last_call_id") if m in names]
    settled = "ended_at" if "ended_at" in names else when
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")

    def day(column: str) -> str:
        return f"strftime(timezone('UTC', \"{column}\"), '%Y-%m-%d')"

    mark_sql = "".join(f', CAST("{m}" AS VARCHAR)' for m in marks)
    local: dict[str, dict[str, tuple]] = {}
    for k, d, done, *mark in con.execute(
            f'SELECT CAST("{key}" AS VARCHAR), {day(when)}, {day(settled)}{mark_sql} FROM sessions '
            f'WHERE "{when}" IS NOT NULL').fetchall():
        if d < today:
            local.setdefault(d, {})[k] = (done, *mark)
    written = 0
    for d, here in sorted(local.items()):
        old = _files(target, "sessions", d, instance)
        there = _marks_in(target, old.values(), key, marks)
        ready = {k for k, (done, *_) in here.items() if done < today}
        changed = any(k in there and tuple(m) != there[k] for k, (_, *m) in here.items() if k in ready)
        twice = any(v is None for v in there.values())
        if changed or twice:
            # This day again, whole: what was archived goes on being archived, as it is now.
            todo = sorted(ready | (set(there) & set(here)))
        else:
            todo = sorted(k for k in ready if k not in there)
        if not todo:
            continue
        # Sessions archived under this instance that this DB does not hold (a copy of the DB
        # archiving beside it, a DB restored from an older backup) go into the rewrite as they
        # were: rewriting a day must never drop a row from the archive.
        kept = _rows_of(target, old.values(), key, set(there) - set(here)) if changed or twice else None
        keys = sorted(todo + (kept.column(key).to_pylist() if kept is not None else []))
        name = f"{instance}-{keys[0]}-{keys[-1]}.parquet"
        writer.write(con.sql(f'SELECT * FROM sessions WHERE CAST("{key}" AS VARCHAR) IN (SELECT unnest(?)) '
                             f'ORDER BY "{key}"', params=[todo]),
                     target.path("sessions", f"date={d}", name), len(keys), also=kept)
        if changed or twice:
            for other, path in old.items():
                if other != name:
                    target.fs.delete_file(path)
        written += len(todo)
    return written


def _marks_in(target: Target, paths: Iterable[str], key: str, marks: list[str]) -> dict[str, tuple | None]:
    """key -> the change marks (`calls`, `last_call_id`, as text) of the sessions in these files;
    a key in more than one file (a rewrite a run did not finish) maps to None."""
    import pyarrow.parquet as pq

    out: dict[str, tuple | None] = {}
    for p in paths:
        table = pq.read_table(p, columns=[key, *marks], filesystem=target.fs)
        columns = [table.column(c).to_pylist() for c in (key, *marks)]
        for k, *mark in zip(*columns):
            k = str(k)
            value = tuple(None if v is None else str(v) for v in mark)
            out[k] = None if k in out else value
    return out


def _rows_of(target: Target, paths: Iterable[str], key: str, wanted: set[str]) -> Any:
    """The rows of these files whose `key` is in `wanted`, one per key (a rewrite a run did not
    finish left some twice), as an Arrow table; None when there are none."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not wanted:
        return None
    tables = [pq.read_table(p, filesystem=target.fs, partitioning=None) for p in paths]
    table = pa.concat_tables(tables, promote_options="permissive")
    table = table.set_column(table.schema.get_field_index(key), key, pc.cast(table.column(key), pa.string()))
    first: dict[str, int] = {}
    for i, k in enumerate(table.column(key).to_pylist()):
        if k in wanted:
            first.setdefault(k, i)
    return table.take(sorted(first.values())) if first else None


def delete_calls(cursor: Callable[[], duckdb.DuckDBPyConnection], ids: list[str], progress: Progress | None = None,
                 on_writer: Callable[[Callable[[], None]], None] | None = None) -> int:
    """Remove these (archived, finished) calls and their attempts, DELETE_BATCH per transaction;
    then drop the search-index chunks left empty and checkpoint. Returns the calls removed."""
    from llmtap.recorder.schema import transaction

    if not ids:
        return 0
    con = cursor()
    removed = 0
    try:
        for s in range(0, len(ids), DELETE_BATCH):
            part = ids[s:s + DELETE_BATCH]
            with transaction(con):
                con.execute("DELETE FROM attempts WHERE call_id IN (SELECT unnest(?))", [part])
                row = con.execute(f"DELETE FROM calls WHERE id IN (SELECT unnest(?)) AND {FINISHED}",
                                  [part]).fetchone()
            removed += int(row[0]) if row else 0
            if progress:
                progress("deleting", min(s + DELETE_BATCH, len(ids)), len(ids))

        def prune() -> None:
            import duckdb

            prune_index(con)
            try:
                # Folds the deletes into the file so DuckDB can reuse the space. On the writer's
                # thread no write of its own is open; a reader's may be, and then DuckDB's own
                # automatic checkpoint does it later.
                con.execute("CHECKPOINT")
            except duckdb.TransactionException:
                pass

        if on_writer is None:
            prune()
        else:
            on_writer(prune)
    finally:
        con.close()
    return removed


def prune_index(con: duckdb.DuckDBPyConnection) -> None:
    """Drop the search chunks no call is left in, with their words; recount the others. The
    index only ever rules calls out, so a chunk that lost some calls stays right as it is."""
    from llmtap.recorder.schema import transaction

    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                        "WHERE table_schema = 'main'").fetchall()}
    if "_search_chunks" not in tables:
        return
    with transaction(con):
        con.execute("CREATE TEMP TABLE _counts AS SELECT c.chunk, (SELECT count(*) FROM calls "
                    "WHERE id > c.after_id AND id <= c.last_id) AS n FROM _search_chunks c")
        try:
            con.execute("DELETE FROM _search_terms WHERE chunk IN (SELECT chunk FROM _counts WHERE n = 0)")
            con.execute("DELETE FROM _search_chunks WHERE chunk IN (SELECT chunk FROM _counts WHERE n = 0)")
            con.execute("UPDATE _search_chunks SET calls = k.n FROM _counts k WHERE k.chunk = _search_chunks.chunk "
                        "AND k.n <> _search_chunks.calls")
        finally:
            con.execute("DROP TABLE _counts")


def compact(db: Path) -> tuple[int, int]:
    """Rewrite the DB file without the space deleted rows held (DuckDB reuses freed blocks
    but does not give them back to the file system). Only with the file closed by everyone
    else. Returns (bytes before, bytes after)."""
    import duckdb

    db = Path(db).absolute()
    before = db.stat().st_size
    new = db.with_name(db.name + ".compact")
    for leftover in (new, new.with_name(new.name + ".wal")):
        leftover.unlink(missing_ok=True)
    con = duckdb.connect(config={"autoload_known_extensions": False, "autoinstall_known_extensions": False})
    try:
        con.execute("ATTACH ? AS old", [str(db)])
        con.execute("CHECKPOINT old")
        con.execute("ATTACH ? AS fresh", [str(new)])
        con.execute("COPY FROM DATABASE old TO fresh")
        con.execute("DETACH fresh")
        con.execute("DETACH old")
    except Exception:
        new.unlink(missing_ok=True)
        raise
    finally:
        con.close()
    os.chmod(new, 0o600)
    with open(new, "rb") as f:
        os.fsync(f.fileno())
    os.replace(new, db)
    db.with_name(db.name + ".wal").unlink(missing_ok=True)  # checkpointed above: nothing in it
    return before, db.stat().st_size


class ArchiveService:
    """`llmtap run --archive-to T --archive-every 1h --keep 30d`: a thread of the recorder's
    process archives every interval (the first one interval after start) and then removes the
    archived calls older than --keep. The writer only runs the index cleanup, between batches."""

    def __init__(self, options: Mapping[str, Any], recorder: Any) -> None:
        import logging

        self.log = logging.getLogger("llmtap.recorder")
        self.recorder = recorder
        self.to = str(options["to"])
        self.every_s = float(options.get("every_s") or 3600.0)
        self.keep = options.get("keep")
        self.target: Target | None = None  # opened on the first run: pyarrow loads off the start-up
        self.runs = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="llmtap-archive", daemon=True)
        self._thread.start()

    def committed(self, calls: list[dict[str, Any]], attempts: list[dict[str, Any]]) -> None:
        pass  # the archive reads committed rows from the file itself, on its schedule

    def close(self) -> None:
        self._stop.set()
        # A run in progress finishes its file (its calls are then archived) or is left: its
        # uploads are whole or absent, and nothing of it was deleted yet.
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.run_once()

    def run_once(self) -> Result | None:
        rec = self.recorder
        try:
            if self.target is None:
                self.target = open_target(self.to, flag="--archive-to")
            keep = parse_age(self.keep, "--keep") if self.keep else None
            result = archive(rec.cursor, self.target, keep=keep, in_progress=rec.in_progress,
                             on_writer=rec.on_writer, flag="--archive-to")
        except Exception as exc:
            text = str(exc) if isinstance(exc, ArchiveError) else f"archive failed: {_one_line(exc)}"
            if text != self.last_error:  # said once per kind of failure, not every hour
                self.log.error("llmtap recorder: %s; recording goes on, tried again in %.0f s", text, self.every_s)
            self.last_error = text
            return None
        self.runs += 1
        self.last_error = None
        if result.calls or result.deleted:
            self.log.info("llmtap recorder: archived %d calls to %s, removed %d archived calls from the DB",
                          result.calls, self.target.display, result.deleted)
        return result
