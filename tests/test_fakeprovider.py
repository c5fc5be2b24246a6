"""The fake provider is faithful: the real official SDKs, pointed straight at it
(no proxy), accept its answers; httpx sees each scripted failure as the right failure."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from fakeprovider import FakeProvider, cut, garbage, ok, reset, slow, split_text, stall, status

MSG = [{"role": "user", "content": "hi"}]
TIDE_TOOL = {"type": "function", "function": {
    "name": "get_tide_times", "description": "Tide times for a port.",
    "parameters": {"type": "object",
                   "properties": {"port": {"type": "string"}, "days": {"type": "integer"},
                                  "units": {"type": "string", "enum": ["metric", "imperial"]}},
                   "required": ["port", "days", "units"]}}}
TIDE_ARGS = {"port": "fake", "days": 1, "units": "metric"}


@pytest.fixture
def fp():
    with FakeProvider() as p:
        yield p


@pytest.fixture
def oai(fp):
    with openai.OpenAI(base_url=fp.url + "/v1", api_key="sk-test", max_retries=0) as c:
        yield c


@pytest.fixture
def ant(fp):
    with anthropic.Anthropic(base_url=fp.url, api_key="sk-ant-test", max_retries=0) as c:
        yield c


@pytest.fixture
def hx(fp):
    with httpx.Client(base_url=fp.url, timeout=10) as c:
        yield c


def sse_events(raw: bytes, sep: bytes = b"\n\n") -> list[bytes]:
    assert raw.endswith(sep)
    return raw[: -len(sep)].split(sep)


# --------------------------------------------------------------------------- OpenAI chat

def test_openai_chat_nonstream(fp, oai):
    r = oai.chat.completions.create(model="gpt-fake", messages=MSG)
    assert r.model == "gpt-fake"
    assert r.choices[0].message.content == fp.reply_text
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == fp.input_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    (req,) = fp.wait_requests(1)
    assert req.method == "POST" and req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-test"
    assert req.json["model"] == "gpt-fake" and req.model == "gpt-fake"
    assert json.loads(req.body) == req.json
    assert req.dialect == "openai" and req.behaviour == "ok" and not req.disconnected


def test_openai_chat_stream_usage_and_done(fp, oai, hx):
    chunks = list(oai.chat.completions.create(model="m-stream", messages=MSG, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == fp.reply_text
    assert all(c.model == "m-stream" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    # The raw framing: data-only events, usage chunk with empty choices, then [DONE].
    raw = hx.post("/v1/chat/completions", json={"model": "m", "messages": MSG, "stream": True,
                                                "stream_options": {"include_usage": True}})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["transfer-encoding"] == "chunked"
    evs = sse_events(raw.content)
    assert all(e.startswith(b"data: ") for e in evs)
    assert evs[-1] == b"data: [DONE]"
    assert json.loads(evs[-2][6:])["choices"] == []
    assert json.loads(evs[1][6:])["usage"] is None


def test_openai_chat_stream_without_usage_has_no_usage_chunk(fp, hx):
    raw = hx.post("/chat/completions", json={"model": "m", "messages": MSG, "stream": True})
    evs = sse_events(raw.content)
    assert evs[-1] == b"data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in evs[:-1])


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_openai_chat_reasoning_fields(fp, oai, field):
    fp.chat_reasoning_field = field
    reasoning, content = "", ""
    for c in oai.chat.completions.create(model="deepseek-r", messages=MSG, stream=True):
        d = c.choices[0].delta
        reasoning += getattr(d, field, None) or ""
        content += d.content or ""
    assert reasoning == fp.reasoning_text and content == fp.reply_text
    r = oai.chat.completions.create(model="deepseek-r", messages=MSG)
    assert getattr(r.choices[0].message, field) == fp.reasoning_text
    assert r.usage.completion_tokens_details.reasoning_tokens > 0


def test_openai_chat_tool_calls_stream_and_nonstream(fp, oai):
    with oai.chat.completions.stream(model="gpt-tools", messages=MSG, tools=[TIDE_TOOL]) as s:
        final = s.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "get_tide_times"
    assert json.loads(call.function.arguments) == TIDE_ARGS
    assert call.id.startswith("call_")
    assert final.choices[0].finish_reason == "tool_calls"
    r = oai.chat.completions.create(model="gpt-tools", messages=MSG, tools=[TIDE_TOOL])
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == TIDE_ARGS
    assert r.choices[0].message.content is None
    fp.tool_arguments = {"port": "Porto"}
    r = oai.chat.completions.create(model="gpt-tools", messages=MSG, tools=[TIDE_TOOL])
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"port": "Porto"}


def test_configurable_text_and_chunk_count(fp, oai):
    fp.reply_text = "abcdefghij"
    fp.script(ok(chunks=4))
    pieces = [c.choices[0].delta.content
              for c in oai.chat.completions.create(model="m", messages=MSG, stream=True)
              if c.choices and c.choices[0].delta.content]
    assert pieces == ["abc", "def", "gh", "ij"]
    assert split_text("a bc  d", None) == ["a", " bc", "  d"]


def test_split_events_still_parse(fp, oai):
    fp.split_events = True
    text = "".join(c.choices[0].delta.content or ""
                   for c in oai.chat.completions.create(model="m", messages=MSG, stream=True)
                   if c.choices)
    assert text == fp.reply_text


# --------------------------------------------------------------------------- Responses

def test_responses_stream_with_reasoning_summary(fp, oai, hx):
    fp.reasoning_text = "**Plan**\n\nFirst part.\n\n**Check**\n\nSecond part."
    with oai.responses.stream(model="o-fake", input="hi",
                              reasoning={"effort": "low", "summary": "auto"}) as s:
        types = [e.type for e in s]
        final = s.get_final_response()
    assert final.model == "o-fake" and final.status == "completed"
    assert final.output_text == fp.reply_text
    reasoning = final.output[0]
    assert reasoning.type == "reasoning"
    assert "\n\n".join(p.text for p in reasoning.summary) == fp.reasoning_text
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "response.reasoning_summary_text.delta" in types
    assert final.usage.output_tokens_details.reasoning_tokens > 0
    raw = hx.post("/v1/responses", json={"model": "o", "input": "hi", "stream": True,
                                         "reasoning": {"summary": "auto"}})
    evs = sse_events(raw.content)
    seqs = [json.loads(e.split(b"\ndata: ", 1)[1])["sequence_number"] for e in evs]
    assert seqs == list(range(len(evs)))
    assert all(e.startswith(b"event: response.") for e in evs)


def test_responses_nonstream_and_function_call(fp, oai):
    r = oai.responses.create(model="o-fake", input="hi")
    assert r.output_text == fp.reply_text and r.model == "o-fake"
    assert [o.type for o in r.output] == ["message"]      # no reasoning asked for
    tool = {"type": "function", "name": "get_tide_times",
            "parameters": TIDE_TOOL["function"]["parameters"]}
    with oai.responses.stream(model="o-fake", input="hi", tools=[tool]) as s:
        final = s.get_final_response()
    call = [o for o in final.output if o.type == "function_call"][0]
    assert call.name == "get_tide_times" and json.loads(call.arguments) == TIDE_ARGS


# --------------------------------------------------------------------------- Anthropic

def test_anthropic_stream_with_thinking(fp, ant, hx):
    with ant.messages.stream(model="claude-fake", max_tokens=2048,
                             thinking={"type": "enabled", "budget_tokens": 1024},
                             messages=MSG) as s:
        kinds = [e.type for e in s]
        msg = s.get_final_message()
    assert msg.model == "claude-fake" and msg.stop_reason == "end_turn"
    thinking, text = msg.content
    assert thinking.type == "thinking" and thinking.thinking == fp.reasoning_text
    assert thinking.signature
    assert text.type == "text" and text.text == fp.reply_text
    assert msg.usage.output_tokens > 1 and msg.usage.input_tokens == fp.input_tokens
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    raw = hx.post("/v1/messages", json={"model": "c", "max_tokens": 9, "messages": MSG,
                                        "stream": True, "thinking": {"type": "enabled",
                                                                     "budget_tokens": 1024}})
    names = [e.split(b"\n", 1)[0] for e in sse_events(raw.content)]
    assert names[:3] == [b"event: message_start", b"event: content_block_start", b"event: ping"]
    assert names[-2:] == [b"event: message_delta", b"event: message_stop"]
    assert b'"signature_delta"' in raw.content


def test_anthropic_nonstream_without_thinking_and_tool_use(fp, ant):
    m = ant.messages.create(model="claude-fake", max_tokens=64, messages=MSG)
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == fp.reply_text
    tool = {"name": "get_tide_times", "description": "tides",
            "input_schema": TIDE_TOOL["function"]["parameters"]}
    m = ant.messages.create(model="claude-fake", max_tokens=64, messages=MSG, tools=[tool])
    assert m.stop_reason == "tool_use" and m.content[-1].input == TIDE_ARGS
    with ant.messages.stream(model="claude-fake", max_tokens=64, messages=MSG,
                             tools=[tool]) as s:
        m = s.get_final_message()
    assert m.content[-1].type == "tool_use" and m.content[-1].input == TIDE_ARGS


def test_anthropic_overloaded_529_through_sdk(fp, ant):
    fp.script(status(529))
    with pytest.raises(anthropic.APIStatusError) as ei:
        ant.messages.create(model="claude-fake", max_tokens=64, messages=MSG)
    assert ei.value.status_code == 529
    assert ei.value.body["error"]["type"] == "overloaded_error"
    assert ei.value.response.headers["x-should-retry"] == "true"


# --------------------------------------------------------------------------- Ollama, Gemini

def test_ollama_ndjson(fp, hx):
    fp.script(ok(chunks=3))
    with hx.stream("POST", "/api/chat", json={"model": "qwen3:8b", "messages": MSG,
                                               "think": True}) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert all(line["model"] == "qwen3:8b" for line in lines)
    assert "".join(line["message"].get("thinking", "") for line in lines) == fp.reasoning_text
    assert "".join(line["message"]["content"] for line in lines) == fp.reply_text
    assert [line["done"] for line in lines] == [False] * 6 + [True]
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] == 6
    one = hx.post("/api/chat", json={"model": "qwen3:8b", "messages": MSG, "stream": False})
    assert one.json()["done"] is True and one.json()["message"]["content"] == fp.reply_text
    assert hx.get("/api/tags").json()["models"][0]["name"] == fp.models[0]


def test_gemini_sse_crlf_and_nonstream(fp, hx):
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
            "generationConfig": {"thinkingConfig": {"includeThoughts": True}}}
    r = hx.post("/v1beta/models/gemini-fake:streamGenerateContent?alt=sse", json=body)
    assert r.headers["content-type"] == "text/event-stream"
    assert b"\n\n" not in r.content.replace(b"\r\n\r\n", b"")
    objs = [json.loads(e[6:]) for e in sse_events(r.content, b"\r\n\r\n")]
    parts = [p for o in objs for p in o["candidates"][0]["content"]["parts"]]
    assert "".join(p["text"] for p in parts if p.get("thought")) == fp.reasoning_text
    assert "".join(p["text"] for p in parts if not p.get("thought")) == fp.reply_text
    assert objs[-1]["candidates"][0]["finishReason"] == "STOP"
    assert all(o["modelVersion"] == "gemini-fake" for o in objs)
    assert objs[-1]["usageMetadata"]["thoughtsTokenCount"] > 0
    one = hx.post("/v1beta/models/gemini-fake:generateContent", json=body).json()
    assert one["candidates"][0]["content"]["parts"][-1]["text"] == fp.reply_text
    arr = hx.post("/v1beta/models/gemini-fake:streamGenerateContent", json=body).json()
    assert isinstance(arr, list) and len(arr) == len(objs)
    assert fp.wait_requests(3)[0].model == "gemini-fake"


# --------------------------------------------------------------------------- misc paths

def test_models_and_unknown_path(fp, oai, hx):
    assert [m.id for m in oai.models.list()] == fp.models
    r = hx.get("/v1/nothing-here?x=1")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert fp.requests[-1].path == "/v1/nothing-here?x=1"
    bad = hx.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["type"] == "error"
    assert fp.requests[-1].json is None


def test_prefix_paths(fp, hx):
    r = hx.post("/openrouter/api/v1/chat/completions", json={"model": "x/y", "messages": MSG})
    assert r.json()["model"] == "x/y"
    r = hx.post("/anthropic/v1/messages", json={"model": "c", "max_tokens": 5, "messages": MSG})
    assert r.json()["type"] == "message"


# --------------------------------------------------------------------------- behaviours

def test_status_openai_with_retry_after(fp, hx, oai):
    fp.script(status(429, retry_after=3))
    r = hx.post("/v1/chat/completions", json={"model": "gpt-x", "messages": MSG, "stream": True})
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    fp.script(status(500, body={"custom": True}, headers={"X-Extra": "1"}))
    r = hx.post("/v1/chat/completions", json={"model": "gpt-x", "messages": MSG})
    assert r.status_code == 500 and r.json() == {"custom": True} and r.headers["x-extra"] == "1"
    fp.script(status(503))
    with pytest.raises(openai.InternalServerError) as ei:
        oai.chat.completions.create(model="gpt-x", messages=MSG)
    assert ei.value.status_code == 503
    assert hx.post("/v1/chat/completions", json={"model": "gpt-x", "messages": MSG}).status_code == 200


def test_status_gemini_and_ollama_dialects(fp, hx):
    fp.script(status(429), status(500))
    r = hx.post("/v1beta/models/g:generateContent", json={"contents": []})
    assert r.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    r = hx.post("/api/chat", json={"model": "q", "messages": MSG})
    assert r.status_code == 500 and isinstance(r.json()["error"], str)


def test_script_for_model_and_fifo(fp, hx):
    fp.script_for_model("bad-model", status(503))
    fp.script(status(418))
    post = lambda m: hx.post("/v1/chat/completions", json={"model": m, "messages": MSG})  # noqa: E731
    assert [post("bad-model").status_code for _ in range(3)] == [503, 503, 503]
    assert post("good").status_code == 418     # FIFO untouched by the override
    assert post("good").status_code == 200
    fp.script_for_model("bad-model", None)
    assert post("bad-model").status_code == 200


def test_reset_before_response(fp, hx):
    fp.script(reset(), reset(rst=False))
    with pytest.raises(httpx.ReadError):
        hx.post("/v1/chat/completions", json={"model": "m", "messages": MSG})
    with pytest.raises(httpx.RemoteProtocolError):
        hx.post("/v1/chat/completions", json={"model": "m", "messages": MSG})
    assert len(fp.wait_requests(2)) == 2      # the request was read before the reset
    assert hx.post("/v1/chat/completions", json={"model": "m", "messages": MSG}).status_code == 200


def test_stall_is_a_read_timeout_then_a_disconnect(fp, hx):
    fp.script(stall(60))
    with pytest.raises(httpx.ReadTimeout):
        hx.post("/v1/chat/completions", json={"model": "m", "messages": MSG}, timeout=0.2)
    assert fp.wait_disconnects(1) == 1
    assert fp.requests[0].disconnected


def test_stall_then_answer(fp, hx):
    fp.script(stall(0.01))
    r = hx.post("/v1/chat/completions", json={"model": "m", "messages": MSG})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == fp.reply_text


@pytest.mark.parametrize("rst,exc", [(True, httpx.ReadError), (False, httpx.RemoteProtocolError)])
def test_cut_mid_stream(fp, hx, rst, exc):
    fp.script(cut(after_events=3, rst=rst))
    got = []
    with pytest.raises(exc):
        with hx.stream("POST", "/v1/messages", json={"model": "c", "max_tokens": 9,
                                                     "messages": MSG, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("event: "):
                    got.append(line)
    assert got == ["event: message_start", "event: content_block_start", "event: ping"]


def test_cut_nonstream_truncates_body(fp, hx):
    fp.script(cut())
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        hx.post("/v1/chat/completions", json={"model": "m", "messages": MSG})


def test_cut_seen_by_openai_sdk(fp, oai):
    fp.script(cut(after_events=2))
    with pytest.raises((openai.APIConnectionError, httpx.ReadError, httpx.RemoteProtocolError)):
        for _ in oai.chat.completions.create(model="m", messages=MSG, stream=True):
            pass


def test_garbage(fp, hx):
    fp.script(garbage())
    r = hx.post("/v1/chat/completions", json={"model": "m", "messages": MSG})
    assert r.status_code == 200
    with pytest.raises(UnicodeDecodeError):
        r.content.decode("utf-8")
    with pytest.raises(ValueError):
        json.loads(r.content)


def test_client_disconnect_mid_stream_is_counted(fp, hx):
    fp.script(slow(60, chunks=5))        # far longer than the test: only a disconnect ends it
    with hx.stream("POST", "/v1/chat/completions",
                   json={"model": "m", "messages": MSG, "stream": True}) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    assert fp.wait_disconnects(1) == 1
    assert fp.disconnect_event.is_set() and fp.requests[0].disconnected
    # A completed stream is not a disconnect.
    fp.disconnect_event.clear()
    hx.post("/v1/chat/completions", json={"model": "m", "messages": MSG, "stream": True})
    assert fp.disconnects == 1


def test_reset_state(fp, hx):
    fp.script(status(500))
    fp.script_for_model("x", status(502))
    hx.post("/v1/models")
    fp.reset()
    assert fp.requests == [] and fp.disconnects == 0
    assert hx.post("/v1/chat/completions", json={"model": "x", "messages": MSG}).status_code == 200


# --------------------------------------------------------------------------- HTTP plumbing

def _raw_exchange(fp, data: bytes, n_responses: int) -> bytes:
    with socket.create_connection(("127.0.0.1", fp.port)) as s:
        s.sendall(data)
        buf = b""
        while buf.count(b"HTTP/1.1 2") < n_responses or not buf.endswith(b"}"):
            chunk = s.recv(65536)
            assert chunk, buf
            buf += chunk
        return buf


def test_chunked_request_body_expect_continue_and_pipelining(fp):
    body = json.dumps({"model": "chunky", "messages": MSG}).encode()
    chunked = b"".join(b"%x\r\n%b\r\n" % (len(body[i:i + 7]), body[i:i + 7])
                       for i in range(0, len(body), 7)) + b"0\r\n\r\n"
    req1 = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n" + chunked)
    req2 = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b"
            % (len(body), body))
    out = _raw_exchange(fp, req1 + req2, 2)
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert out.count(b'"model": "chunky"') == 2
    reqs = fp.wait_requests(2)
    assert reqs[0].body == body == reqs[1].body
    assert reqs[0].headers["transfer-encoding"] == "chunked"


def test_keep_alive_reuses_one_connection(fp, hx):
    for _ in range(3):
        hx.post("/v1/chat/completions", json={"model": "m", "messages": MSG, "stream": True})
    assert len(fp.requests) == 3 and fp.connections == 1


async def test_async_clients_and_waits(fp):
    async with openai.AsyncOpenAI(base_url=fp.url + "/v1", api_key="k", max_retries=0) as c:
        stream = await c.chat.completions.create(model="async-m", messages=MSG, stream=True)
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text == fp.reply_text
    assert (await fp.await_requests(1))[0].model == "async-m"


def test_close_drops_stalled_connections():
    fp = FakeProvider().start()
    fp.script(stall(60))
    with httpx.Client(timeout=10) as c:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            t = threading.Thread(target=lambda: (fp.wait_requests(1), fp.close()))
            t.start()
            try:
                c.post(fp.url + "/v1/chat/completions", json={"model": "m", "messages": MSG})
            finally:
                t.join()


# --------------------------------------------------------------------------- standalone / bench

def test_standalone_bench_cli():
    script = Path(__file__).with_name("fakeprovider.py")
    p = subprocess.Popen([sys.executable, str(script), "--port", "0", "--bench", "--chunks", "3",
                          "--chunk-delay-ms", "1"], stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("READY http://127.0.0.1:")
        url = line.split()[1]
        with httpx.Client(base_url=url) as c:
            r = c.post("/v1/chat/completions", json={"model": "m", "messages": MSG})
            assert r.json()["choices"][0]["message"]["content"] == "ok"
            r = c.post("/v1/chat/completions", json={"model": "m", "messages": MSG,
                                                      "stream": True})
            evs = sse_events(r.content)
            assert len(evs) == 3 + 3 and evs[-1] == b"data: [DONE]"
            # non-bench paths still answer normally
            assert c.post("/v1/messages", json={"model": "c", "max_tokens": 5,
                                                "messages": MSG}).json()["model"] == "c"
        with openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0) as oc:
            chunks = list(oc.chat.completions.create(model="m", messages=MSG, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == "tok0 tok1 tok2 "
    finally:
        p.terminate()
        assert p.wait(10) == 0
