#!/usr/bin/env python3
"""Recorder benchmark, each part against a baseline measured in the same run.

  --append N   rate of realistic records (4 KB request, 8 KB SSE response handed over as 40
               chunks, extraction included) through the Recorder when N are handed over at
               once, vs raw appender writes of the same finished rows (what DuckDB alone does);
               and through a recorder process, as `llmtap run` records
  --steady R   R calls/s handed over evenly for 4 s, as a proxy would: whether the writer keeps
               up (the most calls waiting at any moment, and how long after the last handover
               everything was committed; 250 ms plus one batch's work is keeping up)
  --big N      a generated N-call DB (scripts/make_big_db.py): bytes per call, `llmtap stats`
               time, `llmtap export` to Parquet time, vs a bare `SELECT count(*)` over it
  --kill N     N times each: a child hands over ~200 calls/s and is killed with SIGKILL at a
               random moment; the file must open, and records lost are counted against what the
               child had handed over. Two children: one holding the recorder in-process (what a
               killed recorder process loses: at most the 250 ms window), and one handing over to
               a recorder process as `llmtap run` does (what a killed proxy loses: the recorder
               process commits what it got and exits)

  --grown DB   6,000 of --append's calls into a copy of DB, a grown file (make one with
               scripts/make_big_db.py), vs into an empty file, --rounds K of each, alternating:
               whether a file holding months of calls makes recording slower (checkpoints, the
               search index); the rate and CPU per call, as grown / empty ratios of the medians

  --handoff N  the proxy's side of the hand-off, per call: N streamed calls as the relay emits them
               (a start, a response head, 20 chunks, the end: frozen events) queued and turned into
               the pickled frames the recorder process reads, vs the same values as bare tuples
               (the floor any typed hand-off is measured against); and one Chunk built with
               llmtap's fast init vs dataclasses' own frozen init

    .venv/bin/python scripts/bench_recorder.py --append 20000 --steady 5000 --big 1000000 --kill 20 --handoff 20000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmtap.recorder.events import Chunk, ResponseHead  # noqa: E402
from llmtap.recorder.process import RecorderProcess  # noqa: E402
from llmtap.recorder.record import Call, new_id, utcnow  # noqa: E402
from llmtap.recorder.recorder import Recorder  # noqa: E402

PY = sys.executable
REQUEST = json.dumps({"model": "gpt-4o", "stream": True, "messages": [
    {"role": "system", "content": "You are a careful agent. " * 60},
    {"role": "user", "content": "context " * 300}]}).encode()[:4096]
EVENT = b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"tok "}}]}\n\n'
RESPONSE = EVENT * (8192 // len(EVENT)) + b"data: [DONE]\n\n"
CHUNKS = [RESPONSE[i:i + len(RESPONSE) // 40 + 1] for i in range(0, len(RESPONSE), len(RESPONSE) // 40 + 1)]


def make_call() -> Call:
    return Call(id=new_id(), started_at=utcnow(), method="POST", url="http://127.0.0.1:8081/openai/chat/completions",
                api="openai.chat", client="bench/1.0", model_requested="gpt-4o", stream=True,
                request_headers={"content-type": "application/json", "authorization": "Bearer sk-…abcd"},
                request_body=REQUEST)


def finish(call: Call) -> None:
    call.status, call.model_sent, call.provider, call.attempts = 200, "gpt-4o", "openai", 1
    call.response_headers = {"content-type": "text/event-stream"}
    call.response_body, call.ttfb_ms, call.duration_ms = RESPONSE, 20.0, 400.0


def hand_over(rec: Recorder | RecorderProcess, call: Call) -> None:
    """One streamed call, as the proxy hands it to the recorder: start, head, chunks, end."""
    rec.call_started(call.started())
    rec.response_head(ResponseHead(call.id, 200, {"content-type": "text/event-stream"}, "openai", "gpt-4o", 20.0))
    for chunk in CHUNKS:
        rec.call_chunk(Chunk(call.id, chunk))
    finish(call)
    rec.call_finished(call.finished())


def append_into(db: Path, n: int) -> tuple[Recorder, list[Call], dict[str, float]]:
    """N calls handed over at once to a Recorder on `db`, waited for until written: the recorder
    (still open), the calls, and calls/s, handed over calls/s and process CPU per call."""
    rec = Recorder(db, serve=False)
    rec.start()
    calls = [make_call() for _ in range(n)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for call in calls:
        hand_over(rec, call)
    handed = time.perf_counter() - t0
    deadline = time.monotonic() + 600
    while rec.written + rec.dropped_total < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return rec, calls, {"rate": n / (time.perf_counter() - t0), "handover_rate": n / handed,
                        "cpu_us": (time.process_time() - cpu0) / n * 1e6}


def bench_append(n: int, tmp: Path) -> dict:
    rec, calls, figures = append_into(tmp / "append.duckdb", n)
    rate = figures["rate"]
    rows = [rec._call_row(c, rec._extraction(c)) for c in calls[:2000]]
    rec.close()
    # Baseline: the same finished rows, appended raw in batches of 500.
    con = duckdb.connect(str(tmp / "append.duckdb"))
    con.execute("CREATE TABLE raw AS SELECT * FROM calls LIMIT 0")
    t0 = time.perf_counter()
    for i in range(0, n, 500):
        batch = rows[: min(500, n - i)]
        batch = [(f"{r[0]}-{i}-{j}",) + r[1:] for j, r in enumerate(batch)]
        ap = con.appender("raw")
        ap.append_rows(batch)
        ap.flush()
    base = n / (time.perf_counter() - t0)
    con.close()
    # Where the difference goes: extraction alone of the same responses, in the same chunks.
    from llmtap.recorder.extract import make_extractor

    m = min(n, 2000)
    t0 = time.perf_counter()
    for _ in range(m):
        ex = make_extractor("openai.chat", status=200, headers={"content-type": "text/event-stream"})
        for chunk in CHUNKS:
            ex.feed(chunk)
        ex.finish()
    extract_rate = m / (time.perf_counter() - t0)
    # As `llmtap run` records: handed over a pipe to a recorder process.
    proc = RecorderProcess(tmp / "append-process.duckdb")
    proc.start()
    calls = [make_call() for _ in range(n)]
    t0 = time.perf_counter()
    for call in calls:
        hand_over(proc, call)
    deadline = time.monotonic() + 600
    while proc.committed + proc.dropped_total < n and time.monotonic() < deadline:
        time.sleep(0.01)
    proc_rate = n / (time.perf_counter() - t0)
    proc.close()
    return {"recorder_calls_per_s": round(rate), "recorder_process_calls_per_s": round(proc_rate),
            "handover_calls_per_s": round(figures["handover_rate"]),
            "extraction_only_calls_per_s": round(extract_rate),
            "written": rec.written, "dropped": rec.dropped_total, "raw_appender_rows_per_s": round(base),
            "ratio_recorder_vs_raw": round(rate / base, 2)}


def bench_handoff(n: int, tmp: Path) -> dict:
    import pickle
    import timeit

    from llmtap.recorder.events import CallFinished, CallStarted

    headers = {"content-type": "text/event-stream"}
    chunks = CHUNKS[:20]

    def events(sink: RecorderProcess) -> None:
        for i in range(n):
            start = CallStarted(id=new_id(), started_at=utcnow(), method="POST", url="http://127.0.0.1:8081/openai/v1",
                                api="openai.chat", client="bench/1.0", model_requested="gpt-4o", stream=True,
                                request_headers={"content-type": "application/json"}, request_body=REQUEST)
            sink.call_started(start)
            sink.response_head(ResponseHead(start.id, 200, headers, "openai", "gpt-4o", 20.0))
            for chunk in chunks:
                sink.call_chunk(Chunk(start.id, chunk))
            sink.call_finished(CallFinished(start, status=200, provider="openai", model_sent="gpt-4o",
                                            response_headers=headers, response_body=RESPONSE, ttfb_ms=20.0,
                                            duration_ms=400.0, attempts=1))
            if i % 50 == 49:  # a frame per 50 calls, as under load
                pickle.dumps(sink._items(), protocol=5)
        pickle.dumps(sink._items(), protocol=5)

    def tuples(queue: list) -> None:
        for i in range(n):
            cid, at = new_id(), utcnow()
            start = (cid, at, "POST", "http://127.0.0.1:8081/openai/v1", "openai.chat", "bench/1.0", "gpt-4o",
                     True, None, {"content-type": "application/json"}, REQUEST, (), ())
            queue.append(("S", start))
            queue.append(("H", (cid, 200, headers, "openai", "gpt-4o", 20.0)))
            for chunk in chunks:
                queue.append(("C", cid, chunk))
            queue.append(("F", start, (200, "openai", "gpt-4o", headers, RESPONSE, 20.0, 400.0, 1, None, ()), []))
            if i % 50 == 49:
                pickle.dumps(queue, protocol=5)
                queue.clear()
        pickle.dumps(queue, protocol=5)

    best_events = best_tuples = float("inf")
    for _ in range(5):  # interleaved, best of five: the machine's load moves both alike
        t0 = time.perf_counter()
        events(RecorderProcess(tmp / "handoff.duckdb"))  # never started: only its proxy side runs
        best_events = min(best_events, time.perf_counter() - t0)
        t0 = time.perf_counter()
        tuples([])
        best_tuples = min(best_tuples, time.perf_counter() - t0)
    fast = min(timeit.repeat(lambda: Chunk("01ABCDEFGHJKMNPQRSTVWXYZ12", b"x"), number=100_000, repeat=5))
    plain_init = Chunk.__init__.dataclass_init  # type: ignore[attr-defined]

    def plain() -> None:
        chunk = object.__new__(Chunk)
        plain_init(chunk, "01ABCDEFGHJKMNPQRSTVWXYZ12", b"x")

    slow = min(timeit.repeat(plain, number=100_000, repeat=5))
    return {"events_us_per_call": round(best_events / n * 1e6, 1),
            "bare_tuples_us_per_call": round(best_tuples / n * 1e6, 1),
            "ratio_events_vs_bare_tuples": round(best_events / best_tuples, 2),
            "chunk_fast_init_ns": round(fast / 100_000 * 1e9), "chunk_dataclass_init_ns": round(slow / 100_000 * 1e9),
            "ratio_fast_vs_dataclass_init": round(fast / slow, 2)}


def bench_steady(rate: int, tmp: Path, seconds: float = 4.0) -> dict:
    rec = Recorder(tmp / "steady.duckdb", serve=False)
    rec.start()
    n = int(rate * seconds)
    calls = [make_call() for _ in range(n)]
    handed = 0
    most_waiting = 0
    t0 = time.perf_counter()
    while handed < n:
        # Hand over what is due by now, in the bursts a busy event loop would produce.
        due = min(n, int((time.perf_counter() - t0) * rate) + 1)
        for call in calls[handed:due]:
            hand_over(rec, call)
        handed = due
        most_waiting = max(most_waiting, handed - rec.written)
        time.sleep(0.005)
    fed = time.perf_counter() - t0
    last_handover = time.perf_counter()
    while rec.written + rec.dropped_total < n:
        time.sleep(0.002)
    drained_ms = (time.perf_counter() - last_handover) * 1000
    rec.close()
    return {"rate_asked": rate, "rate_handed_over": round(n / fed), "written": rec.written,
            "dropped": rec.dropped_total, "most_calls_waiting": most_waiting,
            "most_waiting_in_ms_of_load": round(most_waiting / rate * 1000),
            "all_committed_ms_after_last_handover": round(drained_ms)}


def bench_big(n: int, tmp: Path) -> dict:
    db = tmp / "big.duckdb"
    t0 = time.perf_counter()
    subprocess.run([PY, str(ROOT / "scripts" / "make_big_db.py"), "--db", str(db), "--calls", str(n)], check=True)
    gen = time.perf_counter() - t0

    def timed(*args: str) -> float:
        t = time.perf_counter()
        subprocess.run([PY, "-m", "llmtap", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t

    base = timed("stats", "--db", str(db), "--since", "2100-01-01")  # process start + open, no rows
    stats = timed("stats", "--db", str(db), "--json")
    export = timed("export", "--db", str(db), "--out", str(tmp / "big.parquet"))
    # Baseline for the export: one plain COPY of the same rows (no slices, no progress).
    t = time.perf_counter()
    with duckdb.connect(str(db), read_only=True) as con:
        con.execute(f"COPY (SELECT * FROM calls ORDER BY id) TO '{tmp / 'one.parquet'}' (FORMAT parquet, COMPRESSION zstd)")
    one_copy = time.perf_counter() - t
    return {"calls": n, "generate_s": round(gen, 1), "bytes_per_call": round(db.stat().st_size / n),
            "stats_s": round(stats, 2), "export_parquet_s": round(export, 1),
            "baseline_empty_stats_s": round(base, 2), "baseline_single_copy_s": round(one_copy, 1),
            "ratio_export_vs_single_copy": round(export / one_copy, 2),
            "parquet_bytes_per_call": round((tmp / "big.parquet").stat().st_size / n)}


def bench_grown(source: Path, n: int, rounds: int, tmp: Path) -> dict:
    """--append's calls into a copy of a grown file (`source`, e.g. from make_big_db.py) vs into an
    empty one, alternating: what a file holding months of calls costs the writer (checkpoints,
    the search index, the sessions table). The copy is synced to disk first: its writeback would
    otherwise compete with the run it is measured against."""
    with duckdb.connect(str(source), read_only=True) as con:
        held = con.execute("SELECT count(*) FROM calls").fetchone()[0]
    runs: dict[str, list[dict[str, float]]] = {"empty": [], "grown": []}
    for i in range(rounds):
        for kind in ("empty", "grown"):
            db = tmp / f"grown-{i}-{kind}.duckdb"
            if kind == "grown":
                shutil.copyfile(source, db)
                os.sync()
            rec, _, figures = append_into(db, n)
            figures["dropped"] = rec.dropped_total
            rec.close()
            runs[kind].append(figures)
            print(f"  {kind:<5} " + "  ".join(f"{k} {v:.0f}" for k, v in runs[kind][-1].items()), file=sys.stderr)
            db.unlink()

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    return {"calls_in_grown_file": held, "grown_file_mib": round(source.stat().st_size / 2**20), "appended": n,
            "rounds": rounds, "empty_calls_per_s": round(med("empty", "rate")),
            "grown_calls_per_s": round(med("grown", "rate")),
            "ratio_grown_vs_empty_rate": round(med("grown", "rate") / med("empty", "rate"), 3),
            "ratio_grown_vs_empty_cpu_per_call": round(med("grown", "cpu_us") / med("empty", "cpu_us"), 3),
            "dropped": int(sum(r["dropped"] for rs in runs.values() for r in rs))}


CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {scripts!r})
    from pathlib import Path
    from bench_recorder import make_call, finish
    if {separate!r}:
        from llmtap.recorder.process import RecorderProcess
        rec = RecorderProcess(Path({db!r}))
        rec.start()
        print(rec.proc.pid, flush=True)  # the process holding the file
    else:
        from llmtap.recorder.recorder import Recorder
        rec = Recorder(Path({db!r}), serve=False)
        rec.start()
        print(os.getpid(), flush=True)
    n = 0
    t0 = time.perf_counter()
    while True:
        call = make_call()
        finish(call)
        rec.call_finished(call.finished())
        n += 1
        print(n, flush=True)
        time.sleep(max(0.0, t0 + n / 200 - time.perf_counter()))
""")


