#!/usr/bin/env python3
"""Hostile-case benchmark: what a real `llmtap run` loses, holds and leaks when traffic and disk
turn against it. Prints one small table per case, with the figures as they are (not as hoped):

  (a) full disk: the database on a tmpfs of a few MB (mounted here; needs root), filled up; N
      calls through the gateway; space freed; then calls made, rows recorded, the `dropped`
      count, and lost = made - rows - counted (goal 0), spool imported on the next start first;
  (b) memory: the recorder process's peak RSS (VmHWM) idle, after a gzip answer that expands
      to 500 MB, and after a 100 MB request; each as a ratio of the idle figure;
  (c) planted keys: distinct keys in request headers, the query, the request body and an error
      the upstream echoes; then every text column of every table, the raw database files, the
      spool (from (a), when one was written) and a JSONL and a Parquet export are searched for
      each key (goal 0 hits).

Everything runs on 127.0.0.1 against the fake provider of the test suite; every process and
mount it makes is removed at the end, whatever happens.
    .venv/bin/python scripts/bench_hostile.py              # about a minute
    .venv/bin/python scripts/bench_hostile.py --only b     # one case
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

import duckdb  # noqa: E402
import httpx  # noqa: E402

from bench_proxy import free_port, start_fake, wait_port  # noqa: E402  (the proxy bench's helpers)
from fakeprovider import FakeProvider, status  # noqa: E402

PY = sys.executable
MiB = 1 << 20
CHAT = {"model": "bench-model", "messages": [{"role": "user", "content": "hi"}]}


# -- processes -----------------------------------------------------------------------------------
class Llmtap:
    """`llmtap run` on the gateway only, its stderr kept in a file for the report."""

    def __init__(self, tmp: Path, name: str, providers: dict[str, str], db: Path, *extra: str) -> None:
        rules = tmp / f"{name}.rules.yaml"
        rules.write_text("providers:\n" + "".join(f"  {p}: {{base_url: '{url}', api: openai}}\n"
                                                  for p, url in providers.items()))
        self.db = db
        self.port = free_port()
        self.log = tmp / f"{name}.stderr"
        self._log = self.log.open("w")
        self.proc = subprocess.Popen(
            [PY, "-m", "llmtap", "run", "-q", "--db", str(db), "--rules", str(rules), "--confdir", str(tmp / "ca"),
             "--proxy", "off", "--gateway", f"127.0.0.1:{self.port}", *extra],
            stdout=subprocess.DEVNULL, stderr=self._log)
        wait_port(self.port, self.proc)
        self.url = f"http://127.0.0.1:{self.port}"
        self.recorder = _recorder_pid(self.proc.pid)

    def stop(self) -> int | None:
        """SIGTERM (everything handed over is committed), as a service manager stops it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def errors(self) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines()
                if not line.startswith(("llmtap ", "       "))]


def _recorder_pid(proxy_pid: int) -> int | None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{proxy_pid}/task").iterdir():
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in children:
                try:
                    if b"llmtap.recorder.process" in Path(f"/proc/{child}/cmdline").read_bytes():
                        return int(child)
                except OSError:
                    pass
        time.sleep(0.05)
    return None


