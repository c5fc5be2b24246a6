"""The wire formats (llmtap.dialects), each on its own: which requests it recognises, reading a
request into the normalised Request, where the model is rewritten, how a key is sent, the error
llmtap answers in it, and the usage of its answers."""

from __future__ import annotations

import json
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
