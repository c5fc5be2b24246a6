#!/usr/bin/env python3
"""Sessions benchmark, each part against a baseline measured in the same run.

  --append N   append rate of N finished calls handed to the Recorder at once, grouping into
               sessions on vs off (Options(sessions={"off": True})), --rounds runs of each,
               alternating; the calls are agent tool loops of 8 turns whose 2-8 KB request
               carries the whole history and answers the last turn's tool call, in JSON that
               parses (so grouping does its whole work), with a streamed 8 KB answer as
               scripts/bench_recorder.py hands over, the last turn's a text of 200 words.
               Figures: calls/s, and CPU per call of the writer's thread, of the recorder's
               process and of its extraction helpers, each as the median of the rounds; and
               the median (and range) of each round's rate on over the rate off just before
  --shape cline  --append's calls in Cline's shape instead: tasks of 20 turns whose 13-90 KB
               requests carry a 12 KB system prompt and the whole history, tools as XML in the
               streamed answer's text, their results sent back as user text
  --big N      `llmtap sessions` (the whole command, first page; its queries alone; one session's
               timeline) on a generated N-call DB in sessions of 4 calls, vs `llmtap stats` on it

    .venv/bin/python scripts/bench_sessions.py --append 10000 --rounds 5 --big 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmtap import gctune  # noqa: E402
from llmtap.recorder.record import Call, new_id, utcnow  # noqa: E402
from llmtap.recorder.recorder import Recorder  # noqa: E402
from llmtap.recorder.services import Options  # noqa: E402
from make_big_db import ulid_sql  # noqa: E402

PY = sys.executable
TURNS = 8


def tool_event(call_id: str) -> bytes:
    return ('data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":'
            '{"tool_calls":[{"index":0,"id":"%s","type":"function","function":{"name":"read_file",'
            '"arguments":"{\\"path\\": \\"a.py\\"}"}}]}}]}\n\n' % call_id).encode()


def text_event(words: int) -> bytes:
    text = " ".join(f"word{i % 97} finding{i % 13}" for i in range(words // 2))
    return ('data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":'
            '{"content":"%s"}}]}\n\n' % text).encode()


FILLER = ('data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":'
          '{"reasoning_content":"tok "}}]}\n\n').encode()


def streamed(provider: str, client: str, model: str, body: bytes, response: bytes) -> Call:
    """A finished Chat Completions call through the gateway, its answer streamed."""
    c = Call(id=new_id(), started_at=utcnow(), method="POST", url=f"http://127.0.0.1:8081/{provider}/chat/completions",
             api="openai.chat", client=client, model_requested=model, stream=True,
             request_headers={"content-type": "application/json"}, request_body=body)
    c.status, c.model_sent, c.provider, c.attempts = 200, model, provider, 1
    c.response_headers = {"content-type": "text/event-stream"}
    c.response_body, c.ttfb_ms, c.duration_ms = response, 20.0, 400.0
    return c


def make_calls(n: int) -> list[Call]:
    calls = []
    for task in range(n // TURNS + 1):
        history: list[dict] = [{"role": "user", "content": f"task {task}: " + "context " * 300}]
        for turn in range(TURNS):
            if len(calls) == n:
                return calls
            cid = f"call_{task}_{turn}"
            body = json.dumps({"model": "gpt-4o", "stream": True, "messages": [
                {"role": "system", "content": "You are a careful agent. " * 40}, *history]}).encode()
            last = turn == TURNS - 1
            response = FILLER * (8192 // len(FILLER)) + (text_event(200) if last else tool_event(cid)) + b"data: [DONE]\n\n"
            calls.append(streamed("openai", "bench/1.0", "gpt-4o", body, response))
            history += [{"role": "assistant", "content": None, "tool_calls": [
                {"id": cid, "type": "function", "function": {"name": "read_file", "arguments": '{"path":"a.py"}'}}]},
                {"role": "tool", "tool_call_id": cid, "content": "file contents " * 20}]
    return calls


CLINE_TURNS = 20
ENV = ("<environment_details>\n# VSCode Visible Files\nsrc/app.py\n# Current Time\n2026-12-02 10:00\n"
       "# Current Working Directory Files\n" + "".join(f"src/module_{i}.py\n" for i in range(40)) + "</environment_details>")


def cline_event(text: str) -> bytes:
    return ('data: {"id":"gen-1","object":"chat.completion.chunk","model":"anthropic/claude-sonnet-4.5","choices":'
            '[{"index":0,"delta":{"content":%s}}]}\n\n' % json.dumps(text)).encode()


def make_cline_calls(n: int) -> list[Call]:
    """Cline's shape: no native tools; a 12 KB system prompt, tools as XML in the answer's text,
    their results (and environment details) sent back as user text; the whole history each turn,
    so that requests grow from 13 KB to about 90 KB over a task of CLINE_TURNS turns."""
    system = "You are Cline, a highly skilled software engineer. " + "TOOL USE rules and examples. " * 420
    calls: list[Call] = []
    for task in range(n // CLINE_TURNS + 1):
        history: list[dict] = [{"role": "user", "content": f"<task>\nTask {task}: fix the failing tests in src/</task>\n{ENV}"}]
        for turn in range(CLINE_TURNS):
            if len(calls) == n:
                return calls
            body = json.dumps({"model": "anthropic/claude-sonnet-4.5", "stream": True,
                               "messages": [{"role": "system", "content": system}, *history]}).encode()
            said = (f"<thinking>Turn {turn} of task {task}: the next file to read is module_{turn}.py, since the "
                    f"failure points at it.</thinking>\n<read_file>\n<path>src/module_{turn}.py</path>\n</read_file>")
            pieces = [said[i:i + 24] for i in range(0, len(said), 24)]
            response = b"".join(map(cline_event, pieces)) + b"data: [DONE]\n\n"
            calls.append(streamed("openrouter", "Cline/3.38", "anthropic/claude-sonnet-4.5", body, response))
            result = "".join(f"{i:4d} | def function_{turn}_{i}(x): return x * {i}\n" for i in range(60))
            history += [{"role": "assistant", "content": said},
                        {"role": "user", "content": [{"type": "text", "text": f"[read_file for 'src/module_{turn}.py'] Result:\n{result}"},
                                                     {"type": "text", "text": ENV}]}]
    return calls


SHAPES = {"tools": (make_calls, TURNS), "cline": (make_cline_calls, CLINE_TURNS)}


def _cpu_s(stat: str) -> float:
    """utime + stime of a /proc/.../stat file, in seconds (0 where there is no /proc)."""
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def append_rate(n: int, db: Path, grouping: bool, shape: str = "tools") -> dict[str, float]:
    """One run: calls/s, and CPU per call of the writer's thread (what limits the append rate
    where the helpers have CPUs of their own), of the whole recorder process (DuckDB's threads
    too) and of the extraction helpers (which, on a 2-CPU machine, take CPU from the writer)."""
    rec = Recorder(db, serve=False, services=Options(sessions={} if grouping else {"off": True}))
    rec.start()
    events = [c.finished() for c in SHAPES[shape][0](n)]
    writer = f"/proc/self/task/{rec._thread.native_id}/stat"
    w0, t0, cpu0 = _cpu_s(writer), time.perf_counter(), time.process_time()
    for e in events:
        rec.call_finished(e)
    while rec.written + rec.dropped_total < n:
        time.sleep(0.005)
    wall = time.perf_counter() - t0
    out = {"rate": n / wall, "dropped": rec.dropped_total, "writer_us": (_cpu_s(writer) - w0) / n * 1e6,
           "process_us": (time.process_time() - cpu0) / n * 1e6,
           "helpers_us": sum(_cpu_s(f"/proc/{pid}/stat") for pid in rec.helpers.pids()) / n * 1e6}
    rec.close()
    with duckdb.connect(str(db), read_only=True) as con:
        out["sessions"] = con.execute("SELECT count(*) FROM sessions").fetchone()[0]
    db.unlink()
    return out


def bench_append(n: int, tmp: Path, rounds: int, shape: str = "tools") -> dict:
    """`rounds` runs of each, alternating, so that a busy spell of the machine hits both; the
    median of each figure, and the ratios of the medians (on / off: 1.0 is no cost)."""
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for i in range(rounds):
        for grouping in (False, True):
            runs[grouping].append(append_rate(n, tmp / f"r{i}{int(grouping)}.duckdb", grouping, shape))
            print(f"  {'on ' if grouping else 'off'} " + "  ".join(f"{k} {v:.0f}" for k, v in runs[grouping][-1].items()),
                  file=sys.stderr, flush=True)

    def med(grouping: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs[grouping])

    out: dict = {"shape": shape, "calls": n, "rounds": rounds, "sessions_found": int(runs[True][-1]["sessions"]),
                 "expected_sessions": -(-n // SHAPES[shape][1])}
    for key, unit in (("rate", "calls_per_s"), ("writer_us", "writer_cpu_us_per_call"),
                      ("process_us", "process_cpu_us_per_call"), ("helpers_us", "helpers_cpu_us_per_call")):
        on, off = med(True, key), med(False, key)
        out[f"{unit}_on"], out[f"{unit}_off"] = round(on), round(off)
        out[f"{unit}_ratio_on_vs_off"] = round(on / off, 3) if off else None
    total_on = med(True, "process_us") + med(True, "helpers_us")
    total_off = med(False, "process_us") + med(False, "helpers_us")
    out["all_cpu_us_per_call_ratio_on_vs_off"] = round(total_on / total_off, 3)
    # Each round's run with grouping on against the run off just before it: a slow spell of the
    # machine (they last minutes here) then weighs on both sides of a ratio, not on one median.
    paired = [on["rate"] / off["rate"] for on, off in zip(runs[True], runs[False]) if off["rate"]]
    out["calls_per_s_ratio_paired_median"] = round(statistics.median(paired), 3) if paired else None
    out["calls_per_s_ratio_paired_range"] = [round(min(paired), 3), round(max(paired), 3)] if paired else None
    return out


def bench_big(n: int, tmp: Path) -> dict:
    db = tmp / "big.duckdb"
    with duckdb.connect(str(db)) as con:
        from llmtap.recorder.schema import migrate

        migrate(con)
        # N calls over a year in sessions of 4, as the recorder would have grouped them. Only
        # the columns these commands read are filled (DuckDB reads a query's columns alone; the
        # bodies of scripts/make_big_db.py would take an hour to generate here and change nothing).
        con.execute(f"""
            INSERT INTO calls (id, started_at, client, api, method, url, status, model_requested, model_sent,
                               provider, attempts, duration_ms, input_tokens, output_tokens, content,
                               session_id, session_link, parent_call_id, turn)
            SELECT {ulid_sql('epoch_ms(ts)', 'i')},
                   ts, ['Cline/3.38', 'local-deep-research/0.6', 'OpenAI/Python 2.8'][1 + (i // 4) % 3],
                   'openai.chat', 'POST', 'http://127.0.0.1:8081/openrouter/chat/completions',
                   CASE WHEN i % 97 = 0 THEN 500 ELSE 200 END, 'gpt-4o', 'gpt-4o', 'openrouter', 1, 900.0,
                   1200, 300, 'an answer',
                   {ulid_sql('epoch_ms(ts0)', 'i - i % 4')},
                   CASE WHEN i % 4 = 0 THEN 'new' ELSE 'history' END, NULL, i % 4 + 1
            FROM (SELECT i, base + to_milliseconds(i * 31536) AS ts, base + to_milliseconds((i - i % 4) * 31536) AS ts0
                  FROM range({n}) t(i), (SELECT TIMESTAMPTZ '2025-12-01 00:00:00+00' AS base))""")
        con.execute("""
            INSERT INTO sessions
            SELECT session_id, 'new', NULL, any_value(client), 'a task', min(started_at),
                   max(started_at + to_milliseconds(coalesce(duration_ms, 0)::BIGINT)), NULL, count(*),
                   count(*) FILTER (WHERE status >= 400), bool_or(status >= 400),
                   count(*) FILTER (WHERE attempts > 1), sum(input_tokens), sum(output_tokens), NULL, max(id)
            FROM calls GROUP BY session_id""")
        sessions = con.execute("SELECT count(*) FROM sessions").fetchone()[0]
        calls_n = con.execute("SELECT count(*) FROM calls").fetchone()[0]

    def timed(*args: str) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([PY, "-m", "llmtap", *args, "--db", str(db)], check=True, stdout=subprocess.DEVNULL)
            best = min(best, time.perf_counter() - t0)
        return best

    # The queries alone, in one process (what the command adds to Python's start and imports).
    from llmtap.recorder.reader import LocalReader
    from llmtap.recorder.session_view import failed_share, list_sessions, session_calls

    reader = LocalReader(db)
    t0 = time.perf_counter()
    page = list_sessions(reader)
    failed_share(reader)
    queries = time.perf_counter() - t0
    t0 = time.perf_counter()
    session_calls(reader, page[-1])
    one_query = time.perf_counter() - t0
    reader.close()
    first = timed("sessions")
    failed = timed("sessions", "--failed")
    with duckdb.connect(str(db), read_only=True) as con:
        sid = con.execute("SELECT id FROM sessions ORDER BY started_at LIMIT 1 OFFSET 1000").fetchone()[0]
    one = timed("sessions", sid)
    stats = timed("stats")
    return {"calls": calls_n, "sessions": sessions, "first_page_queries_s": round(queries, 3),
            "one_session_query_s": round(one_query, 3), "sessions_first_page_s": round(first, 3),
            "sessions_failed_s": round(failed, 3), "one_session_timeline_s": round(one, 3),
            "stats_s": round(stats, 3), "ratio_sessions_vs_stats": round(first / stats, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--append", type=int, default=0, metavar="N")
    ap.add_argument("--rounds", type=int, default=5, metavar="R", help="runs of each, on and off (default 5)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tools",
                    help="the calls --append makes: tools (the default) or cline")
    ap.add_argument("--big", type=int, default=0, metavar="N")
    args = ap.parse_args()
    gctune.settle()  # as the recorder's process does (recorder/process.py), whose Recorder this is
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="llmtap-bench-sessions-") as d:
        tmp = Path(d)
        if args.append:
            out["append"] = bench_append(args.append, tmp, args.rounds, args.shape)
        if args.big:
            out["big"] = bench_big(args.big, tmp)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