def vm_hwm(pid: int | None) -> int | None:
    """Peak resident memory of a process in bytes (the kernel's high-water mark)."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Watch:
    """The recorder's live events, read from where it was opened on, so that no batch is
    missed between a call and the wait for it."""

    def __init__(self, db: Path) -> None:
        from llmtap.recorder.reader import open_reader

        self.reader = open_reader(db)
        self.seq = self.reader.latest_seq()

    def wait(self, n: int, timeout: float = 60) -> int:
        """Until the recorder says it handled `n` more finished calls (written, spooled or
        lost: it publishes after each batch either way); how many it said."""
        seen, deadline = 0, time.monotonic() + timeout
        while seen < n and time.monotonic() < deadline:
            self.seq, events = self.reader.events_after(self.seq, 0.5)
            seen += sum(1 for e in events if e["kind"] == "finished")
        return seen

    def close(self) -> None:
        self.reader.close()


# -- (a) full disk ---------------------------------------------------------------------------------
def case_full_disk(tmp: Path, calls: int, keys: dict[str, str], found: dict) -> list[tuple[str, object]]:
    if os.geteuid() != 0:
        return [("skipped", "needs root to mount a tmpfs")]
    mnt = Path(tempfile.mkdtemp(prefix="llmtap-full-"))
    mounted = False
    fake = run = None
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mnt)], check=True)
        mounted = True
        fake, fport = start_fake("--bench")
        db = mnt / "full.duckdb"
        run = Llmtap(tmp, "full", {"fake": f"http://127.0.0.1:{fport}/v1"}, db)
        watch = Watch(db)
        with httpx.Client(timeout=30) as client:
            client.post(f"{run.url}/fake/chat/completions", json=CHAT)  # the file exists and holds a row
        watch.wait(1)
        filler = mnt / "filler"
        with filler.open("wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        made = 1
        failed = 0
        with httpx.Client(timeout=30) as client:
            for _ in range(calls):
                try:
                    r = client.post(f"{run.url}/fake/chat/completions?key={keys['query']}",
                                    headers={"authorization": f"Bearer {keys['header_bearer']}",
                                             "x-api-key": keys["header_x_api_key"]},
                                    json={**CHAT, "api_key": keys["body"]})
                    failed += r.status_code != 200
                except httpx.HTTPError:
                    failed += 1
                made += 1
        handled = watch.wait(calls, timeout=30)
        filler.unlink()
        # One more batch after space is back, so a recorder that retries gets its chance.
        with httpx.Client(timeout=30) as client:
            client.post(f"{run.url}/fake/chat/completions", json=CHAT)
        made += 1
        watch.wait(1, timeout=30)
        watch.close()
        code = run.stop()
        errors = run.errors()
        spool = db.with_name(db.name + ".spool.jsonl")
        spool_bytes = spool.read_bytes() if spool.exists() else None
        planted = {name: keys[name] for name in ("header_bearer", "header_x_api_key", "query", "body")}
        found["spool (a)"] = (None if spool_bytes is None else
                              {name: spool_bytes.count(k.encode()) for name, k in planted.items()})
        rows, in_progress, counted, note = _count_after_restart(db)
        try:
            found["database (a)"] = _scan_db(db, planted)
        except Exception as exc:
            print(f"(a) cannot scan the database for keys: {exc}", file=sys.stderr)
        lost = made - rows - counted
        return [
            ("calls made", made), ("client saw a failure", failed),
            ("recorder said it handled (while full)", f"{handled} of {calls}"),
            ("spool written", f"{len(spool_bytes)} bytes" if spool_bytes is not None else "no"),
            ("rows recorded (after the spool import)", rows), ("rows left in progress", in_progress),
            ("counted in `dropped`", counted), ("LOST (made - rows - counted)", lost),
            ("llmtap run exit code", code), ("first error it printed", errors[0][:110] if errors else "-"),
            ("reading the file afterwards", note),
        ]
    finally:
        if run is not None:
            run.stop()
        if fake is not None:
            fake.terminate()
            fake.wait(15)
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)


def _count_after_restart(db: Path) -> tuple[int, int, int, str]:
    """(finished rows, in-progress rows, dropped count, what went wrong) once a new recorder
    started on the file (it imports the spool), as the next `llmtap run` would."""
    from llmtap.recorder.recorder import Recorder

    note = "ok"
    try:
        rec = Recorder(db, serve=False, helpers=0)
        rec.start()
        rec.close()
    except Exception as exc:  # reported, not hidden: the figure below is then what the file holds
        note = f"a new recorder could not start: {type(exc).__name__}: {str(exc)[:80]}"
    try:
        with duckdb.connect(str(db), read_only=True) as con:
            rows = con.execute("SELECT count(*) FILTER (status IS NOT NULL), count(*) FILTER (status IS NULL) "
                               "FROM calls").fetchone()
            counted = con.execute("SELECT coalesce(sum(count), 0) FROM dropped").fetchone()[0]
        return int(rows[0]), int(rows[1]), int(counted), note
    except Exception as exc:
        return 0, 0, 0, f"cannot read the file: {type(exc).__name__}: {str(exc)[:80]}"


# -- (b) memory --------------------------------------------------------------------------------------
def gzip_zeros(total: int) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(MiB)
    return b"".join([comp.compress(block) for _ in range(total // MiB)] + [comp.flush()])


def case_memory(tmp: Path) -> list[tuple[str, object]]:
    bomb = gzip_zeros(500 * MiB)
    with FakeProvider() as fake:
        db = tmp / "memory.duckdb"
        run = Llmtap(tmp, "memory", {"fake": f"{fake.url}/v1"}, db)
        watch = Watch(db)
        try:
            with httpx.Client(timeout=120) as client:
                client.post(f"{run.url}/fake/chat/completions", json=CHAT)
                watch.wait(1)
                idle = vm_hwm(run.recorder)
                fake.script(status(200, body=bomb, headers={"content-type": "application/json",
                                                            "content-encoding": "gzip"}))
                got = hashlib.sha256()
                with client.stream("POST", f"{run.url}/fake/chat/completions", json=CHAT) as r:
                    for piece in r.iter_raw():
                        got.update(piece)
                intact = got.digest() == hashlib.sha256(bomb).digest()
                watch.wait(1, timeout=120)
                after_bomb = vm_hwm(run.recorder)
                big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "q" * (100 * MiB)}]}).encode()
                client.post(f"{run.url}/fake/chat/completions", content=big,
                            headers={"content-type": "application/json"})
                (req,) = fake.requests[-1:]
                forwarded = len(req.body) == len(big) and req.body == big
                watch.wait(1, timeout=120)
                after_big = vm_hwm(run.recorder)
        finally:
            watch.close()
            run.stop()
    files = sum(p.stat().st_size for p in tmp.glob("memory.duckdb*") if p.is_file())

    def mib(n: int | None) -> str:
        return "?" if n is None else f"{n / MiB:.0f} MiB"

    def ratio(n: int | None) -> str:
        return "?" if n is None or not idle else f"{n / idle:.2f}x"

    return [
        ("idle recorder, peak RSS", mib(idle)),
        (f"after a {len(bomb) >> 10} KiB gzip answer of 500 MiB", f"{mib(after_bomb)}  ({ratio(after_bomb)} idle)"),
        ("  client got every byte as sent", "yes" if intact else "NO"),
        ("after a 100 MiB request body", f"{mib(after_big)}  ({ratio(after_big)} idle)"),
        ("  upstream got the whole request", "yes" if forwarded else "NO"),
        ("database files afterwards", mib(files)),
    ]


# -- (c) planted keys --------------------------------------------------------------------------------
def plant_keys() -> dict[str, str]:
    """Distinct keys, one per place, in the shapes real providers issue."""
    def tail(n: int) -> str:
        return secrets.token_urlsafe(n)[:n].replace("-", "x").replace("_", "y")

    return {
        "header_bearer": "sk-proj-" + tail(40),
        "header_x_api_key": "sk-ant-api03-" + tail(40),
        "header_goog": "AIza" + tail(35),
        "query": "AIza" + tail(35),
        "body": "sk-" + tail(40),
        "echoed_error": "sk-proj-" + tail(40),
    }


def case_keys(tmp: Path, keys: dict[str, str], found: dict) -> list[tuple[str, object]]:
    with FakeProvider() as fake:
        db = tmp / "keys.duckdb"
        run = Llmtap(tmp, "keys", {"fake": f"{fake.url}/v1"}, db)
        watch = Watch(db)
        try:
            with httpx.Client(timeout=30) as client:
                url = f"{run.url}/fake/chat/completions"
                client.post(url, json=CHAT, headers={"authorization": f"Bearer {keys['header_bearer']}",
                                                     "x-api-key": keys["header_x_api_key"],
                                                     "x-goog-api-key": keys["header_goog"]})
                client.post(f"{url}?key={keys['query']}", json=CHAT)
                client.post(url, json={**CHAT, "api_key": keys["body"]})
                # An upstream that quotes the key it refused, as OpenAI did for years.
                fake.script(status(401, body={"error": {
                    "message": f"Incorrect API key provided: {keys['echoed_error']}. You can find your API key at "
                               "https://platform.openai.com/account/api-keys.", "type": "invalid_request_error",
                    "code": "invalid_api_key"}}))
                client.post(url, json=CHAT, headers={"authorization": f"Bearer {keys['echoed_error']}"})
            watch.wait(4)
            exports: dict[str, Path] = {}
            for fmt in ("jsonl", "parquet"):
                out = tmp / f"keys.{fmt}"
                r = subprocess.run([PY, "-m", "llmtap", "export", "--db", str(db), "--out", str(out)],
                                   capture_output=True, text=True, timeout=60)
                if r.returncode == 0:
                    exports[fmt] = out
                else:
                    print(f"(c) llmtap export --format {fmt} failed: {r.stderr.strip()[:200]}", file=sys.stderr)
        finally:
            watch.close()
            run.stop()
    found["database (c)"] = _scan_db(db, keys)
    raw = b"".join(p.read_bytes() for p in tmp.glob("keys.duckdb*") if p.is_file())
    found["db files' bytes (c)"] = {name: raw.count(k.encode()) for name, k in keys.items()}
    if "jsonl" in exports:
        text = exports["jsonl"].read_bytes()
        found["export jsonl (c)"] = {name: text.count(k.encode()) for name, k in keys.items()}
    if "parquet" in exports:
        found["export parquet (c)"] = _scan_parquet(exports["parquet"], keys)
    return []


def _scan_db(db: Path, keys: dict[str, str]) -> dict[str, int]:
    """Rows where each key appears, over every column of every table (as text)."""
    hits = {name: 0 for name in keys}
    where: dict[str, set[str]] = {name: set() for name in keys}
    with duckdb.connect(str(db), read_only=True) as con:
        tables = [t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        for table in tables:
            cols = [c for (c,) in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                                              [table]).fetchall()]
            for col in cols:
                for name, key in keys.items():
                    n = con.execute(f'SELECT count(*) FROM "{table}" WHERE CAST("{col}" AS VARCHAR) LIKE ?',
                                    [f"%{key}%"]).fetchone()[0]
                    if n:
                        hits[name] += n
                        where[name].add(f"{table}.{col}")
    for name, w in where.items():
        if w:
            _WHERE[name] = sorted(set(_WHERE.get(name, [])) | w)
    return hits


_WHERE: dict[str, list[str]] = {}


def _scan_parquet(path: Path, keys: dict[str, str]) -> dict[str, int]:
    hits = {name: 0 for name in keys}
    with duckdb.connect() as con:
        cols = [d[0] for d in con.execute("SELECT * FROM read_parquet(?) LIMIT 0", [str(path)]).description]
        for col in cols:
            for name, key in keys.items():
                hits[name] += con.execute(f'SELECT count(*) FROM read_parquet(?) WHERE CAST("{col}" AS VARCHAR) LIKE ?',
                                          [str(path), f"%{key}%"]).fetchone()[0]
    return hits


# -- report ------------------------------------------------------------------------------------------
def table(title: str, rows: list[tuple[str, object]]) -> None:
    print(f"\n{title}")
    width = max((len(k) for k, _ in rows), default=10)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def key_table(keys: dict[str, str], found: dict) -> None:
    places = list(found)
    widths = [max(len(p), 8) + 2 for p in places]
    print("\n(c) planted keys: hits per place (goal: 0 everywhere; - not planted there)")
    print(f"  {'key planted in':<18}" + "".join(f"{p:>{w}}" for p, w in zip(places, widths)))
    total = 0
    for name in keys:
        cells = []
        for place in places:
            counts = found[place]
            n = None if counts is None else counts.get(name)
            cells.append("no spool" if counts is None else "-" if n is None else str(n))
            total += n or 0
        print(f"  {name:<18}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    for name, cols in _WHERE.items():
        print(f"    {name} found in: {', '.join(cols)}")
    print(f"  total hits: {total}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=100, help="calls made while the disk is full (default %(default)s)")
    ap.add_argument("--only", choices=("a", "b", "c"), action="append",
                    help="run only this case (repeatable); (c) scans the spool only when (a) ran")
    a = ap.parse_args()
    cases = set(a.only or ("a", "b", "c"))
    tmp = Path(tempfile.mkdtemp(prefix="llmtap-hostile-"))
    keys = plant_keys()
    found: dict = {}
    t0 = time.monotonic()
    try:
        if "a" in cases:
            print(f"(a) full disk: {a.calls} calls with the database on a full tmpfs ...", file=sys.stderr)
            table(f"(a) full disk ({a.calls} calls while full)", case_full_disk(tmp, a.calls, keys, found))
        if "b" in cases:
            print("(b) memory: a gzip bomb and a 100 MiB request ...", file=sys.stderr)
            table("(b) recorder memory (VmHWM of the recorder process)", case_memory(tmp))
        if "c" in cases:
            print("(c) planted keys ...", file=sys.stderr)
            case_keys(tmp, keys, found)
        if found and ("c" in cases or "a" in cases):
            key_table(keys, found)
        print(f"\n({time.monotonic() - t0:.0f} s)")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
