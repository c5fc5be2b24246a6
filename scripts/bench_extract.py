#!/usr/bin/env python3
"""Extraction benchmark: how fast each dialect's response reader gets through a stream, as a
ratio to a baseline measured in the same run (`json.loads` of the same events one by one, with
nothing read out of them: the least any reader of these streams must pay).

Per dialect, a synthetic stream of ~N events of the usual shape (one text piece each) is fed in
network-sized chunks and finished; a whole-body answer is read too. A ratio near 1 means framing
and reading cost little beyond parsing the JSON; compare ratios across versions, not seconds.

    .venv/bin/python scripts/bench_extract.py --events 20000 --repeat 5

`--against OLD.py` also runs another copy of recorder/extract.py (e.g. `git show
HEAD~5:recorder/extract.py > /tmp/old_extract.py`) on the same streams, interleaved with this
one, and prints this one's time over that one's: the before/after ratio of a change.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmtap.recorder.extract import make_extractor  # noqa: E402

SSE = {"content-type": "text/event-stream"}
NDJSON = {"content-type": "application/x-ndjson"}


def _sse(events: list[dict], names: list[str] | None = None, done: bool = False) -> bytes:
    out = []
    for i, e in enumerate(events):
        head = f"event: {names[i]}\n" if names else ""
        out.append(f"{head}data: {json.dumps(e, separators=(',', ':'))}\n\n")
    if done:
        out.append("data: [DONE]\n\n")
    return "".join(out).encode()


def streams(n: int) -> dict[str, tuple[str, dict, bytes, list[dict]]]:
    """name -> (api, headers, body, the events as objects for the baseline)."""
    chat = [{"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o",
             "choices": [{"index": 0, "delta": {"content": f"tok{i} "}}]} for i in range(n)]
    chat.append({"id": "c1", "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": n,
                                                     "total_tokens": n + 10}})
    anth = [{"type": "message_start", "message": {"model": "claude", "usage": {"input_tokens": 5}}}]
    anth += [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"tok{i} "}}
             for i in range(n)]
    anth += [{"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": n}},
             {"type": "message_stop"}]
    resp = [{"type": "response.output_text.delta", "item_id": "m1", "output_index": 0, "content_index": 0,
             "delta": f"tok{i} "} for i in range(n)]
    resp.append({"type": "response.completed", "response": {"model": "gpt-5", "status": "completed", "output": [],
                                                           "usage": {"input_tokens": 1, "output_tokens": n}}})
    gem = [{"candidates": [{"content": {"role": "model", "parts": [{"text": f"tok{i} "}]}}],
            "modelVersion": "gemini-2.5"} for i in range(n)]
    gem[-1]["candidates"][0]["finishReason"] = "STOP"
    oll = [{"model": "qwen3", "message": {"role": "assistant", "content": f"tok{i} "}, "done": False}
           for i in range(n)]
    oll.append({"model": "qwen3", "message": {"role": "assistant", "content": ""}, "done": True,
                "done_reason": "stop", "prompt_eval_count": 3, "eval_count": n})
    whole = {"id": "c1", "model": "gpt-4o", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "word " * (n * 2)}}], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
    return {
        "openai.chat sse": ("openai.chat", SSE, _sse(chat, done=True), chat),
        "anthropic sse": ("anthropic.messages", SSE, _sse(anth, [e["type"] for e in anth]), anth),
        "responses sse": ("openai.responses", SSE, _sse(resp, [e["type"] for e in resp]), resp),
        "gemini sse": ("gemini.generate", SSE, _sse(gem), gem),
        "ollama ndjson": ("ollama.chat", NDJSON, "".join(json.dumps(o) + "\n" for o in oll).encode(), oll),
        "openai.chat whole": ("openai.chat", {"content-type": "application/json"}, json.dumps(whole).encode(),
                              [whole]),
    }


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20000, help="events per stream (default 20000)")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each; the fastest counts (default 5)")
    ap.add_argument("--chunk", type=int, default=1400, help="bytes per network read (default 1400)")
    ap.add_argument("--against", metavar="OLD.py", help="another extract.py to compare with (see above)")
    args = ap.parse_args()
    old_make = None
    if args.against:
        spec = importlib.util.spec_from_file_location("old_extract", args.against)
        assert spec is not None and spec.loader is not None
        old = importlib.util.module_from_spec(spec)
        sys.modules["old_extract"] = old  # dataclasses look their module up
        spec.loader.exec_module(old)
        old_make = old.make_extractor
    total_read = total_base = total_old = 0.0
    print(f"{'stream':<20} {'events':>7} {'MB':>6} {'read ms':>9} {'json ms':>9} {'ratio':>6}"
          + (f" {'old ms':>9} {'new/old':>7}" if old_make else ""))
    for name, (api, headers, body, objs) in streams(args.events).items():
        chunks = [body[i:i + args.chunk] for i in range(0, len(body), args.chunk)]
        texts = [json.dumps(o) for o in objs]

        def read(api: str = api, headers: dict = headers, chunks: list[bytes] = chunks,
                 make: Callable[..., Any] = make_extractor) -> object:
            ex = make(api, status=200, headers=headers, limit=1 << 30)
            for c in chunks:
                ex.feed(c)
            return ex.finish()

        def base(texts: list[str] = texts) -> object:
            return [json.loads(t) for t in texts]

        got = read()
        assert getattr(got, "content", None), f"{name}: nothing read ({getattr(got, 'notes', None)})"
        t_read = t_base = t_old = float("inf")
        for _ in range(args.repeat):  # interleaved, so that a busy moment costs each the same
            t_read = min(t_read, best(read, 1))
            t_base = min(t_base, best(base, 1))
            if old_make is not None:
                t_old = min(t_old, best(lambda: read(make=old_make), 1))
        total_read += t_read
        total_base += t_base
        line = (f"{name:<20} {len(objs):>7} {len(body) / 1e6:>6.2f} {t_read * 1e3:>9.1f} {t_base * 1e3:>9.1f} "
                f"{t_read / t_base:>6.2f}")
        if old_make is not None:
            total_old += t_old
            line += f" {t_old * 1e3:>9.1f} {t_read / t_old:>7.2f}"
        print(line)
    line = (f"{'all':<20} {'':>7} {'':>6} {total_read * 1e3:>9.1f} {total_base * 1e3:>9.1f} "
            f"{total_read / total_base:>6.2f}")
    if old_make is not None:
        line += f" {total_old * 1e3:>9.1f} {total_read / total_old:>7.2f}"
    print(line)


if __name__ == "__main__":
    main()
