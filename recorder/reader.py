"""One way to read the record, wherever it is: held by a running proxy or a file at rest.

`open_reader(db)` attaches to the `llmtap run` that holds the file (through its endpoint)
or opens the file read-only when nobody does. A user never sees DuckDB's lock error.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import duckdb

from llmtap.recorder.endpoint import READ_CONFIG, RowStream, discovery_path, jsonable, read_only_query
from llmtap.recorder.export import ExportError
from llmtap.recorder.export import export as export_calls

if TYPE_CHECKING:
    from llmtap.recorder.recorder import Recorder


class ReaderError(Exception):
    """The record cannot be read; the message says why and what to do."""


class Reader(Protocol):
    """What the CLI and the terminal UI read through, wherever the record is.

    `query` runs one read statement (SELECT / WITH / DESCRIBE / FROM) and returns column names
    and rows as Python values (datetimes, bytes) whichever the reader. `events_after` long-polls
    the live events `{"seq", "kind": "started"|"progress"|"finished"|"reset", "id"}`;
    `partial` is the growing response of a call still in progress, None otherwise.
    """

    kind: str  # "local" | "remote" | "inprocess"

    def query(self, sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]: ...
    def events_after(self, seq: int, timeout: float) -> tuple[int, list[dict]]: ...
    def latest_seq(self) -> int: ...
    def partial(self, call_id: str) -> dict | None: ...
    def export(self, out: Path, fmt: str = "parquet", *, since: str | None = None, until: str | None = None,
               model: str | None = None, where_sql: str | None = None, params: list | None = None,
               progress: Callable[[int, int], None] | None = None, table: str = "calls") -> int: ...
    def close(self) -> None: ...


class StreamingReader(Reader, Protocol):
    """Every reader open_reader returns also streams a result (`llmtap sql`); the UI's own
    reader protocol (tui/query.py) leaves it out, as the UI never needs it."""

    def stream(self, sql: str, params: list | None = None, limit: int | None = None) -> Rows: ...


class Rows(Protocol):
    """A streamed result (`Reader.stream`): iterate for lists of rows, in batches, as Python
    values whichever the reader; `truncated` (known once iterated) says the query had more
    rows than the limit. Close it when not read to the end."""

    columns: list[str]
    types: list[str]

    @property
    def truncated(self) -> bool: ...

    def __iter__(self) -> Iterator[list[tuple]]: ...
    def close(self) -> None: ...


class _LocalRows:
    """A RowStream whose errors (the SQL's own, mid-result) read as the endpoint's would.

    DuckDB does not see Ctrl-C while it computes, and Python raises KeyboardInterrupt only
    once it returns: each step runs on a helper thread while this one waits, so that Ctrl-C
    interrupts the query at once (as it does through the endpoint)."""

    def __init__(self, cur: duckdb.DuckDBPyConnection, sql: str, params: list | None, limit: int | None) -> None:
        self.cur = cur
        try:
            self.rows = _interruptible(cur, lambda: RowStream(cur, sql, params, limit))
        except (ValueError, duckdb.Error) as exc:
            cur.close()
            raise ReaderError(str(exc)) from None
        except BaseException:
            cur.close()
            raise
        self.columns, self.types = self.rows.columns, self.rows.types

    @property
    def truncated(self) -> bool:
        return self.rows.truncated

    def __iter__(self) -> Iterator[list[tuple]]:
        batches = iter(self.rows)
        try:
            while True:
                batch = _interruptible(self.cur, lambda: next(batches, None))
                if batch is None:
                    return
                yield batch
        except duckdb.Error as exc:
            raise ReaderError(str(exc)) from None
        finally:
            self.close()

    def close(self) -> None:
        self.rows.close()
        self.cur.close()


def _interruptible(cur: duckdb.DuckDBPyConnection, step: Callable[[], Any]) -> Any:
    import threading

    box: list[Any] = []
    # An Event, not Thread.join(): a join cut short by Ctrl-C can later return while the
    # thread still runs (and the cursor is then closed under it).
    done = threading.Event()

    def run() -> None:
        try:
            box.append((True, step()))
        except BaseException as exc:
            box.append((False, exc))
        finally:
            done.set()

    try:
        # start() is inside: a Ctrl-C while it waits for the thread to begin must not leave
        # the query running while the cursor is closed under it.
        threading.Thread(target=run, name="llmtap-sql-local", daemon=True).start()
        done.wait()
    except KeyboardInterrupt:
        # An interrupt that comes before the query has begun is lost: repeat it until the
        # step ends.
        cur.interrupt()
        while not done.wait(0.05):
            cur.interrupt()
        raise
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_reader(db: Path, *, memory_limit: str | None = None) -> Reader:
    """A reader for `db`: through the `llmtap run` holding it, else the file itself.
    `memory_limit` (a DuckDB size, "200MB") bounds DuckDB's cache when the file is opened here."""
    db = Path(db).expanduser().absolute()
    remote = _attach(db)
    if remote is not None:
        return remote
    if not db.exists():
        raise ReaderError(f"no database at {db} yet: run `llmtap run` first (it records there), or pass --db PATH")
    try:
        return LocalReader(db, memory_limit=memory_limit)
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise ReaderError(
                f"{db} is held by another program that is not a running `llmtap run` (a DuckDB shell or "
                "script?). Close it and try again; while `llmtap run` records, llmtap reads through it."
            ) from None
        raise ReaderError(f"cannot open {db}: {exc}") from None


def _attach(db: Path) -> RemoteReader | None:
    info = _discover(db)
    if info is None:
        return None
    reader = RemoteReader(info["url"], info["token"], db)
    if not reader._serves(db):
        reader.close()
        return None
    return reader


def _discover(db: Path) -> dict | None:
    """The endpoint of the running `llmtap run` that holds `db`, as its discovery file says."""
    path = discovery_path(db)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not _pid_alive(int(info.get("pid", 0))):
        try:  # left behind by a killed proxy
            path.unlink()
        except OSError:
            pass
        return None
    return info


def _query(cur: duckdb.DuckDBPyConnection, sql: str, params: list | None) -> tuple[list[str], list[tuple]]:
    """Run one read statement on its own cursor, closed afterwards."""
    try:
        columns, _types, rows = read_only_query(cur, sql, params)
        return columns, rows
    except (ValueError, duckdb.Error) as exc:  # refused, or the SQL's own error: as the endpoint says it
        raise ReaderError(str(exc)) from None
    finally:
        cur.close()


class LocalReader:
    """The file opened read-only; nobody records into it meanwhile."""

    kind = "local"

    def __init__(self, db: Path, memory_limit: str | None = None) -> None:
        self.db = db
        self.memory_limit = memory_limit
        # The same limits as the endpoint's: SQL over llmtap's tables and no file at all.
        config = {**READ_CONFIG, **({"memory_limit": memory_limit} if memory_limit else {})}
        self.con = duckdb.connect(str(db), read_only=True, config=config)

    def query(self, sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]:
        return _query(self.con.cursor(), sql, params)

    def stream(self, sql: str, params: list | None = None, limit: int | None = None) -> Rows:
        return _LocalRows(self.con.cursor(), sql, params, limit)

    def events_after(self, seq: int, timeout: float) -> tuple[int, list[dict]]:
        time.sleep(timeout)  # nothing records into a file at rest
        return seq, []

    def latest_seq(self) -> int:
        return 0

    def partial(self, call_id: str) -> dict | None:
        return None

    def export(self, out: Path, fmt: str = "parquet", **kw: Any) -> int:
        if not self.memory_limit:
            return export_calls(self.con.cursor(), out, fmt, **kw)
        # An export sorts what it writes and a read-only file has nowhere to spill to: under
        # the browsing limit a big one fails for memory. Lifted for the export only.
        self.con.execute("RESET memory_limit")
        try:
            return export_calls(self.con.cursor(), out, fmt, **kw)
        finally:
            self.con.execute("SET memory_limit = ?", [self.memory_limit])

    def close(self) -> None:
        self.con.close()


class InProcessReader:
    """Inside the recording process (`llmtap run --tui`): cursors on the writer's database."""

    kind = "inprocess"

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def query(self, sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]:
        return _query(self.recorder.cursor(), sql, params)

    def stream(self, sql: str, params: list | None = None, limit: int | None = None) -> Rows:
        return _LocalRows(self.recorder.cursor(), sql, params, limit)

    def events_after(self, seq: int, timeout: float) -> tuple[int, list[dict]]:
        return self.recorder.hub.events_after(seq, timeout)

    def latest_seq(self) -> int:
        return self.recorder.hub.seq

    def partial(self, call_id: str) -> dict | None:
        return self.recorder.hub.partial(call_id)

    def export(self, out: Path, fmt: str = "parquet", **kw: Any) -> int:
        cur = self.recorder.cursor()
        try:
            return export_calls(cur, out, fmt, **kw)
        finally:
            cur.close()

    def close(self) -> None:
        pass


class _Unreachable(ReaderError):
    """The endpoint did not answer at all (as opposed to answering with an error)."""


class RemoteReader:
    """A running `llmtap run` holds the file: read through its local endpoint.

    Given the DB path, it follows the endpoint when the process serving it is replaced (a
    restarted proxy, or a recorder process the proxy started again): a call that finds the old
    endpoint gone is made once more on the new one, and the live events, which start again
    from zero there, say `reset`."""

    kind = "remote"

    def __init__(self, url: str, token: str, db: Path | None = None) -> None:
        self.db = db
        self._moved = False  # the endpoint changed since the last `events_after`
        self._connect(url, token)

    def _connect(self, url: str, token: str) -> None:
        import httpx

        self.url = url
        # The endpoint is plain HTTP on 127.0.0.1: there is no certificate to check, and loading
        # the CA bundle for one would cost every `llmtap sql` / `stats` ~0.2 s of start-up.
        self._client = httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"},
                                    timeout=httpx.Timeout(60.0, connect=5.0), trust_env=False,
                                    verify=not url.startswith("http://"))

    def _serves(self, db: Path) -> bool:
        try:
            health = self._get("/health")
        except ReaderError:
            return False
        return Path(health.get("db", "")) == db

    def _follow(self) -> bool:
        """Switch to the endpoint now serving the DB, if it is another one that answers."""
        if self.db is None:
            return False
        info = _discover(self.db)
        if info is None or info["url"] == self.url:
            return False
        old = (self.url, self._client)
        self._connect(info["url"], info["token"])
        if not self._serves(self.db):
            self._client.close()
            self.url, self._client = old
            return False
        old[1].close()
        self._moved = True
        return True

    def _again(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except _Unreachable:
            if not self._follow():
                raise
            return call()

    def _get(self, path: str, **params: Any) -> dict:
        return self._request("GET", path, params=params)

    def _request(self, method: str, path: str, **kw: Any) -> dict:
        import httpx

        try:
            r = self._client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise _Unreachable(f"the running llmtap at {self.url} does not answer: {exc}") from None
        return self._json(r)

    def _json(self, r: Any) -> dict:
        try:
            data = r.json()
        except ValueError:
            raise ReaderError(f"the running llmtap answered {r.status_code} without JSON") from None
        if r.status_code >= 400 and r.status_code != 404:
            raise ReaderError(data.get("error") or f"error {r.status_code}")
        return data

    def query(self, sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]:
        payload = {"sql": sql, "params": jsonable(list(params or []))}
        data = self._again(lambda: self._request("POST", "/query", json=payload))
        convert = [_FROM_JSON.get(t.split("(")[0]) for t in data.get("types") or [None] * len(data["columns"])]
        rows = [tuple(_unblob(v) if f is None or v is None else f(v) for f, v in zip(convert, row))
                for row in data["rows"]]
        return data["columns"], rows

    def stream(self, sql: str, params: list | None = None, limit: int | None = None) -> Rows:
        payload = {"sql": sql, "params": jsonable(list(params or [])), "limit": limit}
        return self._again(lambda: _RemoteRows(self, payload))

    def events_after(self, seq: int, timeout: float) -> tuple[int, list[dict]]:
        if not self._moved:
            try:
                # The server caps a long-poll at 30 s, well inside the client's 60 s read timeout.
                data = self._get("/live", after=seq, timeout=timeout)
                return data["seq"], data["events"]
            except _Unreachable:
                if not self._follow():
                    raise
        # A new endpoint numbers its events from zero: the reader must reload.
        self._moved = False
        latest = self.latest_seq()
        return latest, [{"seq": latest, "kind": "reset", "id": None}]

    def latest_seq(self) -> int:
        return int(self._again(lambda: self._get("/health")).get("seq", 0))

    def partial(self, call_id: str) -> dict | None:
        data = self._again(lambda: self._get("/partial", id=call_id))
        return None if "error" in data else data

    def export(self, out: Path, fmt: str = "parquet", *, progress: Callable[[int, int], None] | None = None,
               **kw: Any) -> int:
        import httpx

        payload = {"out": str(Path(out).expanduser().absolute()), "format": fmt, **kw}
        result: dict = {}
        try:
            with self._client.stream("POST", "/export", json=payload, timeout=None) as r:
                for line in r.iter_lines():
                    if not line:
                        continue
                    item = json.loads(line)
                    if "done" in item and progress:
                        progress(item["done"], item["total"])
                    elif "ok" in item:
                        result = item
        except httpx.HTTPError as exc:
            raise ReaderError(f"the running llmtap at {self.url} stopped answering: {exc}") from None
        if not result.get("ok"):
            raise ExportError(result.get("error") or "the running llmtap did not finish the export")
        return int(result["rows"])

    def close(self) -> None:
        self._client.close()


class _RemoteRows:
    """The endpoint's /sql stream, read line by line: one batch in memory at a time."""

    def __init__(self, reader: RemoteReader, payload: dict) -> None:
        import httpx

        self.reader = reader
        self.truncated = False
        # No read timeout: an aggregate over millions of calls may take a while to answer.
        self._cm = reader._client.stream("POST", "/sql", json=payload,
                                         timeout=httpx.Timeout(None, connect=5.0))
        try:
            self._r = self._cm.__enter__()
        except httpx.HTTPError as exc:
            raise _Unreachable(f"the running llmtap at {reader.url} does not answer: {exc}") from None
        try:
            if self._r.status_code != 200:
                self._r.read()
                reader._json(self._r)  # raises the endpoint's error
                raise ReaderError(f"the running llmtap answered {self._r.status_code} to /sql: is it an "
                                  "older llmtap? Restart `llmtap run`")
            self._lines = self._r.iter_lines()
            head = self._next()
            if "columns" not in head:
                raise ReaderError(head.get("error") or "the running llmtap sent no result")
        except httpx.HTTPError as exc:
            self.close()
            raise ReaderError(f"the running llmtap at {reader.url} stopped answering: {exc}") from None
        except BaseException:
            self.close()
            raise
        self.columns: list[str] = head["columns"]
        self.types: list[str] = head["types"]
        self._convert = [_FROM_JSON.get(t.split("(")[0]) for t in self.types]

    def _next(self) -> dict:
        import httpx

        try:
            for line in self._lines:
                if line:
                    return json.loads(line)
        except httpx.HTTPError as exc:
            raise ReaderError(f"the running llmtap at {self.reader.url} stopped answering: {exc}") from None
        raise ReaderError("the running llmtap stopped before the end of the result (did it stop?)")

    def __iter__(self) -> Iterator[list[tuple]]:
        try:
            while True:
                item = self._next()
                if "rows" in item and "end" not in item:
                    yield [tuple(_unblob(v) if f is None or v is None else f(v) for f, v in zip(self._convert, row))
                           for row in item["rows"]]
                elif item.get("end"):
                    self.truncated = bool(item.get("truncated"))
                    return
                else:
                    raise ReaderError(item.get("error") or "the running llmtap sent an unknown line")
        finally:
            self.close()

    def close(self) -> None:
        import httpx

        try:
            self._cm.__exit__(None, None, None)
        except httpx.HTTPError:
            pass  # the endpoint is gone already: nothing left to close


_FROM_JSON: dict[str, Callable[[Any], Any]] = {
    "TIMESTAMP WITH TIME ZONE": dt.datetime.fromisoformat,
    "TIMESTAMP": dt.datetime.fromisoformat,
    "DATE": dt.date.fromisoformat,
}


def _unblob(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"base64"}:
        import base64

        return base64.b64decode(value["base64"])
    return value
