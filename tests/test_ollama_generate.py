"""Ollama's /api/generate, the variant added in dialects/ollama.py alone: a call through the real
proxy is routed by its model, rewritten, and recorded into a real DuckDB file with its content,
reasoning and usage, and the UI shows its conversation. The upstream is a loopback server that
answers the recorded transcript (tests/fixtures/wire/ollama_generate_stream.json)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import httpx
import pytest

from llmtap.dialects import registry
from llmtap.recorder.recorder import Recorder
from llmtap.tui import render
from proxyharness import RunningProxy

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "wire" / "ollama_generate_stream.json").read_text("utf-8"))
BODY = FIXTURE["response"]["body_raw"].encode("utf-8")


class _Upstream(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        length = int(self.headers.get("content-length") or 0)
        _Upstream.received.append({"path": self.path, "body": json.loads(self.rfile.read(length))})
        self.send_response(200)
        self.send_header("content-type", "application/x-ndjson")
        self.send_header("content-length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    _Upstream.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_generate_call_is_routed_and_recorded_with_content_usage_and_its_conversation(
        tmp_path: Path, confdir: Path, upstream: str) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"""\
providers:
  local: {{base_url: "{upstream}", api: ollama}}
routes:
  - match: {{model: "qwen3"}}
    targets: [{{provider: local, model: "qwen3:4b"}}]
""")
    db = tmp_path / "llmtap.duckdb"
    recorder = Recorder(db)
    recorder.start()
    asked = dict(FIXTURE["request"]["body"], model="qwen3")
    try:
        with RunningProxy(rules, confdir, sink=recorder) as proxy, httpx.Client(timeout=60) as client:
            with client.stream("POST", f"{proxy.gateway_url}/local/api/generate", json=asked) as resp:
                got = b"".join(resp.iter_bytes())
    finally:
        recorder.close()
    assert got == BODY  # the client gets the bytes as the upstream sent them
    assert _Upstream.received[0]["body"]["model"] == "qwen3:4b"  # the route's model, in the body
    with duckdb.connect(str(db), read_only=True) as con:
        cur = con.execute("SELECT * FROM calls")
        row = dict(zip([d[0] for d in cur.description], cur.fetchone()))
    want = FIXTURE["expected"]
    assert (row["api"], row["model_requested"], row["model_sent"], row["stream"]) == (
        "ollama.generate", "qwen3", "qwen3:4b", True)
    assert (row["content"], row["reasoning"], row["finish_reason"], row["complete"]) == (
        want["content"], want["reasoning"], "stop", True)
    assert (row["input_tokens"], row["output_tokens"]) == (26, 41)
    assert json.loads(row["usage_raw"])["eval_duration"] == 812345678
    conv = render.conversation(render.parse_json(row["request_body"]), row["api"])
    assert conv.system == ["You write haiku."]
    assert [(t.role, t.text) for t in conv.turns] == [("user", "A haiku about Köln, please.")]


def test_generate_request_and_answers() -> None:
    req = registry.read_request("ollama.generate", json.dumps({
        "model": "llava", "system": "s", "prompt": "what is this?", "images": ["aGk="], "stream": False,
        "options": {"num_ctx": 4096}}).encode())
    assert (req.model, req.stream, req.system) == ("llava", False, ("s",))
    assert [p.kind for p in req.messages[0].parts] == ["text", "image"] and req.messages[0].text == "what is this?"
    assert req.params == {"options": {"num_ctx": 4096}}
    assert registry.read_request("ollama.generate", b'{"model": "m", "prompt": "p"}').stream is True
    # Not streamed: one object, the whole text in `response`.
    reader = registry.response_reader("ollama.generate", status=200, headers={"content-type": "application/json"})
    reader.feed(json.dumps({"model": "m", "response": "whole", "done": True, "done_reason": "stop",
                            "prompt_eval_count": 3, "eval_count": 1}).encode())
    answer = reader.finish()
    assert (answer.content, answer.complete, answer.stream, answer.usage.output_tokens) == ("whole", True, False, 1)
    # An error is Ollama's {"error": ...}.
    assert json.loads(registry.get("ollama.generate").error_body(404, "no model", "c")) == {"error": "no model"}
    # A body recorded under a path llmtap did not know still shows as the prompt it is.
    shown = render.conversation({"model": "qwen3", "system": "osys", "prompt": "generate this"})
    assert shown.system == ["osys"] and shown.turns[0].text == "generate this"
