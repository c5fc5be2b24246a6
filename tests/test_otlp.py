"""`llmtap run --otlp`: what a collector (Jaeger, Tempo, Langfuse, Phoenix) receives.

A real `llmtap run` in its own process, the fake provider, and a loopback OTLP/HTTP receiver
that decodes each POST with opentelemetry-proto, as a collector does."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import anthropic
import duckdb
import httpx
import openai
import pytest

from fakeprovider import FakeProvider, status
from llmtap.recorder import otlp
from otlpreceiver import OtlpReceiver, Span
from test_cli import Lines

KEY = "sk-proj-PLANTEDotlp0123456789abcdefghijklmnop"
CLIENT = 3  # SPAN_KIND_CLIENT
ERROR = 2  # STATUS_CODE_ERROR


def closed_port() -> int:
    """A loopback port nothing listens on: a collector that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """`llmtap run` as a user starts it, gateway on a port from the OS."""

    def __init__(self, tmp_path: Path, rules: str, *extra: str, env: dict[str, str] | None = None) -> None:
        (tmp_path / "rules.yaml").write_text(rules)
        self.db = tmp_path / "calls.duckdb"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmtap", "run", "--db", str(self.db), "--rules", str(tmp_path / "rules.yaml"),
             "--confdir", str(tmp_path / "ca"), "--proxy", "off", "--gateway", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.err, self.out = Lines(self.proc.stderr), Lines(self.proc.stdout)
        line = self.err.wait_for("gateway")
        self.gateway = line[line.index("http://"):].split("/<provider>")[0]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def export_otlp(db: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmtap", "export", "otlp", "--db", str(db), "--since", "1d", *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def ulid_bytes(ulid: str) -> str:
    n = 0
    for c in ulid:
        n = n * 32 + "0123456789ABCDEFGHJKMNPQRSTVWXYZ".index(c)
    return n.to_bytes(16, "big").hex()


def by_model(rx: OtlpReceiver) -> dict[str, Span]:
    return {s.attrs["gen_ai.request.model"]: s for s in rx.calls().values() if "gen_ai.request.model" in s.attrs}


def test_each_dialect_arrives_as_a_genai_span_with_its_attempt_and_no_content_by_default(
        tmp_path: Path, fake: FakeProvider) -> None:
    fake.chat_reasoning_field = "reasoning_content"
    # An Anthropic answer that read from and wrote to the prompt cache: Anthropic counts those
    # apart from input_tokens; the conventions' input tokens include them.
    cached = {"id": "msg_cached1", "type": "message", "role": "assistant", "model": "claude-cache-2",
              "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn", "stop_sequence": None,
              "usage": {"input_tokens": 5, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 7,
                        "output_tokens": 2}}
    fake.script_for_model("claude-cache", status(200, body=cached, headers={"content-type": "application/json"}))
    rules = (f"providers:\n  oa: {{base_url: '{fake.url}/v1', api: openai}}\n"
             f"  an: {{base_url: '{fake.url}', api: anthropic}}\n"
             f"  gem: {{base_url: '{fake.url}', api: gemini}}\n"
             f"  oll: {{base_url: '{fake.url}', api: ollama}}\n")
    with OtlpReceiver() as rx:
        with Run(tmp_path, rules, "--otlp", rx.url) as run:
            assert "message content: none" in run.err.wait_for("traces")
            gpt = openai.OpenAI(base_url=f"{run.gateway}/oa", api_key=KEY, max_retries=0)
            list(gpt.chat.completions.create(model="gpt-chat", stream=True, stream_options={"include_usage": True},
                                             messages=[{"role": "user", "content": "fold"}]))
            gpt.responses.create(model="gpt-resp", input="fold", reasoning={"effort": "low", "summary": "auto"})
            claude = anthropic.Anthropic(base_url=f"{run.gateway}/an", api_key=KEY, max_retries=0)
            with claude.messages.stream(model="claude-think", max_tokens=512,
                                        thinking={"type": "enabled", "budget_tokens": 256},
                                        messages=[{"role": "user", "content": "fold"}]) as s:
                s.get_final_message()
            claude.messages.create(model="claude-cache", max_tokens=64, messages=[{"role": "user", "content": "again"}])
            r = httpx.post(f"{run.gateway}/gem/v1beta/models/gemini-x:streamGenerateContent?alt=sse",
                           json={"contents": [{"role": "user", "parts": [{"text": "fold"}]}]}, timeout=30)
            assert r.status_code == 200
            r = httpx.post(f"{run.gateway}/oll/api/chat", json={"model": "llama-x", "stream": False,
                                                                "messages": [{"role": "user", "content": "fold"}]}, timeout=30)
            assert r.status_code == 200
            rx.wait_spans(12)
            assert run.stop() == 0
        spans = by_model(rx)
        assert sorted(spans) == ["claude-cache", "claude-think", "gemini-x", "gpt-chat", "gpt-resp", "llama-x"]
        expect = {  # model: (operation, provider, api type)
            "gpt-chat": ("chat", "openai", "chat_completions"), "gpt-resp": ("chat", "openai", "responses"),
            "claude-think": ("chat", "anthropic", None), "claude-cache": ("chat", "anthropic", None),
            "gemini-x": ("generate_content", "gcp.gemini", None), "llama-x": ("chat", "ollama", None)}
        for model, (op, provider, api_type) in expect.items():
            s = spans[model]
            a = s.attrs
            assert s.name == f"{op} {model}" and s.kind == CLIENT and s.status_code != ERROR
            assert (a["gen_ai.operation.name"], a["gen_ai.provider.name"], a.get("openai.api.type")) == (op, provider, api_type)
            assert a["gen_ai.request.model"] == model and a["gen_ai.response.model"]
            assert a["server.address"] == "127.0.0.1" and a["server.port"] == fake.port
            assert a["http.response.status_code"] == 200 and "error.type" not in a
            assert a["gen_ai.usage.output_tokens"] > 0
            # The trace id is the call's ULID: the same call gives the same trace, every time.
            assert s.trace_id == ulid_bytes(a["llmtap.call.id"]) and s.parent_span_id == ""
            assert s.end > s.start > 0
            # Content is opt-in: nothing the user typed or the model said leaves by default.
            assert not {"gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions"} & set(a)
            (attempt,) = rx.children(s)
            assert attempt.attrs["llmtap.attempt.n"] == 1 and attempt.attrs["http.response.status_code"] == 200
            assert attempt.kind == CLIENT and not [k for k in attempt.attrs if k.startswith("gen_ai.")]
        assert spans["gpt-chat"].attrs["gen_ai.usage.input_tokens"] == fake.input_tokens
        assert spans["gpt-chat"].attrs["gen_ai.usage.reasoning.output_tokens"] > 0
        assert spans["gpt-chat"].attrs["gen_ai.response.finish_reasons"] == ["stop"]
        assert spans["gpt-chat"].attrs["gen_ai.request.stream"] is True
        assert spans["gpt-chat"].attrs["gen_ai.response.time_to_first_chunk"] > 0
        assert spans["gpt-chat"].attrs["gen_ai.response.id"].startswith("chatcmpl-fake")
        assert spans["gpt-resp"].attrs["gen_ai.usage.reasoning.output_tokens"] > 0
        assert spans["claude-think"].attrs["gen_ai.response.finish_reasons"] == ["end_turn"]
        assert spans["claude-think"].attrs["gen_ai.response.time_to_first_chunk"] > 0
        cache = spans["claude-cache"].attrs
        assert (cache["gen_ai.usage.input_tokens"], cache["gen_ai.usage.cache_read.input_tokens"],
                cache["gen_ai.usage.cache_creation.input_tokens"], cache["gen_ai.response.model"]) == (42, 30, 7, "claude-cache-2")
        assert spans["gemini-x"].attrs["gen_ai.response.finish_reasons"] == ["STOP"]
        assert spans["llama-x"].attrs["gen_ai.usage.input_tokens"] == fake.input_tokens
        assert "gen_ai.request.stream" not in spans["llama-x"].attrs
        assert {p["path"] for p in rx.posts} == {"/v1/traces"}
        assert rx.spans[0].resource["service.name"] == "llmtap"

        # A backfill of the same calls sends the same spans, ids and all: idempotent.
        live = {(s.trace_id, s.span_id, s.parent_span_id, s.name) for s in rx.spans}
        rx.spans.clear()
        r = export_otlp(run.db, "--otlp", rx.url)
        assert r.returncode == 0, r.stderr
        assert "sent 6 calls" in r.stderr
        assert {(s.trace_id, s.span_id, s.parent_span_id, s.name) for s in rx.wait_spans(12)} == live


def test_a_fallback_a_client_trace_and_opt_in_content_capped_and_masked(
        tmp_path: Path, fake: FakeProvider, fake2: FakeProvider) -> None:
    fake.script_for_model("claude-sonnet", status(529, body={"type": "error", "error": {"type": "overloaded_error",
                                                                                        "message": "Overloaded"}}))
    fake.chat_reasoning_field = "reasoning_content"
    rules = (f"providers:\n  a1: {{base_url: '{fake.url}', api: anthropic}}\n"
             f"  a2: {{base_url: '{fake2.url}', api: anthropic}}\n"
             f"  oa: {{base_url: '{fake.url}/v1', api: openai}}\n"
             "routes:\n  - match: {model: 'claude*'}\n"
             "    targets: [{provider: a1}, {provider: a2, model: claude-backup}]\n"
             "    retry: {backoff_ms: 1, on: [529]}\n")
    long_text = "word " * 4000  # 20,000 characters: over the cap
    trace, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    with OtlpReceiver() as rx:
        # Langfuse's way in: a base URL with a path, Basic auth in the standard variable.
        env = {"OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Basic%20cGs6c2s=,x-extra=1",
               "OTEL_RESOURCE_ATTRIBUTES": "openinference.project.name=agents,deployment.environment=dev"}
        with Run(tmp_path, rules, "--otlp", rx.url + "/api/public/otel", "--otlp-content", "full",
                 "--otlp-content-max", "4000", env=env) as run:
            claude = anthropic.Anthropic(base_url=f"{run.gateway}/a1", api_key=KEY, max_retries=0)
            claude.messages.create(model="claude-sonnet", max_tokens=64, system="You fold paper.",
                                   messages=[{"role": "user", "content": f"my key is {KEY}, fold"}],
                                   extra_headers={"traceparent": f"00-{trace}-{parent}-01", "tracestate": "vendor=1"})
            gpt = openai.OpenAI(base_url=f"{run.gateway}/oa", api_key=KEY, max_retries=0)
            gpt.chat.completions.create(model="gpt-long", messages=[{"role": "system", "content": "Be brief."},
                                                                    {"role": "user", "content": long_text}],
                                        tools=[{"type": "function", "function": {
                                            "name": "fold", "description": "Fold it",
                                            "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}}],
                                        tool_choice="none")
            rx.wait_spans(5)
            assert run.stop() == 0
    spans = by_model(rx)
    fallback = spans["claude-sonnet"]
    # The client's trace: llmtap's span is a child of the client's own span.
    assert (fallback.trace_id, fallback.parent_span_id, fallback.trace_state) == (trace, parent, "vendor=1")
    first, second = rx.children(fallback)
    assert (first.attrs["llmtap.attempt.n"], first.attrs["http.response.status_code"], first.attrs["error.type"],
            first.status_code, first.attrs["llmtap.provider"]) == (1, 529, "529", ERROR, "a1")
    assert (second.attrs["llmtap.attempt.n"], second.attrs["http.response.status_code"], second.attrs["server.port"],
            second.attrs["llmtap.model_sent"], second.status_code) == (2, 200, fake2.port, "claude-backup", 0)
    assert fallback.attrs["llmtap.attempts"] == 2 and fallback.attrs["server.port"] == fake2.port
    assert fallback.attrs["llmtap.model_sent"] == "claude-backup" and fallback.status_code != ERROR
    # The collector got the headers, at the path under the base URL.
    assert {p["path"] for p in rx.posts} == {"/api/public/otel/v1/traces"}
    assert rx.posts[0]["headers"]["authorization"] == "Basic cGs6c2s=" and rx.posts[0]["headers"]["x-extra"] == "1"
    assert fallback.resource["openinference.project.name"] == "agents" and fallback.resource["service.name"] == "llmtap"

    # Content, opt-in: the conversation as the conventions shape it, masked as the record is.
    (msg,) = json.loads(fallback.attrs["gen_ai.input.messages"])
    assert msg["role"] == "user" and msg["parts"][0]["type"] == "text"
    text = msg["parts"][0]["content"]
    assert text.startswith("my key is sk-proj-…") and text.endswith(", fold") and KEY not in text  # the record's fingerprint
    assert json.loads(fallback.attrs["gen_ai.system_instructions"]) == [{"type": "text", "content": "You fold paper."}]
    out = json.loads(fallback.attrs["gen_ai.output.messages"])
    assert out == [{"role": "assistant", "parts": [{"type": "text", "content": fake2.reply_text}], "finish_reason": "stop"}]
    assert all(KEY.encode() not in body for body in rx.bodies)
    long = spans["gpt-long"].attrs
    assert len(long["gen_ai.input.messages"]) <= 4000 and long["llmtap.content.truncated"] is True
    cut = json.loads(long["gen_ai.input.messages"])  # still valid JSON, and says what it left out
    assert [m["role"] for m in cut] == ["system", "user"] and cut[0]["parts"][0]["content"] == "Be brief."
    assert cut[1]["parts"][0]["content"].startswith("word word") and cut[1]["parts"][0]["content"].endswith("more characters not exported]")
    assert "gen_ai.system_instructions" not in long  # the system message is in the history, where it was sent
    assert json.loads(long["gen_ai.tool.definitions"]) == [
        {"type": "function", "name": "fold", "description": "Fold it",
         "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}]
    answer = json.loads(long["gen_ai.output.messages"])[0]["parts"]
    assert answer[0] == {"type": "reasoning", "content": fake.reasoning_text}
    assert answer[1] == {"type": "text", "content": fake.reply_text}


def test_a_collector_that_is_down_costs_no_call_and_the_backfill_sends_them_once_it_is_up(
        tmp_path: Path, fake: FakeProvider) -> None:
    rules = f"providers:\n  oa: {{base_url: '{fake.url}/v1', api: openai}}\n"
    down = f"http://127.0.0.1:{closed_port()}"
    with Run(tmp_path, rules, "-q", env={"OTEL_EXPORTER_OTLP_ENDPOINT": down}) as run:
        assert f"{down}/v1/traces" in run.err.wait_for("traces")
        with httpx.Client(timeout=30) as client:
            for i in range(20):
                r = client.post(f"{run.gateway}/oa/chat/completions",
                                json={"model": f"m{i}", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == fake.reply_text
        run.err.wait_for("does not take spans")
        with OtlpReceiver() as rx:  # the collector is up again: a backfill, through the running llmtap
            r = export_otlp(run.db, env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": rx.url + "/v1/traces"})
            assert r.returncode == 0, r.stderr
            assert "sent 20 calls" in r.stderr and "through the running llmtap" in r.stderr
            first = sorted((s.trace_id, s.span_id) for s in rx.wait_spans(40))
        assert run.stop() == 0
    assert run.err.ended.wait(30)
    err = "".join(run.err.lines)
    assert err.count("does not take spans") == 1, err  # said once, not once per call
    assert "calls were not exported" in err and "llmtap export otlp" in err
    assert "20 calls committed" in err and "none lost" in err
    with duckdb.connect(str(run.db), read_only=True) as con:
        assert con.execute("SELECT count(*), count(*) FILTER (status = 200) FROM calls").fetchall() == [(20, 20)]

    with OtlpReceiver() as rx:  # and again from the file at rest
        assert export_otlp(run.db, "--otlp", rx.url).returncode == 0
        assert sorted((s.trace_id, s.span_id) for s in rx.wait_spans(40)) == first  # the same spans again
    assert len(set(first)) == 40


def test_a_slow_collector_never_holds_up_the_proxy_and_the_stop_is_bounded(tmp_path: Path, fake: FakeProvider) -> None:
    rules = f"providers:\n  oa: {{base_url: '{fake.url}/v1', api: openai}}\n"
    with OtlpReceiver() as rx:
        rx.delay_s = 300  # answers only once the test ends
        with Run(tmp_path, rules, "-q", "--otlp", rx.url) as run:
            with httpx.Client(timeout=30) as client:
                for i in range(30):
                    r = client.post(f"{run.gateway}/oa/chat/completions",
                                    json={"model": "m", "messages": [{"role": "user", "content": f"hi {i}"}]})
                    assert r.status_code == 200
            assert rx.received == 0  # every call answered while the collector had answered nothing
            assert run.stop() == 0  # and the stop does not wait for it either
        err = "".join(run.err.lines)
        assert "30 calls committed" in err and "none lost" in err
        assert "calls were not exported" in err
    with duckdb.connect(str(run.db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM calls WHERE status = 200").fetchone() == (30,)


def test_a_full_queue_drops_calls_counted_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    service = otlp.OtlpService({"endpoint": f"http://127.0.0.1:{closed_port()}/v1/traces", "content": "none"},
                               environ={}, queue_calls=3)
    rows = [{"id": f"01J00000000000000000000{i:03d}", "api": "openai.chat", "url": "http://x/v1/chat/completions",
             "method": "POST", "status": 200, "started_at": None, "duration_ms": 1.0} for i in range(10)]
    try:
        with caplog.at_level(logging.WARNING, logger="llmtap.recorder"):
            service.committed(rows[:5], [])
            service.committed(rows[5:], [])
        assert service.dropped >= 7
        assert sum("queue of spans" in r.getMessage() for r in caplog.records) == 1
    finally:
        service.close()


def test_the_standard_variables_choose_the_endpoint_and_the_flag_wins() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
    assert otlp.resolve(environ=env)["endpoint"] == "http://collector:4318/v1/traces"
    env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = "http://tempo:4318/custom"
    assert otlp.resolve(environ=env)["endpoint"] == "http://tempo:4318/custom"  # used as given
    assert otlp.resolve("http://flag:4318", environ=env)["endpoint"] == "http://flag:4318/v1/traces"
    assert otlp.resolve(environ={}) == {}
    # A secret in a variable's URL is not copied onto the recorder process's command line.
    secret = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://u:hunter22@collector:4318/?token=t0ps3cret"}
    options = otlp.resolve(environ=secret)
    assert "hunter22" not in json.dumps(options) and "t0ps3cret" not in json.dumps(options)
    assert otlp.endpoint_of(options, secret) == "https://u:hunter22@collector:4318/v1/traces?token=t0ps3cret"
    assert otlp.resolve(environ={**env, "OTEL_SDK_DISABLED": "true"}) == {}
    assert otlp.resolve(environ={**env, "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"})["content"] == "full"
    with pytest.raises(otlp.OtlpError, match="http/protobuf"):
        otlp.resolve(environ={**env, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert otlp.env_headers({"OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Basic%20abc%3D,a=1",
                             "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "a=2"}) == {"authorization": "Basic abc=", "a": "2"}
    with pytest.raises(otlp.OtlpError) as exc:
        otlp.parse_headers("Authorization Basic s3cr3t-value", "OTEL_EXPORTER_OTLP_HEADERS")
    assert "key=value" in str(exc.value)


def test_run_refuses_an_otlp_url_that_is_not_http(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "llmtap", "run", "--otlp", "localhost:4318", "--no-record"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--otlp" in r.stderr and "http://127.0.0.1:4318" in r.stderr


def test_content_over_the_cap_stays_valid_json_and_marks_what_it_left_out() -> None:
    messages = [{"role": "user", "parts": [{"type": "text", "content": f"turn {i} " + "x" * 500}]} for i in range(50)]
    text, cut = otlp.capped_json(messages, 2000, True)
    assert cut and len(text) <= 2000
    kept = json.loads(text)
    assert "earlier messages not exported" in kept[0]["parts"][0]["content"]
    assert "turn 49" in kept[-1]["parts"][0]["content"]  # the newest turn is what stays
    small, cut = otlp.capped_json(messages[:1], 2000, True)
    assert not cut and json.loads(small) == messages[:1]


def test_a_known_session_is_the_conversation_id() -> None:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    from otlpreceiver import _value

    row = {"id": "01J00000000000000000000001", "api": "anthropic.messages", "url": "http://127.0.0.1:8081/a/v1/messages",
           "method": "POST", "status": 200, "model_requested": "claude-x", "session_id": "sess-42",
           "request_headers": "{}", "response_body": "{}"}
    spans = otlp.SpanBuilder().spans(otlp.slim(row, "none"), [])
    (span,) = trace_service_pb2.ExportTraceServiceRequest.FromString(otlp.encode(spans)).resource_spans[0].scope_spans[0].spans
    attrs = {kv.key: _value(kv.value) for kv in span.attributes}
    assert attrs["gen_ai.conversation.id"] == attrs["session.id"] == "sess-42"
    assert span.name == "chat claude-x"


def test_a_call_recorded_before_the_cache_columns_reads_its_cache_counts_from_the_answer() -> None:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    from otlpreceiver import _value

    # As `llmtap export otlp` reads an older file: no cache columns, Anthropic's input_tokens
    # without the cache, and the answer's usage saying how much was read and written.
    body = json.dumps({"type": "message", "usage": {"input_tokens": 5, "cache_read_input_tokens": 30,
                                                    "cache_creation_input_tokens": 7, "output_tokens": 2}})
    row = {"id": "01J00000000000000000000002", "api": "anthropic.messages", "url": "http://h/a/v1/messages",
           "method": "POST", "status": 200, "model_requested": "claude-x", "input_tokens": 5, "output_tokens": 2,
           "request_headers": "{}", "response_body": body}
    (span,) = trace_service_pb2.ExportTraceServiceRequest.FromString(
        otlp.encode(otlp.SpanBuilder().spans(otlp.slim(row, "none"), []))).resource_spans[0].scope_spans[0].spans
    attrs = {kv.key: _value(kv.value) for kv in span.attributes}
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.cache_read.input_tokens"],
            attrs["gen_ai.usage.cache_creation.input_tokens"]) == (42, 30, 7)


def rows(n: int, base: int = 0) -> list[dict]:
    return [{"id": f"01J000000000000000000{base + i:05d}", "api": "openai.chat", "url": "http://x/v1/chat/completions",
             "method": "POST", "status": 200, "model_requested": "m", "started_at": None, "duration_ms": 1.0}
            for i in range(n)]


def test_a_collector_that_says_retry_later_gets_the_batch_again_and_nothing_is_dropped() -> None:
    with OtlpReceiver() as rx:
        rx.answer, rx.refuse_next = (503, {"retry-after": "0"}), 2  # refused twice, then taken
        service = otlp.OtlpService({"endpoint": rx.url + "/v1/traces", "content": "none"}, environ={})
        try:
            service.committed(rows(3), [])
            got = rx.wait_spans(3)
            assert rx.refused == 2
        finally:
            service.close()
        assert sorted(s.attrs["llmtap.call.id"] for s in got) == [r["id"] for r in rows(3)]
        assert service.dropped == 0 and service.sent == 3


def test_retry_after_in_seconds_or_as_a_date() -> None:
    from datetime import datetime, timedelta, timezone
    from email.utils import format_datetime

    assert otlp._retry_after("7") == 7.0 and otlp._retry_after(None) is None and otlp._retry_after("soon") is None
    later = otlp._retry_after(format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True))
    assert later is not None and 20 < later <= 30


def test_calls_committed_just_before_the_stop_are_sent_by_the_stop() -> None:
    with OtlpReceiver() as rx:
        service = otlp.OtlpService({"endpoint": rx.url + "/v1/traces", "content": "none"}, environ={})
        service.committed(rows(5), [])
        service.close()  # at once: the spans had no time to leave on their own
        assert len(rx.spans) == 5 and service.sent == 5 and service.dropped == 0
