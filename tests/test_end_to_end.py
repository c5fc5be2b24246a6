"""Through the real proxy into a real DuckDB file: what a user finds after their agent ran."""

from __future__ import annotations

from pathlib import Path

import anthropic
import duckdb
import openai

from fakeprovider import FakeProvider, status
from llmtap.recorder.recorder import Recorder
from proxyharness import RunningProxy

KEY = "sk-ant-api03-PLANTED-e2e-0123456789"


def test_fallback_call_with_thinking_is_recorded_with_its_chain_and_no_key(tmp_path: Path, confdir: Path,
                                                                           fake: FakeProvider, fake2: FakeProvider) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"""\
providers:
  a1: {{base_url: "{fake.url}", api: anthropic}}
  a2: {{base_url: "{fake2.url}", api: anthropic}}
  o1: {{base_url: "{fake.url}/v1", api: openai}}
routes:
  - match: {{model: "claude*"}}
    targets: [{{provider: a1}}, {{provider: a2, model: claude-backup}}]
    retry: {{backoff_ms: 1, on: [529]}}
""")
    fake.script_for_model("claude-sonnet", status(529, body={"type": "error", "error": {"type": "overloaded_error",
                                                                                          "message": "Overloaded"}}))
    fake.chat_reasoning_field = "reasoning"
    db = tmp_path / "llmtap.duckdb"
    recorder = Recorder(db)
    recorder.start()
    try:
        with RunningProxy(rules, confdir, sink=recorder) as proxy:
            claude = anthropic.Anthropic(base_url=f"{proxy.gateway_url}/a1", api_key=KEY, max_retries=0)
            with claude.messages.stream(model="claude-sonnet", max_tokens=512, thinking={"type": "enabled", "budget_tokens": 256},
                                        messages=[{"role": "user", "content": "fold"}]) as s:
                s.get_final_message()
            gpt = openai.OpenAI(base_url=f"{proxy.gateway_url}/o1", api_key=KEY, max_retries=0)
            gpt.chat.completions.create(model="o-mini", messages=[{"role": "user", "content": "fold"}])
    finally:
        recorder.close()
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("""SELECT api, model_requested, model_sent, provider, status, attempts, complete, reasoning,
                                     content, client FROM calls ORDER BY id""").fetchall()
        chain = con.execute("SELECT n, provider, status FROM attempts ORDER BY call_id, n").fetchall()
    (claude_row, gpt_row) = rows
    assert claude_row[:7] == ("anthropic.messages", "claude-sonnet", "claude-backup", "a2", 200, 2, True)
    assert claude_row[7] == fake2.reasoning_text and claude_row[8] == fake2.reply_text
    assert claude_row[9].startswith("Anthropic/Python")
    assert gpt_row[:7] == ("openai.chat", "o-mini", "o-mini", "o1", 200, 1, True)
    assert gpt_row[7] == fake.reasoning_text
    assert chain[:2] == [(1, "a1", 529), (2, "a2", 200)]
    assert KEY.encode() not in db.read_bytes()
