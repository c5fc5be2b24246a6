"""The wire formats (llmtap.dialects), each on its own: which requests it recognises, reading a
request into the normalised Request, where the model is rewritten, how a key is sent, the error
llmtap answers in it, and the usage of its answers."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from llmtap.dialects import registry
from llmtap.dialects.shapes import Request


def read(api: str, body: Any, path: str = "") -> Request:
    return registry.read_request(api, json.dumps(body).encode(), path)


# --- recognising a request ---------------------------------------------------------------------


@pytest.mark.parametrize("method,path,api", [
    ("POST", "/v1/chat/completions", "openai.chat"),
    ("POST", "/openrouter/chat/completions?x=1", "openai.chat"),
    ("POST", "/openai/deployments/gpt4/chat/completions/", "openai.chat"),  # Azure
    ("POST", "/v1/responses", "openai.responses"),
    ("POST", "/v1/messages", "anthropic.messages"),
    ("POST", "/v1/threads/messages", "other"),
    ("POST", "/api/chat", "ollama.chat"),
    ("POST", "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", "gemini.generate"),
    ("POST", "/v1beta/models/gemini-2.5-pro:countTokens", "other"),
    ("GET", "/v1/chat/completions", "other"),
    ("post", "/v1/messages", "anthropic.messages"),
])
def test_detect(method: str, path: str, api: str) -> None:
    assert registry.detect(method, path).name == api


def test_detect_and_read_never_raise() -> None:
    assert registry.detect(None, None).name == "other"  # type: ignore[arg-type]
    for api in registry.names():
        for body in (b"", b"not json", b"[1, 2]", b'{"messages": 5, "contents": {"a": 1}, "input": 3, "tools": 7}',
                     b'{"messages": [null, 3, {"role": 5, "content": {"x": []}, "tool_calls": [1]}]}',
                     b'{"system": [1, {"type": "text"}], "messages": [{"content": [{"type": "tool_use"}]}]}'):
            req = registry.read_request(api, body)
            assert req.api == api
        assert registry.read_request(api, b"not json").notes


@pytest.mark.parametrize("api,body", [
    ("openai.chat", {"messages": [{"role": "user", "content": "hi"},
                                  {"role": "user", "content": [{"type": ["odd"], "text": "t"}]}]}),
    ("openai.responses", {"input": [{"role": "user", "content": "hi"}, {"type": {"odd": 1}},
                                    {"role": "user", "content": [{"type": ["odd"], "text": "t"}]}]}),
    ("anthropic.messages", {"messages": [{"role": "user", "content": "hi"},
                                         {"role": "user", "content": [{"type": ["odd"], "text": "t"}]}]}),
])
def test_a_part_typed_by_a_list_does_not_cost_the_rest_of_the_conversation(api: str, body: Any) -> None:
    # A list or object as a `type` once raised in a lookup, and the request was recorded as unreadable.
    req = read(api, body)
    assert not req.notes
    assert req.messages[0].text == "hi"
    assert "other" in [p.kind for m in req.messages[1:] for p in m.parts]


def test_every_dialect_has_a_unique_name_and_a_family() -> None:
    names = [d.name for d in registry.DIALECTS]
    assert len(names) == len(set(names)) and "other" not in names
    assert {d.family for d in registry.DIALECTS} >= {"openai", "anthropic", "ollama", "gemini"}


# --- reading requests ------------------------------------------------------------------------------


def test_openai_chat_request() -> None:
    req = read("openai.chat", {
        "model": "gpt-4o", "stream": True, "temperature": 0.2, "user": "u-1", "prompt_cache_key": "task-9",
        "messages": [
            {"role": "developer", "content": "be terse"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]},
            {"role": "assistant", "content": None, "reasoning_content": "thinking",
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get", "arguments": "{\"a\":1}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]},
        ],
        "tools": [{"type": "function", "function": {"name": "get", "description": "d", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
    })
    assert (req.model, req.stream, req.system) == ("gpt-4o", True, ("be terse",))
    assert [m.role for m in req.messages] == ["system", "user", "assistant", "tool"]
    assert req.messages[0].native_role == "developer"
    assert [p.kind for p in req.messages[1].parts] == ["text", "image"]
    call = req.messages[2].tool_calls[0]
    assert (call.id, call.name, call.arguments) == ("c1", "get", '{"a":1}')
    assert req.messages[2].reasoning == "thinking"
    assert [(r.call_id, r.content) for r in req.tool_results] == [("c1", "42")]
    assert [(t.name, t.description, t.parameters) for t in req.tools] == [("get", "d", {"type": "object"})]
    assert req.tool_choice == "auto" and req.params == {"temperature": 0.2}
    assert req.ids == {"user": "u-1", "prompt_cache_key": "task-9"}


def test_openai_responses_request() -> None:
    req = read("openai.responses", {
        "model": "gpt-5", "instructions": "inst", "previous_response_id": "resp_1", "conversation": {"id": "conv_7"},
        "reasoning": {"effort": "low"},
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hello"}]},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "plan"}]},
            {"type": "function_call", "name": "f", "arguments": "{}", "call_id": "k"},
            {"type": "function_call_output", "call_id": "k", "output": "done"},
        ],
        "tools": [{"type": "function", "name": "f", "parameters": {}}, {"type": "web_search"}],
    })
    assert req.system == ("inst",) and req.model == "gpt-5" and req.stream is None
    assert [m.role for m in req.messages] == ["user", "assistant", "tool"]
    assistant = req.messages[1]
    assert assistant.reasoning == "plan" and assistant.tool_calls[0].id == "k"
    assert [(r.call_id, r.content) for r in req.tool_results] == [("k", "done")]
    assert [(t.name, t.kind) for t in req.tools] == [("f", "function"), ("web_search", "web_search")]
    assert req.ids == {"previous_response_id": "resp_1", "conversation": "conv_7"}
    assert req.params == {"reasoning": {"effort": "low"}}
    assert read("openai.responses", {"input": "just text"}).messages[0].text == "just text"


def test_anthropic_request() -> None:
    req = read("anthropic.messages", {
        "model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": True, "metadata": {"user_id": "user-42"},
        "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                                              {"type": "redacted_thinking", "data": "x"},
                                              {"type": "tool_use", "id": "toolu_1", "name": "t", "input": {"x": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                          "content": [{"type": "text", "text": "bad"}]}]},
        ],
        "tools": [{"name": "t", "description": "a tool", "input_schema": {"type": "object"}},
                  {"type": "web_search_20250305", "name": "web_search"}],
    })
    assert (req.model, req.stream, req.system) == ("claude-sonnet-4-5", True, ("sys",))
    assert [m.role for m in req.messages] == ["user", "assistant", "user"]
    assistant = req.messages[1]
    assert assistant.reasoning == "hmm" and [p.redacted for p in assistant.parts] == [False, True, False]
    assert assistant.tool_calls[0].arguments == '{"x":1}' and assistant.tool_calls[0].id == "toolu_1"
    result = req.tool_results[0]
    assert (result.call_id, result.content, result.is_error) == ("toolu_1", "bad", True)
    assert [(t.name, t.kind, t.parameters) for t in req.tools] == [
        ("t", "function", {"type": "object"}), ("web_search", "web_search_20250305", None)]
    assert req.ids == {"metadata.user_id": "user-42"} and req.params == {"max_tokens": 1024, "metadata": {"user_id": "user-42"}}
    assert read("anthropic.messages", {"system": "plain", "messages": []}).system == ("plain",)


def test_ollama_chat_request() -> None:
    req = read("ollama.chat", {
        "model": "qwen3", "options": {"num_ctx": 8192},
        "messages": [
            {"role": "system", "content": "osys"},
            {"role": "user", "content": "look", "images": ["aGk="]},
            {"role": "assistant", "content": "", "thinking": "t",
             "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Köln"}}}]},
            {"role": "tool", "tool_name": "weather", "content": "sunny"},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}],
    })
    assert req.stream is True  # Ollama streams unless told not to
    assert req.system == ("osys",) and [m.role for m in req.messages] == ["system", "user", "assistant", "tool"]
    assert [p.kind for p in req.messages[1].parts] == ["text", "image"]
    assert req.messages[2].tool_calls[0].arguments == '{"city":"Köln"}' and req.messages[2].tool_calls[0].id is None
    assert [(r.name, r.content) for r in req.tool_results] == [("weather", "sunny")]
    assert req.params == {"options": {"num_ctx": 8192}} and req.tools[0].name == "weather"
    assert read("ollama.chat", {"model": "m", "stream": False}).stream is False


def test_gemini_request() -> None:
    path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    req = read("gemini.generate", {
        "systemInstruction": {"parts": [{"text": "gsys"}]},
        "contents": [
            {"role": "user", "parts": [{"text": "gq"}, {"inlineData": {"mimeType": "image/png", "data": "x"}}]},
            {"role": "model", "parts": [{"text": "plan", "thought": True},
                                        {"functionCall": {"id": "fc1", "name": "fc", "args": {"y": 2}}}]},
            {"role": "user", "parts": [{"function_response": {"id": "fc1", "name": "fc", "response": {"ok": True}}}]},
        ],
        "tools": [{"functionDeclarations": [{"name": "fc", "parameters": {}}, {"name": "fd"}]}, {"googleSearch": {}}],
        "generationConfig": {"temperature": 0},
    }, path)
    assert (req.model, req.stream, req.system) == ("gemini-2.5-flash", True, ("gsys",))
    assert [m.role for m in req.messages] == ["user", "assistant", "user"]
    assert req.messages[1].native_role == "model" and req.messages[1].reasoning == "plan"
    assert req.messages[0].parts[1].media_type == "image/png"
    assert req.messages[1].tool_calls[0].arguments == '{"y":2}'
    assert [(r.call_id, r.name, r.content) for r in req.tool_results] == [("fc1", "fc", '{"ok":true}')]
    assert [t.name for t in req.tools] == ["fc", "fd", "googleSearch"]
    assert req.params == {"generationConfig": {"temperature": 0}}
    # A body that is not JSON still has the model and stream of its path.
    bare = registry.read_request("gemini.generate", b"", "/v1beta/models/gemini-pro:generateContent")
    assert (bare.model, bare.stream) == ("gemini-pro", False)


def test_a_body_of_an_unknown_path_is_read_as_the_format_it_looks_like() -> None:
    req = registry.read_request("other", json.dumps({"system": "s", "messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r"}]}]}).encode())
    assert req.api == "other" and req.tool_results[0].call_id == "t1" and req.system == ("s",)
    assert registry.read_request("other", b'{"contents": [{"parts": [{"text": "g"}]}]}').messages[0].text == "g"
    assert registry.read_request("other", b'{"foo": 1}').messages == ()


# --- model rewriting, credentials, error bodies -----------------------------------------------------


def test_model_rewrite_is_in_the_body_or_in_the_gemini_path() -> None:
    doc = {"model": "a", "messages": []}
    new_doc, path = registry.get("openai.chat").rewrite_model(doc, "/v1/chat/completions", "b")
    assert new_doc == {"model": "b", "messages": []} and doc["model"] == "a" and path == "/v1/chat/completions"
    gdoc = {"contents": []}
    same, gpath = registry.get("gemini.generate").rewrite_model(gdoc, "/v1beta/models/a:generateContent", "b-2")
    assert same is gdoc and gpath == "/v1beta/models/b-2:generateContent"


def test_keys_are_sent_where_each_family_reads_them() -> None:
    assert registry.for_family("openai").auth_header("k") == (b"authorization", b"Bearer k")
    assert registry.for_family("ollama").auth_header("k") == (b"authorization", b"Bearer k")
    assert registry.for_family("anthropic").auth_header("k") == (b"x-api-key", b"k")
    assert registry.for_family("gemini").auth_header("k") == (b"x-goog-api-key", b"k")
    assert registry.credential_headers() == {"authorization", "x-api-key", "api-key", "x-goog-api-key"}


ATTEMPTS = [{"n": 1, "provider": "p", "url": "u", "model": "m", "error": "connect: refused"}]


def test_error_bodies_per_format() -> None:
    def body(family: str, status: int, attempts: list[dict] | None = None) -> dict:
        return json.loads(registry.for_family(family).error_body(status, "msg", "the_code", attempts))

    assert body("openai", 404) == {"error": {"message": "msg", "type": "invalid_request_error", "param": None,
                                             "code": "the_code"}}
    assert body("openai", 502, ATTEMPTS)["error"]["attempts"] == ATTEMPTS
    assert body("anthropic", 403) == {"type": "error", "error": {"type": "permission_error", "message": "msg"}}
    assert body("anthropic", 502, ATTEMPTS)["llmtap_attempts"] == ATTEMPTS
    assert body("gemini", 502) == {"error": {"code": 502, "message": "msg", "status": "UNAVAILABLE"}}
    assert body("ollama", 400) == {"error": "msg"}
    assert body("other", 400)["error"]["type"] == "invalid_request_error"  # unknown: OpenAI's shape
    # Responses answers in OpenAI's shape too.
    assert json.loads(registry.get("openai.responses").error_body(400, "m", "c"))["error"]["code"] == "c"


def test_relay_error_body_is_the_dialects() -> None:
    from llmtap.addons.relay import error_body

    assert error_body("gemini", 404, "m", "c") == registry.for_family("gemini").error_body(404, "m", "c")


# --- usage of answers, normalised -------------------------------------------------------------------


def answer(api: str, body: bytes, sse: bool = False):  # type: ignore[no-untyped-def]
    reader = registry.response_reader(api, status=200, headers={
        "content-type": "text/event-stream" if sse else "application/json"})
    reader.feed(body)
    return reader.finish()


def events(*objs: dict, named: bool = False) -> bytes:
    return "".join((f"event: {o['type']}\n" if named else "") + f"data: {json.dumps(o)}\n\n" for o in objs).encode()


def test_openai_chat_usage_with_cached_tokens_and_openrouter_cost() -> None:
    usage = {"prompt_tokens": 1200, "completion_tokens": 80, "total_tokens": 1280, "cost": 0.00123,
             "prompt_tokens_details": {"cached_tokens": 1024},
             "completion_tokens_details": {"reasoning_tokens": 64}}
    got = answer("openai.chat", json.dumps({"id": "gen-1", "model": "m", "usage": usage, "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}]}).encode())
    u = got.usage
    assert (u.input_tokens, u.output_tokens, u.reasoning_tokens, u.total_tokens) == (1200, 80, 64, 1280)
    assert (u.cache_read_tokens, u.cache_write_tokens) == (1024, None)
    assert u.cost_usd == Decimal("0.00123") and u.raw == usage and got.id == "gen-1"


def test_deepseek_cache_hit_tokens_in_a_stream() -> None:
    usage = {"prompt_tokens": 90, "completion_tokens": 5, "total_tokens": 95, "prompt_cache_hit_tokens": 64,
             "prompt_cache_miss_tokens": 26}
    got = answer("openai.chat", events(
        {"id": "x", "model": "deepseek-chat", "choices": [{"index": 0, "delta": {"content": "ok"}}]},
        {"id": "x", "model": "deepseek-chat", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
         "usage": usage}) + b"data: [DONE]\n\n", sse=True)
    assert (got.usage.input_tokens, got.usage.cache_read_tokens, got.usage.raw) == (90, 64, usage)
    assert got.usage.cost_usd is None


def test_anthropic_input_counts_cache_reads_and_writes() -> None:
    start = {"input_tokens": 10, "cache_read_input_tokens": 2000, "cache_creation_input_tokens": 300,
             "output_tokens": 1}
    got = answer("anthropic.messages", events(
        {"type": "message_start", "message": {"id": "msg_1", "model": "claude", "usage": start}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 42}},
        {"type": "message_stop"}, named=True), sse=True)
    u = got.usage
    assert (u.input_tokens, u.cache_read_tokens, u.cache_write_tokens, u.output_tokens) == (2310, 2000, 300, 42)
    assert u.raw == {**start, "output_tokens": 42} and got.id == "msg_1"
    whole = answer("anthropic.messages", json.dumps({"type": "message", "model": "claude", "content": [], "usage": {
        "input_tokens": 5, "cache_read_input_tokens": 7, "output_tokens": 3}}).encode())
    assert (whole.usage.input_tokens, whole.usage.cache_read_tokens, whole.usage.cache_write_tokens) == (12, 7, None)


def test_responses_cached_tokens() -> None:
    usage = {"input_tokens": 500, "output_tokens": 50, "total_tokens": 550,
             "input_tokens_details": {"cached_tokens": 384}, "output_tokens_details": {"reasoning_tokens": 20}}
    got = answer("openai.responses", events(
        {"type": "response.created", "response": {"id": "resp_9", "model": "gpt-5"}},
        {"type": "response.output_text.delta", "item_id": "m", "output_index": 0, "content_index": 0, "delta": "x"},
        {"type": "response.completed", "response": {"id": "resp_9", "model": "gpt-5", "status": "completed",
                                                    "output": [], "usage": usage}}, named=True), sse=True)
    u = got.usage
    assert (u.input_tokens, u.cache_read_tokens, u.reasoning_tokens, u.output_tokens) == (500, 384, 20, 50)
    assert u.raw == usage and got.id == "resp_9"


def test_gemini_output_counts_thoughts_and_cached_content() -> None:
    usage = {"promptTokenCount": 4000, "cachedContentTokenCount": 3000, "candidatesTokenCount": 10,
             "thoughtsTokenCount": 90, "totalTokenCount": 4100}
    got = answer("gemini.generate", json.dumps({"modelVersion": "gemini-2.5-pro", "usageMetadata": usage,
                                                "candidates": [{"content": {"parts": [{"text": "a"}]},
                                                                "finishReason": "STOP"}]}).encode())
    u = got.usage
    assert (u.input_tokens, u.cache_read_tokens, u.output_tokens, u.reasoning_tokens, u.total_tokens) == (
        4000, 3000, 100, 90, 4100)
    assert u.raw == usage


def test_ollama_counts_are_its_usage() -> None:
    got = answer("ollama.chat", json.dumps({"model": "qwen3", "message": {"role": "assistant", "content": "a"},
                                            "done": True, "prompt_eval_count": 7, "eval_count": 3,
                                            "eval_duration": 100}).encode())
    assert (got.usage.input_tokens, got.usage.output_tokens) == (7, 3)
    assert got.usage.raw == {"prompt_eval_count": 7, "eval_count": 3, "eval_duration": 100}


def test_no_usage_is_none_never_zero() -> None:
    got = answer("openai.chat", json.dumps({"choices": [{"index": 0, "message": {"content": "a"}}]}).encode())
    assert got.usage.input_tokens is None and got.usage.raw is None and got.usage.cache_read_tokens is None
