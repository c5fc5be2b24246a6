"""Every wire transcript, fed as recorded, in one piece and a byte at a time, must give the
values its `expected` block names (the keys `check` compares: stream, complete, reasoning,
content, model, finish_reason, usage, tool_calls, error; '' and [] there mean "none").

The request side too, where the block says (llmtap's own keys): `api`, the dialect its method
and path are recognised as; `request`, what its body reads as (`check_request`: model, stream,
system, roles, text, tool_calls, tool_results, tools).

Two corpora: llmtap's own, tests/fixtures/wire, always; and a shared one beside the repo
(../shared/fixtures), run when it is there and otherwise left out."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from llmtap.dialects import registry
from llmtap.recorder.extract import Extraction, detect_api, make_extractor

SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
WIRE = Path(__file__).resolve().parent / "fixtures" / "wire"

USAGE_KEYS = ("input_tokens", "output_tokens", "reasoning_tokens", "total_tokens")
# Checked where `expected.usage` names them (the shared corpus predates them).
CACHE_KEYS = ("cache_read_tokens", "cache_write_tokens")


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def body_of(fx: dict[str, Any]) -> bytes:
    r = fx["response"]
    return base64.b64decode(r["body_b64"]) if "body_b64" in r else r["body_raw"].encode("utf-8")


def chunks_of(fx: dict[str, Any]) -> list[bytes]:
    chunks = fx["response"].get("chunks")
    return [base64.b64decode(c) for c in chunks] if chunks else [body_of(fx)]


def run(fx: dict[str, Any], chunks: list[bytes]) -> Extraction:
    req, resp = fx["request"], fx["response"]
    api = detect_api(req["method"], req["path"], json.dumps(req.get("body")).encode())
    ex = make_extractor(api, status=resp["status"], headers=resp["headers"])
    for c in chunks:
        ex.feed(c)
        ex.snapshot()  # live views read while the body arrives; that must not disturb anything
    return ex.finish()


def check(got: Extraction, exp: dict[str, Any], api: str = "") -> None:
    """Compare the keys the corpus README defines; '' and [] in `expected` mean 'none'."""
    if "stream" in exp:
        assert got.stream is exp["stream"]
    if "complete" in exp:
        assert got.complete is exp["complete"], got.notes
    for key in ("reasoning", "content"):
        if key in exp:
            assert (getattr(got, key) or "") == (exp[key] or ""), key
    if "reasoning_parts" in exp:
        assert got.reasoning == "\n\n".join(exp["reasoning_parts"])
    if "model" in exp:
        assert got.model == exp["model"]
    if "finish_reason" in exp:
        assert got.finish_reason == exp["finish_reason"]
    if "usage" in exp:
        usage = dict(exp["usage"] or {})
        if api == "gemini.generate" and usage.get("output_tokens") is not None:
            # The corpora write Gemini's candidatesTokenCount as output_tokens; llmtap records
            # output with the thoughts in (shapes.Usage: output includes reasoning, as billed).
            usage["output_tokens"] += usage.get("reasoning_tokens") or 0
        for k in USAGE_KEYS + tuple(k for k in CACHE_KEYS if k in usage):
            assert getattr(got, k) == usage.get(k), k
    if "redacted_reasoning_blocks" in exp:
        assert got.redacted_reasoning_blocks == exp["redacted_reasoning_blocks"]
    if "tool_calls" in exp:
        calls = got.tool_calls or []
        assert len(calls) == len(exp["tool_calls"])
        for mine, want in zip(calls, exp["tool_calls"]):
            assert mine["id"] == want.get("id")
            assert mine["name"] == want.get("name")
            assert json.loads(mine["arguments"]) == want["arguments"]
            if "arguments_raw" in want:
                assert mine["arguments"] == want["arguments_raw"]
    if "error" in exp:
        if exp["error"] is None:
            assert got.error is None
        else:
            assert got.error is not None
            for k, v in exp["error"].items():
                assert got.error.get(k) == v, k


def check_request(fx: dict[str, Any]) -> None:
    """The request's dialect (`expected.api`) and what its body reads as (`expected.request`)."""
    req, exp = fx["request"], fx["expected"]
    api = detect_api(req["method"], req["path"])
    if "api" in exp:
        assert api == exp["api"]
    want = exp.get("request")
    if want is None:
        return
    got = registry.read_request(api, json.dumps(req.get("body")).encode(), req["path"])
    for key in ("model", "stream"):
        if key in want:
            assert getattr(got, key) == want[key], key
    if "system" in want:
        assert list(got.system) == want["system"]
    if "roles" in want:
        assert [m.role for m in got.messages] == want["roles"]
    if "text" in want:  # the text of each message, in order
        assert [m.text for m in got.messages] == want["text"]
    if "tool_calls" in want:  # [[id, name, arguments as JSON]] of the history's calls
        calls = [c for m in got.messages for c in m.tool_calls]
        assert [[c.id, c.name, json.loads(c.arguments)] for c in calls] == want["tool_calls"]
    if "tool_results" in want:  # [[call id, name, content]]
        assert [[r.call_id, r.name, r.content] for r in got.tool_results] == want["tool_results"]
    if "tools" in want:
        assert [t.name for t in got.tools] == want["tools"]


SHARED_FILES = _files(SHARED)
WIRE_FILES = _files(WIRE)


ALL = SHARED_FILES + WIRE_FILES


@pytest.mark.parametrize("path", ALL, ids=[f"{p.parent.name}/{p.stem}" for p in ALL])
@pytest.mark.parametrize("how", ["chunks", "whole", "bytes"])
def test_transcript(path: Path, how: str) -> None:
    """The recorded network reads, the body in one piece, and one byte at a time."""
    fx = load(path)
    body = body_of(fx)
    feeds = {"chunks": chunks_of(fx), "whole": [body], "bytes": [body[i : i + 1] for i in range(len(body))]}[how]
    req = fx["request"]
    check(run(fx, feeds), fx["expected"], detect_api(req["method"], req["path"]))


@pytest.mark.parametrize("path", ALL, ids=[f"{p.parent.name}/{p.stem}" for p in ALL])
def test_request(path: Path) -> None:
    check_request(load(path))


def test_own_corpus_is_there() -> None:
    assert len(WIRE_FILES) >= 10


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared corpus not found at {SHARED}")
def test_shared_corpus_is_there() -> None:
    assert len(SHARED_FILES) >= 10
