"""Extraction per dialect, on llmtap's own transcripts (tests/fixtures/wire) and on bodies built
here to break the framing: split characters, CRLF, compression, garbage, cuts."""

from __future__ import annotations

import base64
import gzip
import json
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from llmtap.recorder.extract import Extraction, detect_api, extract, make_extractor, prompt_text

WIRE = Path(__file__).resolve().parent / "fixtures" / "wire"
SSE = {"content-type": "text/event-stream"}


def fixture(name: str) -> dict[str, Any]:
    return json.loads((WIRE / f"{name}.json").read_text(encoding="utf-8"))


def body_of(fx: dict[str, Any]) -> bytes:
    r = fx["response"]
    return base64.b64decode(r["body_b64"]) if "body_b64" in r else r["body_raw"].encode("utf-8")


def run_fixture(name: str, body: bytes | None = None, pieces: int = 0) -> Extraction:
    """The fixture's response through the API its request path names; `pieces` > 0 splits evenly."""
    fx = fixture(name)
    req, resp = fx["request"], fx["response"]
    data = body_of(fx) if body is None else body
    ex = make_extractor(detect_api(req["method"], req["path"]), status=resp["status"], headers=resp["headers"])
    step = max(1, len(data) // pieces) if pieces else len(data) or 1
    for i in range(0, len(data), step):
        ex.feed(data[i : i + step])
    return ex.finish()


def sse(*events: dict[str, Any], done: bool = True, sep: str = "\n") -> bytes:
    text = "".join(f"data: {json.dumps(e, ensure_ascii=False)}{sep}{sep}" for e in events)
    return (text + (f"data: [DONE]{sep}{sep}" if done else "")).encode("utf-8")


def chat_chunk(**delta: Any) -> dict[str, Any]:
    return {"model": "m-1", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


FINISH = {"model": "m-1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}


# --- detect_api -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "api"),
    [
        ("POST", "/v1/chat/completions", "openai.chat"),
        ("POST", "/openrouter/chat/completions", "openai.chat"),
        ("POST", "/api/v1/chat/completions?x=1", "openai.chat"),
        ("POST", "/v1/responses", "openai.responses"),
        ("POST", "/v1/messages", "anthropic.messages"),
        ("POST", "/api/chat", "ollama.chat"),
        ("POST", "/v1beta/models/gemini-2.5-pro:streamGenerateContent", "gemini.generate"),
        ("POST", "/v1beta/models/gemini-2.5-pro:generateContent", "gemini.generate"),
        ("GET", "/v1/models", "other"),
        ("POST", "/v1/embeddings", "other"),
        ("post", "/v1/chat/completions", "openai.chat"),
    ],
)
def test_detect_api(method: str, path: str, api: str) -> None:
    assert detect_api(method, path, b"{}") == api


def test_detect_api_never_raises() -> None:
    assert detect_api(None, None, None) == "other"  # type: ignore[arg-type]


# --- each dialect on its own transcripts ----------------------------------------------------


def test_deepseek_stream_reasoning_and_tool_arguments() -> None:
    got = run_fixture("deepseek_stream_tools_nospace", pieces=9)
    assert got.reasoning == "Need the weather in Köln and in Zürich — call the tool twice."
    assert [t["arguments"] for t in got.tool_calls or []] == ['{"city":"Köln"}', '{"city":"Zürich"}']
    assert [t["id"] for t in got.tool_calls or []] == ["call_tst_a", "call_tst_b"]
    assert got.content is None
    assert got.complete is True and got.finish_reason == "tool_calls"
    assert (got.input_tokens, got.output_tokens, got.reasoning_tokens) == (40, 30, 12)


def test_openrouter_reasoning_rebuilt_from_details_and_encrypted_counted() -> None:
    got = run_fixture("openrouter_reasoning_details_only")
    assert got.reasoning == "**Plan** sum the digits; 1+2+3 = 6."
    assert got.redacted_reasoning_blocks == 1
    assert got.content == "The sum is 6."


def test_mirrored_reasoning_fields_count_once() -> None:
    got = run_fixture("vllm_reasoning_mirrored")
    assert got.reasoning == "Short question, short answer."
    assert got.content == "\n\nYes."  # the answer's leading newlines are kept


def test_anthropic_stream_thinking_redacted_and_tool_use() -> None:
    got = run_fixture("anthropic_stream_tool_use_redacted", pieces=13)
    assert got.reasoning == "Look up the flight, then answer in ½ a line."
    assert "TESTONLY" not in (got.reasoning or "")  # signatures and redacted data are not text
    assert got.redacted_reasoning_blocks == 1
    assert got.tool_calls == [{"id": "toolu_tst_1", "name": "flight_status", "arguments": '{"flight": "LH 400"}'}]
    assert (got.input_tokens, got.output_tokens) == (30, 88)  # not message_start's placeholder 1
    assert got.complete is True


def test_anthropic_error_event_mid_stream() -> None:
    got = run_fixture("anthropic_stream_error_midstream")
    assert got.complete is False
    assert got.error is not None and got.error["type"] == "overloaded_error"
    assert got.reasoning == "Look up the flight, "


def test_anthropic_tool_use_without_input_deltas_has_empty_object() -> None:
    events = [
        ("message_start", {"type": "message_start", "message": {"model": "c", "usage": {"input_tokens": 3}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "tool_use", "id": "t1", "name": "now", "input": {}}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_stop", {"type": "message_stop"}),
    ]
    body = "".join(f"event: {n}\ndata: {json.dumps(d)}\n\n" for n, d in events).encode()
    got = extract("anthropic.messages", 200, SSE, body)
    assert got.tool_calls == [{"id": "t1", "name": "now", "arguments": "{}"}]


def test_responses_stream_not_doubled_by_done_events() -> None:
    got = run_fixture("openai_responses_stream_function_call", pieces=17)
    assert got.reasoning == "**Which unit?** Celsius is what they use."
    assert got.content == "Let me check the forecast."
    assert got.tool_calls == [{"id": "call_tst_fc", "name": "forecast", "arguments": '{"city":"Oslo"}'}]
    assert got.reasoning_tokens == 64 and got.finish_reason == "completed" and got.complete is True


def test_responses_failed_keeps_reasoning_and_reports_error() -> None:
    got = run_fixture("openai_responses_stream_failed")
    assert got.complete is False
    assert got.error is not None and got.error["message"] == "The model failed to generate a response."
    assert got.reasoning == "**Which unit?** Celsius is what they use."


def test_responses_non_streamed_body() -> None:
    body = {
        "object": "response", "status": "completed", "model": "gpt-5-tst",
        "output": [
            {"id": "rs1", "type": "reasoning", "summary": [{"type": "summary_text", "text": "A"}, {"type": "summary_text", "text": "B"}]},
            {"id": "m1", "type": "message", "content": [{"type": "output_text", "text": "Hi."}]},
        ],
        "usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3, "output_tokens_details": {"reasoning_tokens": 1}},
    }
    got = extract("openai.responses", 200, {"content-type": "application/json"}, json.dumps(body).encode())
    assert (got.reasoning, got.content, got.complete, got.stream) == ("A\n\nB", "Hi.", True, False)


def test_ollama_tool_call_arguments_object_is_serialised() -> None:
    got = run_fixture("ollama_stream_tool_call", pieces=5)
    assert got.reasoning == "Use the clock tool."
    assert got.tool_calls is not None
    assert json.loads(got.tool_calls[0]["arguments"]) == {"tz": "Europe/Berlin", "format": "24h"}
    assert got.complete is True and got.stream is True


def test_ollama_ndjson_served_as_application_json_is_a_stream() -> None:
    lines = [
        {"model": "q", "message": {"content": "Hel"}, "done": False},
        {"model": "q", "message": {"content": "lo"}, "done": False},
        {"model": "q", "message": {"content": ""}, "done": True, "done_reason": "stop", "eval_count": 2},
    ]
    body = "".join(json.dumps(x) + "\n" for x in lines).encode()
    ex = make_extractor("ollama.chat", status=200, headers={"Content-Type": "application/json"})
    ex.feed(body[:30])
    ex.feed(body[30:])
    got = ex.finish()
    assert (got.content, got.stream, got.complete, got.output_tokens) == ("Hello", True, True, 2)


def test_ollama_pretty_printed_single_body() -> None:
    obj = {"model": "q", "message": {"role": "assistant", "content": "ok"}, "done": True, "done_reason": "stop"}
    got = extract("ollama.chat", 200, {"content-type": "application/json"}, json.dumps(obj, indent=2).encode())
    assert (got.content, got.stream, got.complete) == ("ok", False, True)
    assert not any("not JSON" in n for n in got.notes)


def test_gemini_function_call_and_thoughts() -> None:
    got = run_fixture("gemini_stream_function_call_crlf", pieces=7)
    assert got.reasoning == "Need today's rate first."
    assert got.tool_calls == [{"id": None, "name": "fx_rate", "arguments": '{"from":"EUR","to":"JPY"}'}]
    # Output counts the thoughts too (candidatesTokenCount 9 + thoughtsTokenCount 28), as Gemini bills them.
    assert (got.output_tokens, got.reasoning_tokens, got.total_tokens) == (37, 28, 49)
    assert got.complete is True


def test_gemini_json_array_stream_without_sse() -> None:
    parts = [
        {"candidates": [{"content": {"parts": [{"text": "a"}]}}], "modelVersion": "g"},
        {"candidates": [{"content": {"parts": [{"text": "b"}]}, "finishReason": "STOP"}]},
    ]
    got = extract("gemini.generate", 200, {"content-type": "application/json"}, json.dumps(parts, indent=1).encode())
    assert (got.content, got.finish_reason, got.complete) == ("ab", "STOP", True)


def gem_call(fc: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    cand: dict[str, Any] = {"content": {"role": "model", "parts": [{"functionCall": fc}]}}
    if finish:
        cand["finishReason"] = finish
    return {"candidates": [cand], "modelVersion": "gemini-3-pro-preview"}


def test_gemini_streamed_arguments_two_calls_in_a_row_and_live_view() -> None:
    part = lambda path, **v: {"partialArgs": [{"jsonPath": path, **v}], "willContinue": True}  # noqa: E731
    events = [
        gem_call({"name": "search", "willContinue": True}),
        gem_call(part("$.query", stringValue="duck")),
        gem_call(part("$.query", stringValue="db")),
        gem_call(part("$.filters[1]", stringValue="py")),
        gem_call({}),
        gem_call({"name": "search", "willContinue": True}),
        gem_call(part("$['max results']", numberValue=5)),
        gem_call({}),
        gem_call({"name": "now", "args": {}}, finish="STOP"),
    ]
    ex = make_extractor("gemini.generate", status=200, headers={"content-type": "text/event-stream"})
    body = sse(*events, done=False)
    cut = body.index(b"data:", body.index(b'"db"'))
    ex.feed(body[:cut])
    live = ex.snapshot().tool_calls
    assert live == [{"id": None, "name": "search", "arguments": '{"query":"duckdb"}'}]
    ex.feed(body[cut:])
    got = ex.finish()
    assert got.tool_calls == [
        {"id": None, "name": "search", "arguments": '{"query":"duckdb","filters":[null,"py"]}'},
        {"id": None, "name": "search", "arguments": '{"max results":5}'},
        {"id": None, "name": "now", "arguments": "{}"},
    ]
    assert got.complete is True


def test_responses_function_call_given_a_new_id_at_the_end_is_one_call() -> None:
    events = [
        {"type": "response.output_item.added", "output_index": 0,
         "item": {"id": "fc_a", "type": "function_call", "call_id": "call_1", "name": "ls", "arguments": ""}},
        {"type": "response.function_call_arguments.delta", "item_id": "fc_a", "output_index": 0, "delta": '{"path":'},
        {"type": "response.function_call_arguments.delta", "item_id": "fc_a", "output_index": 0, "delta": '"/tmp"}'},
        {"type": "response.completed", "response": {"status": "completed", "output": [
            {"id": "fc_other", "type": "function_call", "call_id": "call_1", "name": "ls", "arguments": '{"path":"/tmp"}'}]}},
    ]
    got = extract("openai.responses", 200, {"content-type": "text/event-stream"}, sse(*events, done=False))
    assert got.tool_calls == [{"id": "call_1", "name": "ls", "arguments": '{"path":"/tmp"}'}]


def test_responses_odd_output_index_loses_nothing() -> None:
    events = [
        {"type": "response.output_text.delta", "output_index": [1], "item_id": "m", "content_index": 0, "delta": "a"},
        {"type": "response.output_item.done", "output_index": {}, "item": {"id": "m", "type": "message", "content": []}},
        {"type": "response.output_text.delta", "output_index": 0, "item_id": "m", "content_index": 0, "delta": "b"},
    ]
    got = extract("openai.responses", 200, {"content-type": "text/event-stream"}, sse(*events, done=False))
    assert got.content == "ab"
    assert not [n for n in got.notes if n.startswith("extraction failed")]


def test_mistral_non_streamed_thinking_parts() -> None:
    body = {"model": "magistral-small-2509", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": [
            {"type": "thinking", "thinking": [{"type": "text", "text": "Short question."}]},
            {"type": "text", "text": "Yes."}]}}]}
    got = extract("openai.chat", 200, {"content-type": "application/json"}, json.dumps(body).encode())
    assert (got.reasoning, got.content, got.complete) == ("Short question.", "Yes.", True)


def test_error_responses() -> None:
    gem = run_fixture("gemini_error_429")
    assert gem.error is not None
    assert (gem.error["type"], gem.error["retry_after_seconds"], gem.complete) == ("RESOURCE_EXHAUSTED", 7, False)
    oll = run_fixture("ollama_error_404")
    assert oll.error is not None and oll.error["message"] == 'model "nope" not found, try pulling it first'
    text = extract("openai.chat", 502, [("Content-Type", "text/html")], b"<html>Bad gateway</html>")
    assert text.error == {"status": 502, "type": None, "code": None, "message": "<html>Bad gateway</html>",
                          "request_id": None, "retry_after_seconds": None}
    assert text.complete is False


def test_in_band_error_overrides_done() -> None:
    got = run_fixture("openrouter_error_midstream")
    assert got.complete is False and got.content == "Partial"
    assert got.error is not None and got.error["message"] == "Upstream provider went away"


# --- framing --------------------------------------------------------------------------------


def test_utf8_character_split_at_every_point() -> None:
    body = sse(chat_chunk(reasoning_content="π≈3.14 🥧"), chat_chunk(content="Grüße 👋"), FINISH)
    for cut in range(1, len(body)):
        ex = make_extractor("openai.chat", status=200, headers=SSE)
        ex.feed(body[:cut])
        ex.feed(body[cut:])
        got = ex.finish()
        assert (got.reasoning, got.content, got.complete) == ("π≈3.14 🥧", "Grüße 👋", True), cut
        assert got.notes == [], cut


def test_three_way_splits_of_a_short_stream() -> None:
    body = sse(chat_chunk(content="é"), done=True)
    for a in range(1, len(body)):
        for b in range(a + 1, len(body)):
            ex = make_extractor("openai.chat", status=200, headers=SSE)
            for piece in (body[:a], body[a:b], body[b:]):
                ex.feed(piece)
            got = ex.finish()
            assert (got.content, got.complete) == ("é", True), (a, b)


def test_crlf_gives_the_same_result_as_lf() -> None:
    fx = fixture("anthropic_stream_tool_use_redacted")
    lf = run_fixture("anthropic_stream_tool_use_redacted")
    crlf = run_fixture("anthropic_stream_tool_use_redacted", body_of(fx).replace(b"\n", b"\r\n"), pieces=11)
    assert crlf == lf


def test_data_without_space_comments_and_single_newline_events() -> None:
    body = (
        b": keep-alive\n\n"
        b'data:{"model":"m","choices":[{"index":0,"delta":{"content":"a"}}]}\n'
        b'data: {"model":"m","choices":[{"index":0,"delta":{"content":"b"}}]}\n'
        b": OPENROUTER PROCESSING\n"
        b"\n"
        b"data:[DONE]\n\n"
    )
    got = extract("openai.chat", 200, SSE, body)
    assert (got.content, got.complete) == ("ab", True)


def test_sse_labelled_as_json_is_still_read_as_a_stream() -> None:
    body = sse(chat_chunk(content="hi"), FINISH)
    got = extract("openai.chat", 200, {"content-type": "application/json"}, body)
    assert (got.content, got.stream, got.complete) == ("hi", True, True)


def test_cut_stream_keeps_what_arrived() -> None:
    got = run_fixture("openai_chat_stream_cut")
    assert got.content == "Once upon a time"
    assert got.complete is False
    assert "stream ended without its terminator" in got.notes


def test_tool_call_deltas_without_index() -> None:
    def tc(**kw: Any) -> dict[str, Any]:
        return chat_chunk(tool_calls=[kw])

    body = sse(
        tc(id="c1", function={"name": "f", "arguments": '{"a"'}),
        tc(function={"arguments": ":1}"}),
        tc(id="c2", function={"name": "g", "arguments": "{}"}),
        FINISH,
    )
    got = extract("openai.chat", 200, SSE, body)
    assert got.tool_calls == [{"id": "c1", "name": "f", "arguments": '{"a":1}'}, {"id": "c2", "name": "g", "arguments": "{}"}]


def test_snapshot_shows_progress_then_finish_settles() -> None:
    body = sse(chat_chunk(content="Hello"), chat_chunk(content=" world"), FINISH)
    ex = make_extractor("openai.chat", status=200, headers=SSE)
    half = body.index(b"world")
    ex.feed(body[:half])
    snap = ex.snapshot()
    assert (snap.content, snap.complete, snap.stream) == ("Hello", None, True)
    ex.feed(body[half:])
    final = ex.finish()
    assert (final.content, final.complete) == ("Hello world", True)
    ex.feed(b"data: garbage\n\n")  # after finish: ignored
    assert ex.finish() == final and ex.snapshot() == final


def test_unknown_path_sniffs_the_dialect() -> None:
    got = extract("other", 200, SSE, sse(chat_chunk(content="x"), FINISH))
    assert (got.content, got.complete) == ("x", True)
    models = extract("other", 200, {"content-type": "application/json"}, b'{"object":"list","data":[]}')
    assert models.complete is True and models.notes == []


# --- whole events read at once vs the line parser --------------------------------------------
# Complete SSE events are read a batch at a time, the usual shapes without the line parser.
# Fed a byte at a time with a snapshot after each byte, every line goes through the line parser
# as it completes, so that run is the reference the batched reading must match exactly.


def line_by_line(api: str, body: bytes, headers: dict[str, str] | None = None) -> Extraction:
    ex = make_extractor(api, status=200, headers=headers or SSE)
    for i in range(len(body)):
        ex.feed(body[i : i + 1])
        ex.snapshot()
    return ex.finish()


def split_everywhere(api: str, body: bytes, headers: dict[str, str] | None = None) -> list[Extraction]:
    """The body whole, and in two pieces cut at every point, without snapshots."""
    out = [extract(api, 200, headers or SSE, body)]
    for cut in range(1, len(body)):
        ex = make_extractor(api, status=200, headers=headers or SSE)
        ex.feed(body[:cut])
        ex.feed(body[cut:])
        out.append(ex.finish())
    return out


def ev(text: str) -> str:
    return json.dumps(chat_chunk(content=text))


TRICKY_SSE = {
    "comments_and_blank_lines": f"\n: keep-alive\n\n\n\ndata: {ev('a')}\n\n:\n\ndata:{ev('b')}\n\n\ndata: [DONE]\n\n",
    "crlf": f"data: {ev('a')}\r\n\r\ndata: {ev('b')}\r\n\r\ndata: [DONE]\r\n\r\n",
    "mixed_endings_and_stray_cr": f"data: {ev('a')}\r\n\ndata: {ev('x')}\r\r\n\r\ndata: {ev('b')}\n\r\n",
    "cr_inside_a_string": 'data: {"model":"m","choices":[{"index":0,"delta":{"content":"a\rb"}}]}\r\n\r\n',
    "json_over_two_data_lines": 'data: {"model":"m","choices":[{"index":0,\ndata: "delta":{"content":"a"}}]}\n\n',
    "value_over_two_lines_of_one_field": 'data: {"model":"m",\n"choices":[]}\n\n' + f"data: {ev('b')}\n\n",
    "glued_by_single_newlines": f"data: {ev('a')}\ndata: {ev('b')}\ndata: [DONE]\n\n",
    "malformed_between_good": f"data: {ev('a')}\n\ndata: {{nope\n\ndata: {ev('b')}\n\n",
    "malformed_after_comments": f": c\n\n\n\nevent: x\ndata: {ev('a')}\n\n:\n\ndata: {{nope\n\n",
    "values_that_only_parse_together": f"data: [1\n\ndata: 2]\n\ndata: 3, 4\n\ndata: {ev('a')}\n\n",
    "whitespace_around_payloads": f"data:  {ev('a')}\n\ndata: {ev('b')} \n\ndata: \n\ndata:\n\ndata:  [DONE] \n\n",
    "event_names_and_other_fields": (
        f"id: 1\nevent: x\ndata: {ev('a')}\n\nevent:y\ndata:{ev('b')}\n\nretry: 5\n\n"
        f"event: error\ndata: {{\"message\": \"boom\"}}\n\nevent: lonely\n\ndata\n\n"
    ),
    "cut_inside_an_event": f"data: {ev('a')}\n\nevent: e\ndata: {ev('b')}",
    "cut_inside_a_line": f"data: {ev('a')}\n\ndata: {ev('b')[:20]}",
    "last_event_without_blank_line": f"data: {ev('a')}\n\ndata: {ev('b')}\n",
    "non_ascii": f"data: {ev('π≈3.14 🥧')}\n\ndata: {json.dumps(chat_chunk(content='Grüße'), ensure_ascii=False)}\n\n",
}


@pytest.mark.parametrize("name", sorted(TRICKY_SSE))
def test_batched_events_read_like_the_line_parser(name: str) -> None:
    body = TRICKY_SSE[name].encode()
    want = line_by_line("openai.chat", body)
    for got in split_everywhere("openai.chat", body):
        assert got == want


def test_batched_events_with_event_names_read_like_the_line_parser() -> None:
    body = body_of(fixture("anthropic_stream_tool_use_redacted"))
    want = line_by_line("anthropic.messages", body)
    assert want.tool_calls and want.complete is True
    for got in split_everywhere("anthropic.messages", body):
        assert got == want
    crlf = body.replace(b"\n", b"\r\n")
    assert split_everywhere("anthropic.messages", crlf)[0] == line_by_line("anthropic.messages", crlf) == want


def test_a_line_that_is_not_utf8_is_noted_in_a_batch_too() -> None:
    body = sse(chat_chunk(content="before"), done=False) + b"data: \xff\xfe\n\n"
    body += sse(chat_chunk(content=" after"), FINISH)
    want = line_by_line("openai.chat", body)
    assert want.content == "before after" and "line 3 is not valid UTF-8" in want.notes
    for got in split_everywhere("openai.chat", body):
        assert got == want


def test_a_malformed_event_in_a_batch_is_noted_with_its_line() -> None:
    body = sse(chat_chunk(content="a"), done=False) + b"data: {oops\n\n" + sse(chat_chunk(content="b"), FINISH)
    got = extract("openai.chat", 200, SSE, body)
    assert (got.content, got.complete) == ("ab", True)
    assert got.notes == ["line 3 is not JSON"]
    assert got == line_by_line("openai.chat", body)


def test_event_boundary_split_across_reads_at_every_point() -> None:
    for sep in ("\n", "\r\n"):
        body = sse(chat_chunk(content="one "), chat_chunk(content="two"), FINISH, sep=sep)
        for got in split_everywhere("openai.chat", body):
            assert (got.content, got.complete, got.notes) == ("one two", True, []), sep


def test_snapshots_between_reads_see_the_same_as_one_pass() -> None:
    body = TRICKY_SSE["event_names_and_other_fields"].encode() + sse(chat_chunk(content="z"), FINISH)
    want = extract("openai.chat", 200, SSE, body)
    for step in (1, 7, 40):
        ex = make_extractor("openai.chat", status=200, headers=SSE)
        for i in range(0, len(body), step):
            ex.feed(body[i : i + step])
            if i % (3 * step) == 0:
                ex.snapshot()
        assert ex.finish() == want, step


def test_a_long_stream_without_snapshots_is_read_as_it_grows() -> None:
    # Unread bytes are capped: a stream longer than that is read while it arrives.
    from llmtap.dialects.framing import _SSE_BATCH

    body = sse(*[chat_chunk(content=f"{i} ") for i in range(3000)], FINISH)
    ex = make_extractor("openai.chat", status=200, headers=SSE)
    half = len(body) // 2
    for i in range(0, half, 100):
        ex.feed(body[i : min(i + 100, half)])
    assert ex.reader.sse_pending_len < _SSE_BATCH <= half
    for i in range(half, len(body), 100):
        ex.feed(body[i : i + 100])
    assert ex.finish().content == "".join(f"{i} " for i in range(3000))


# Chat deltas that hold only text take a shortcut past the general walk; these shapes must give
# what the general walk gives, whether they take the shortcut or not.
CHAT_SHAPES = [
    chat_chunk(content="t"),
    chat_chunk(role="assistant", content=""),
    chat_chunk(content=None, reasoning_content="r"),
    chat_chunk(content="c", reasoning_content=None),
    chat_chunk(reasoning="R", reasoning_content="R"),  # mirrored: counted once
    chat_chunk(reasoning="", reasoning_content="rc"),
    chat_chunk(reasoning={"text": "not a string"}, reasoning_content="rc"),
    chat_chunk(content="c", refusal=None),
    chat_chunk(content=[{"type": "text", "text": "part"}]),
    chat_chunk(content="c", reasoning_details=[{"type": "reasoning.encrypted", "data": "x"}]),
    chat_chunk(tool_calls=[{"index": 0, "id": "t", "function": {"name": "f", "arguments": "{}"}}]),
    {"model": "m", "choices": [{"index": 1, "delta": {"content": "second choice"}}]},
    {"model": "m", "choices": [{"index": None, "delta": {"content": "n"}, "finish_reason": "stop"}]},
    {"model": "m", "choices": [{"delta": {"content": "a"}}, {"index": 1, "delta": {"content": "b"}}]},
    {"model": "m", "choices": [{"index": 0, "delta": {"content": "u"}}], "usage": {"prompt_tokens": 2}},
    {"model": "m", "choices": [{"index": 0, "delta": {"content": "e"}}], "error": {"message": "late"}},
    {"model": "m", "choices": [{"index": 0, "delta": {}, "text": "legacy"}]},
    {"model": "", "usage": None, "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": 5}]},
]