def bench_kill(times: int, tmp: Path, separate: bool) -> dict:
    lost: list[int] = []
    opened = 0
    total = 0
    for k in range(times):
        db = tmp / f"kill{k}{'p' if separate else ''}.duckdb"
        child = subprocess.Popen([PY, "-c", CHILD.format(root=str(ROOT), scripts=str(ROOT / "scripts"), db=str(db),
                                                         separate=separate)],
                                 stdout=subprocess.PIPE, text=True)
        holder = int(child.stdout.readline())
        target = random.uniform(1.0, 3.0)
        t0 = time.monotonic()
        handed = 0
        while time.monotonic() - t0 < target:
            line = child.stdout.readline()
            if not line:
                break
            handed = int(line)
        os.kill(child.pid, signal.SIGKILL)
        for line in child.stdout:  # counts printed before the kill landed
            handed = int(line)
        child.wait()
        while _alive(holder):  # a recorder process commits what it was handed, then exits
            time.sleep(0.01)
        with duckdb.connect(str(db)) as con:
            opened += 1
            have = con.execute("SELECT count(*) FROM calls").fetchone()[0]
        total += handed
        lost.append(handed - have)
    return {"kills": times, "file_opened": opened, "handed_over": total, "lost_total": sum(lost),
            "lost_max_per_kill": max(lost), "lost_mean_per_kill": round(sum(lost) / times, 1),
            "window_at_200_per_s": 50}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--append", type=int, default=0, metavar="N")
    ap.add_argument("--steady", type=int, default=0, metavar="R")
    ap.add_argument("--big", type=int, default=0, metavar="N")
    ap.add_argument("--kill", type=int, default=0, metavar="N")
    ap.add_argument("--handoff", type=int, default=0, metavar="N")
    ap.add_argument("--grown", type=Path, metavar="DB")
    ap.add_argument("--rounds", type=int, default=3, metavar="K")
    a = ap.parse_args()
    if not (a.append or a.steady or a.big or a.kill or a.handoff or a.grown):
        ap.error("choose at least one of --append N, --steady R, --big N, --kill N, --handoff N, --grown DB")
    if a.grown is not None and not a.grown.is_file():
        ap.error(f"--grown {a.grown}: no such file; make one with scripts/make_big_db.py --db {a.grown} --calls 300000")
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="llmtap-bench-") as d:
        tmp = Path(d)
        if a.append:
            print(f"append: {a.append} calls ...", file=sys.stderr)
            out["append"] = bench_append(a.append, tmp)
        if a.steady:
            print(f"steady: {a.steady} calls/s ...", file=sys.stderr)
            out["steady"] = bench_steady(a.steady, tmp)
        if a.big:
            print(f"big: generating {a.big} calls ...", file=sys.stderr)
            out["big"] = bench_big(a.big, tmp)
        if a.kill:
            print(f"kill -9 of the process holding the recorder: {a.kill} times ...", file=sys.stderr)
            out["kill_recorder"] = bench_kill(a.kill, tmp, separate=False)
            print(f"kill -9 of a proxy handing over to a recorder process: {a.kill} times ...", file=sys.stderr)
            out["kill_proxy"] = bench_kill(a.kill, tmp, separate=True)
        if a.grown is not None:
            n = 6000
            print(f"grown: {n} calls into {a.grown} vs into an empty file, {a.rounds} rounds ...", file=sys.stderr)
            out["grown"] = bench_grown(a.grown, n, a.rounds, tmp)
        if a.handoff:
            print(f"handoff: {a.handoff} calls, events vs bare tuples ...", file=sys.stderr)
            out["handoff"] = bench_handoff(a.handoff, tmp)
    print(json.dumps(out, indent=2))
    # The same figures as a table for a human reading the terminal.
    print(f"\n{'part':<14} {'measure':<32} {'value':>14}")
    for part, figures in out.items():
        for name, value in figures.items():
            print(f"{part:<14} {name:<32} {value:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