@pytest.mark.parametrize("shape", CHAT_SHAPES, ids=range(len(CHAT_SHAPES)))
def test_chat_delta_shortcut_gives_what_the_general_walk_gives(
    shape: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmtap.dialects import openai_chat

    body = sse(chat_chunk(content="<"), shape, chat_chunk(content=">"), FINISH)
    got = extract("openai.chat", 200, SSE, body)
    monkeypatch.setattr(openai_chat.ChatReader, "event", lambda self, name, obj: self._event(obj))
    assert got == extract("openai.chat", 200, SSE, body)


# --- encodings and garbage ------------------------------------------------------------------


def test_gzip_stream_decoded_incrementally() -> None:
    body = sse(chat_chunk(content="zipped "), chat_chunk(content="text"), FINISH)
    comp = zlib.compressobj(wbits=31)
    gz = comp.compress(body) + comp.flush(zlib.Z_SYNC_FLUSH)
    tail = comp.flush()
    ex = make_extractor("openai.chat", status=200, headers={**SSE, "Content-Encoding": "gzip"})
    for i in range(0, len(gz), 5):
        ex.feed(gz[i : i + 5])
    assert ex.snapshot().content == "zipped text"  # readable before the body ends
    ex.feed(tail)
    got = ex.finish()
    assert (got.content, got.complete, got.notes) == ("zipped text", True, [])


def test_gzip_whole_body_fixture() -> None:
    got = run_fixture("deepseek_nonstream_gzip", pieces=6)
    assert got.tool_calls == [{"id": "call_gz_1", "name": "stock", "arguments": '{"sku": "A-1"}'}]
    assert got.reasoning == "The user asks about stock; use the tool."


def test_brotli_body() -> None:
    brotli = pytest.importorskip("brotli")
    body = json.dumps({"model": "m", "choices": [{"index": 0, "message": {"content": "brotli!"}, "finish_reason": "stop"}]})
    data = brotli.compress(body.encode())
    ex = make_extractor("openai.chat", status=200, headers={"content-type": "application/json", "content-encoding": "br"})
    for i in range(0, len(data), 3):
        ex.feed(data[i : i + 3])
    assert ex.finish().content == "brotli!"


def test_raw_deflate_body() -> None:
    comp = zlib.compressobj(wbits=-15)
    data = comp.compress(sse(chat_chunk(content="raw"), FINISH)) + comp.flush()
    got = extract("openai.chat", 200, {**SSE, "content-encoding": "deflate"}, data)
    assert (got.content, got.complete) == ("raw", True)


def test_broken_gzip_is_a_note_not_an_exception() -> None:
    got = extract("openai.chat", 200, {**SSE, "content-encoding": "gzip"}, b"\x1f\x8b\x08\x00garbage-not-gzip" * 3)
    assert "gzip body could not be decoded" in got.notes
    assert got.content is None


def test_truncated_gzip_keeps_what_decoded() -> None:
    gz = gzip.compress(sse(chat_chunk(content="first"), chat_chunk(content=" second"), FINISH))
    got = extract("openai.chat", 200, {**SSE, "content-encoding": "gzip"}, gz[: len(gz) // 2])
    assert got.complete is False
    assert "gzip body is truncated" in got.notes


def test_gzip_header_on_a_plain_body() -> None:
    got = extract("openai.chat", 200, {**SSE, "content-encoding": "gzip"}, sse(chat_chunk(content="plain"), FINISH))
    assert (got.content, got.complete) == ("plain", True)
    assert any("read as is" in n for n in got.notes)


def test_non_json_body() -> None:
    got = extract("openai.chat", 200, {"content-type": "text/plain"}, b"Hello, I am not JSON")
    assert got.notes == ["response body is not JSON"]
    assert got.content is None and got.complete is None


def test_non_utf8_body() -> None:
    got = extract("anthropic.messages", 200, {"content-type": "application/json"}, b"\xff\xfe\x00garbage\x80")
    assert got.notes == ["response body is not valid UTF-8 and not JSON"]


def test_non_utf8_line_in_a_stream_is_noted_and_the_rest_read() -> None:
    body = b"data: \xff\xfe\n\n" + sse(chat_chunk(content="after"), FINISH)
    got = extract("openai.chat", 200, SSE, body)
    assert got.content == "after" and got.complete is True
    assert "line 1 is not valid UTF-8" in got.notes and "line 1 is not JSON" in got.notes


def test_garbage_never_raises() -> None:
    blobs = [b"", b"\n\n\n", b"data: {\n\n", b"data: [1,2]\n\n", b"event: error\ndata: 5\n\n", b"{\"choices\": 5}",
             b"\x00" * 50, b"null", b'{"candidates": [null, 3]}', b'{"message": 1, "done": true}', bytes(range(256))]
    for api in ("openai.chat", "openai.responses", "anthropic.messages", "ollama.chat", "gemini.generate", "other"):
        for ctype in ("text/event-stream", "application/json", "application/x-ndjson", ""):
            for blob in blobs:
                for status in (200, 500, None):
                    got = extract(api, status, {"content-type": ctype}, blob)
                    assert isinstance(got, Extraction)


def test_notes_are_bounded() -> None:
    got = extract("openai.chat", 200, SSE, b"data: nope\n\n" * 1000)
    assert len(got.notes) <= 21


def test_feed_is_linear_in_a_long_line() -> None:
    # Re-joining the unfinished line on every chunk would make this quadratic (minutes).
    text = "x" * 2_000_000
    body = sse(chat_chunk(content=text), FINISH)
    ex = make_extractor("openai.chat", status=200, headers=SSE)
    start = time.perf_counter()
    for i in range(0, len(body), 32):
        ex.feed(body[i : i + 32])
    got = ex.finish()
    assert got.content == text
    assert time.perf_counter() - start < 10


def test_imports_only_the_standard_library() -> None:
    code = (
        "import sys, llmtap.recorder.extract\n"
        "bad = [m for m in ('mitmproxy', 'textual', 'duckdb', 'brotli', 'zstandard', 'yaml') if m in sys.modules]\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- every own transcript, as the conformance run does it ----------------------------------


@pytest.mark.parametrize("path", sorted(WIRE.glob("*.json")), ids=lambda p: p.stem)
def test_own_transcripts_match_expected(path: Path) -> None:
    from test_conformance import check, chunks_of, load, run

    fx = load(path)
    check(run(fx, chunks_of(fx)), fx["expected"], detect_api(fx["request"]["method"], fx["request"]["path"]))


def test_cut_ollama_stream_labelled_json_keeps_its_lines() -> None:
    lines = [
        {"model": "q", "message": {"content": "Hel"}, "done": False},
        {"model": "q", "message": {"content": "lo"}, "done": False},
    ]
    body = "".join(json.dumps(x) + "\n" for x in lines).encode() + b'{"model":"q","mess'
    got = extract("ollama.chat", 200, {"content-type": "application/json"}, body)
    assert (got.content, got.stream, got.complete) == ("Hello", True, False)
    assert "stream ended inside a line" in got.notes


@pytest.mark.parametrize(("body", "expected"), [
    # OpenAI chat: string and list content, tool results; images and tool-call arguments are not text
    ({"messages": [{"role": "system", "content": "Be terse."},
                   {"role": "user", "content": [{"type": "text", "text": "hit rate limits"},
                                                {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}}]},
                   {"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{\"q\": 1}"}}]},
                   {"role": "tool", "tool_call_id": "c1", "content": "429 from upstream"}]},
     "Be terse.\n429 from upstream"),  # the resent history before the model's last turn is not this turn's
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hit rate limits"},
                                                {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}}]}]},
     "hit rate limits"),
    # Responses: instructions, input as a string or as items, tool outputs
    ({"instructions": "Sys.", "input": "plain input"}, "Sys.\nplain input"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "item text"}]},
                {"type": "function_call", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c", "output": "tool said"}]},
     "tool said"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "item text"}]}]}, "item text"),
    # Anthropic: system as string or blocks, tool_result content, thinking left out
    ({"system": [{"type": "text", "text": "Sys A"}],
      "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                 "content": [{"type": "text", "text": "result text"}]}]},
                   {"role": "assistant", "content": [{"type": "thinking", "thinking": "hidden"},
                                                     {"type": "tool_use", "input": {"x": "arg"}}]}]},
     "Sys A\nresult text"),
    # Ollama chat and generate
    ({"model": "qwen3", "messages": [{"role": "user", "content": "ollama q", "images": ["QUJD"]}]}, "ollama q"),
    ({"model": "qwen3", "system": "osys", "prompt": "generate this"}, "osys\ngenerate this"),
    # Gemini: contents parts and systemInstruction; inline data left out
    ({"systemInstruction": {"parts": [{"text": "gsys"}]},
      "contents": [{"role": "user", "parts": [{"text": "gemini q"}, {"inlineData": {"data": "QUJD"}}]}]},
     "gsys\ngemini q"),
    # Nothing to read
    ({"model": "m"}, None),
    ([1, 2], None),
])
def test_prompt_text_is_what_the_user_sent_in_every_dialect(body: object, expected: str | None) -> None:
    assert prompt_text(json.dumps(body)) == expected
    assert prompt_text(json.dumps(body).encode()) == expected


def test_prompt_text_of_a_body_that_is_not_a_chat_never_raises() -> None:
    assert prompt_text(None) is None
    assert prompt_text("not json {") is None
    assert prompt_text("\xff\xfe") is None
    deep = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert prompt_text(deep) is None
    nested = {"messages": [{"content": {"content": {"content": {"text": "deep enough"}}}}]}
    assert prompt_text(json.dumps(nested)) == "deep enough"
