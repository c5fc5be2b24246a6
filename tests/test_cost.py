"""Cost per call: exact decimals from the provider, rules.yaml or genai-prices, offline.

The per-million prices in the comments are the ones genai-prices (the installed table) gives
for that model on that date; each expected figure is worked out by hand from them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import duckdb
import httpx
import pytest

from fakeprovider import FakeProvider
from llmtap.dialects.shapes import Usage
from llmtap.recorder.pricerules import parse_price
from llmtap.recorder.pricing import Pricer
from llmtap.recorder.record import Call, new_id
from llmtap.recorder.recorder import Recorder

NOV = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def price(usage: Usage, provider: str | None, model: str, *, when: datetime = NOV, rules: Path | None = None,
          url: str | None = None):
    return Pricer(rules, prices_file=None).price(usage, provider=provider, models=(model,), url=url, when=when)


# -- per dialect ------------------------------------------------------------------------------------
def test_openai_chat_with_cached_input() -> None:
    # gpt-4o: $2.50 input, $1.25 cached input, $10 output per million.
    # 1000 input of which 200 cached: 800 × 2.50 + 200 × 1.25 + 100 × 10 = 2000 + 250 + 1000 = 3250 / 1e6
    p = price(Usage(input_tokens=1000, output_tokens=100, cache_read_tokens=200), "openai", "gpt-4o-2024-08-06")
    assert p.cost_usd == Decimal("0.00325")
    assert p.source.startswith("genai-prices ")
    d = p.detail
    assert (d["provider"], d["model"], d["model_ref"], d["date"]) == ("openai", "gpt-4o", "gpt-4o-2024-08-06",
                                                                       "2026-11-01")
    assert d["per_million"] == {"input": "2.5", "cache_read": "1.25", "output": "10"}


def test_responses_reasoning_model_priced_by_the_date_of_the_call() -> None:
    # o3, 2000 input (1000 cached), 1500 output of which 1200 reasoning (billed as output).
    usage = Usage(input_tokens=2000, output_tokens=1500, reasoning_tokens=1200, cache_read_tokens=1000)
    # From 2025-06-10: $2 input, $0.50 cached, $8 output:
    # 1000 × 2 + 1000 × 0.5 + 1500 × 8 = 2000 + 500 + 12000 = 14500 / 1e6
    assert price(usage, "openai", "o3").cost_usd == Decimal("0.0145")
    # Before: $10 input, $0.50 cached (as the table has it), $40 output:
    # 1000 × 10 + 1000 × 0.5 + 1500 × 40 = 10000 + 500 + 60000 = 70500 / 1e6
    june = datetime(2025, 6, 1, tzinfo=UTC)
    p = price(usage, "openai", "o3", when=june)
    assert p.cost_usd == Decimal("0.0705") and p.detail["date"] == "2025-06-01"


def test_anthropic_cache_read_and_write_and_the_long_context_tier() -> None:
    # claude-sonnet-4-5: $3 input, $0.30 cache read, $3.75 cache write, $15 output per million;
    # input_tokens counts the cache's too (1000 plain + 2000 read + 3000 written).
    # 1000 × 3 + 2000 × 0.3 + 3000 × 3.75 + 500 × 15 = 3000 + 600 + 11250 + 7500 = 22350 / 1e6
    usage = Usage(input_tokens=6000, output_tokens=500, cache_read_tokens=2000, cache_write_tokens=3000)
    p = price(usage, "anthropic", "claude-sonnet-4-5")
    assert p.cost_usd == Decimal("0.02235")
    assert p.detail["per_million"] == {"input": "3", "cache_write": "3.75", "cache_write_1h": "6", "cache_read": "0.3",
                                       "output": "15"}
    # Writes for an hour ("ttl": "1h") cost $6 a million, not the 5-minute $3.75: of the 3000
    # written, 2000 for an hour: 1000 × 3 + 2000 × 0.3 + 1000 × 3.75 + 2000 × 6 + 500 × 15
    # = 3000 + 600 + 3750 + 12000 + 7500 = 26850 / 1e6
    hour = Usage(input_tokens=6000, output_tokens=500, cache_read_tokens=2000, cache_write_tokens=3000,
                 cache_write_1h_tokens=2000)
    assert price(hour, "anthropic", "claude-sonnet-4-5").cost_usd == Decimal("0.02685")
    # Over 200k input tokens every price doubles ($6, $0.60, $7.50, $22.50 output):
    # 295000 × 6 + 2000 × 0.6 + 3000 × 7.5 + 500 × 22.5 = 1770000 + 1200 + 22500 + 11250 = 1804950 / 1e6
    big = Usage(input_tokens=300_000, output_tokens=500, cache_read_tokens=2000, cache_write_tokens=3000)
    assert price(big, "anthropic", "claude-sonnet-4-5").cost_usd == Decimal("1.80495")


def test_gemini_thoughts_are_billed_as_output() -> None:
    # gemini-2.5-flash: $0.30 input, $2.50 output per million; 700 output = 200 answer + 500 thoughts.
    # 1000 × 0.3 + 700 × 2.5 = 300 + 1750 = 2050 / 1e6
    p = price(Usage(input_tokens=1000, output_tokens=700, reasoning_tokens=500), "gemini", "gemini-2.5-flash")
    assert p.cost_usd == Decimal("0.00205") and p.detail["provider"] == "google"


def test_ollama_is_free_only_when_rules_say_so(tmp_path: Path) -> None:
    usage = Usage(input_tokens=1000, output_tokens=100)
    assert price(usage, "ollama", "llama3").cost_usd is None  # a local model is never priced by a cloud's table
    rules = tmp_path / "rules.yaml"
    rules.write_text("providers:\n  ollama: {base_url: http://127.0.0.1:11434, api: ollama, price: free}\n")
    p = price(usage, "ollama", "llama3", rules=rules)
    assert (p.cost_usd, p.source) == (Decimal(0), "rules.yaml")
    assert p.detail["rules"] == str(rules) and p.detail["model_glob"] == "*"


def test_openrouter_stated_cost_wins_as_sent() -> None:
    usage = Usage(input_tokens=1000, output_tokens=100, cost_usd=Decimal("0.000123456789"))
    p = price(usage, "openrouter", "openai/gpt-4o")
    assert (p.cost_usd, p.source) == (Decimal("0.000123456789"), "provider")


def test_rules_prices_override_the_table_per_model_glob(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("providers:\n  openai:\n    price:\n"
                     '      "gpt-4o-mini*": free\n'
                     '      "gpt-4o*": {input: 2.00, output: 8, cache_read: 0.5}\n')
    # 800 × 2 + 200 × 0.5 + 100 × 8 = 1600 + 100 + 800 = 2500 / 1e6
    usage = Usage(input_tokens=1000, output_tokens=100, cache_read_tokens=200)
    p = price(usage, "openai", "gpt-4o", rules=rules)
    assert (p.cost_usd, p.source, p.detail["model_glob"]) == (Decimal("0.0025"), "rules.yaml", "gpt-4o*")
    assert price(usage, "openai", "gpt-4o-mini", rules=rules).cost_usd == 0
    # A model no glob matches falls to the table: o3 as above, 800 × 2 + 200 × 0.5 + 100 × 8 = 2500
    assert price(usage, "openai", "o3", rules=rules).source.startswith("genai-prices")


def test_a_provider_pointed_elsewhere_is_not_priced_by_its_name(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("providers:\n  openai: {base_url: 'http://127.0.0.1:8000/v1', api: openai}\n")
    p = price(Usage(input_tokens=1000, output_tokens=100), "openai", "gpt-4o", rules=rules)
    assert p.cost_usd is None and p.source == "unknown"


def test_unknown_model_is_left_unpriced_with_the_reason() -> None:
    p = price(Usage(input_tokens=1000, output_tokens=100), "openai", "my-finetune-xyz")
    assert (p.cost_usd, p.source) == (None, "unknown")
    assert "my-finetune-xyz" in p.detail["reason"]
    # No usage reported (an error answer): nothing to price, and not counted as unpriced.
    assert price(Usage(), "openai", "gpt-4o").source is None


def test_time_of_day_prices_are_not_cached_by_date() -> None:
    # deepseek-chat: $0.27 / $1.10 from 00:30 to 16:30 UTC, $0.135 / $0.55 off-peak.
    # 1000 × 0.27 + 100 × 1.1 = 270 + 110 = 380 / 1e6; off-peak half that: 190 / 1e6
    pricer = Pricer(None, prices_file=None)
    usage = Usage(input_tokens=1000, output_tokens=100)
    day = pricer.price(usage, provider="deepseek", models=("deepseek-chat",), url=None, when=NOV)
    night = pricer.price(usage, provider="deepseek", models=("deepseek-chat",), url=None,
                         when=NOV.replace(hour=20))
    assert (day.cost_usd, night.cost_usd) == (Decimal("0.00038"), Decimal("0.00019"))


def test_pricing_never_touches_the_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import genai_prices.update_prices as updates

    attempts: list[object] = []
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else str(address)
        if not (isinstance(host, str) and (host.startswith("127.") or host in ("::1", "localhost"))):
            attempts.append(address)
            raise OSError(f"test: no network for pricing ({address})")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: attempts.append(a) or [])
    rules = tmp_path / "rules.yaml"
    rules.write_text("providers:\n  ollama: {price: free}\n")
    pricer = Pricer(rules, prices_file=None)
    pricer.warm()
    for provider, model in (("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4-5"), ("gemini", "gemini-2.5-pro"),
                            ("ollama", "qwen3"), ("openai", "no-such-model"), ("together", "x/y")):
        pricer.price(Usage(input_tokens=10, output_tokens=5), provider=provider, models=(model,), url=None, when=NOV)
    assert attempts == []
    assert updates._shared_updater.thread is None and updates._shared_updater.ref_count == 0


# -- rules.yaml --------------------------------------------------------------------------------------
def test_rules_check_names_the_file_line_rule_and_fix(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("providers:\n"
                     "  ollama: {price: gratis}\n"
                     "  openai:\n"
                     "    price:\n"
                     '      "gpt-4o*": {input: 2.5, ouput: 10}\n'
                     '      "o3": {input: cheap, output: 8}\n')
    r = subprocess.run([sys.executable, "-m", "llmtap", "rules", "check", str(rules)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert f"{rules}:2: provider `ollama`: price must be `free` or a mapping" in r.stderr
    assert f"{rules}:5: provider `openai`: price of `gpt-4o*`: unknown key `ouput`" in r.stderr
    assert "output missing" in r.stderr
    assert f"{rules}:6: provider `openai`: price of `o3`: input must be a number of USD per million" in r.stderr
    good = tmp_path / "good.yaml"
    good.write_text('providers:\n  ollama: {price: free}\n  openai: {price: {"gpt-4o*": {input: 2.5, output: 10}}}\n')
    ok = subprocess.run([sys.executable, "-m", "llmtap", "rules", "check", str(good)], capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "prices: ollama free; openai gpt-4o* $2.5/$10 per million in/out" in ok.stdout


def test_price_values_are_exact_as_written() -> None:
    parsed, problems = parse_price("p", {"m": {"input": 0.1, "output": 0.3, "cache_write": "1.25"}})
    assert problems == [] and parsed is not None
    assert (parsed.models[0].input, parsed.models[0].output, parsed.models[0].cache_read,
            parsed.models[0].cache_write) == (Decimal("0.1"), Decimal("0.3"), Decimal("0.1"), Decimal("1.25"))


# -- in the recorder, stats and backfill ---------------------------------------------------------------
OPENAI_BODY = json.dumps({"id": "c1", "object": "chat.completion", "model": "gpt-4o-2024-08-06", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}}).encode()


def finished(model: str, provider: str = "openai", body: bytes = OPENAI_BODY, when: datetime = NOV) -> Call:
    return Call(id=new_id(), started_at=when, method="POST", url="http://127.0.0.1:8081/openai/chat/completions",
                api="openai.chat", model_requested=model, model_sent=model, provider=provider, status=200,
                attempts=1, duration_ms=10.0, request_body=b'{"model":"x","messages":[]}', client="agent/1",
                response_headers={"content-type": "application/json"}, response_body=body)


def record(db: Path, calls: list[Call], **kw) -> None:
    rec = Recorder(db, serve=False, **kw)
    rec.start()
    try:
        for call in calls:
            rec.call_finished(call.finished())
    finally:
        rec.close()


def llmtap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmtap", *args], capture_output=True, text=True, timeout=120)


def test_recorded_calls_carry_exact_cost_and_stats_count_the_unpriced(tmp_path: Path) -> None:
    db = tmp_path / "calls.duckdb"
    body = OPENAI_BODY.replace(b"gpt-4o-2024-08-06", b"my-finetune")
    record(db, [finished("gpt-4o"), finished("gpt-4o"), finished("my-finetune", body=body)])
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT model_sent, cost_usd, cost_source, cost_detail FROM calls ORDER BY id").fetchall()
    # gpt-4o: 1000 × 2.50 + 100 × 10 = 2500 + 1000 = 3500 / 1e6 each
    assert [r[1] for r in rows] == [Decimal("0.0035"), Decimal("0.0035"), None]
    assert rows[0][2].startswith("genai-prices") and rows[2][2] == "unknown"
    assert json.loads(rows[0][3])["model"] == "gpt-4o"
    r = llmtap("stats", "--db", str(db), "--json")
    assert r.returncode == 0, r.stderr
    by_model = {g["model"]: g for g in json.loads(r.stdout)}
    assert by_model["gpt-4o"]["cost_usd"] == 0.007 and by_model["gpt-4o"]["unpriced"] == 0
    assert by_model["my-finetune"]["cost_usd"] is None and by_model["my-finetune"]["unpriced"] == 1
    table = llmtap("stats", "--db", str(db))
    assert "3 calls, $0.007 (1 call unpriced" in " ".join(table.stdout.split())
    client = json.loads(llmtap("stats", "--db", str(db), "--by", "client", "--json").stdout)
    assert [(g["client"], g["calls"], g["cost_usd"], g["unpriced"]) for g in client] == [("agent/1", 3, 0.007, 1)]
    # Only the unpriced call: its cost is not known, not $0.
    alone = llmtap("stats", "--db", str(db), "--model", "my-finetune")
    assert "1 call, cost unknown (1 call unpriced" in " ".join(alone.stdout.split()), alone.stdout


def test_backfill_prices_old_calls_and_again_after_a_rules_change(tmp_path: Path) -> None:
    db = tmp_path / "calls.duckdb"
    record(db, [finished("gpt-4o"), finished("my-finetune", body=OPENAI_BODY.replace(b"gpt-4o-2024-08-06",
                                                                                      b"my-finetune"))],
           pricing=False)
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM calls WHERE cost_usd IS NULL").fetchone()[0] == 2
    r = llmtap("cost", "backfill", "--db", str(db))
    assert r.returncode == 0, r.stderr
    assert "priced 1 calls" in r.stderr and "1 left unpriced" in r.stderr
    rules = tmp_path / "rules.yaml"
    rules.write_text('providers:\n  openai: {price: {"my-*": {input: 1, output: 2}}}\n')
    # Without --all only the calls without a cost: 1000 × 1 + 100 × 2 = 1200 / 1e6
    r = llmtap("cost", "backfill", "--db", str(db), "--rules", str(rules))
    assert r.returncode == 0 and "priced 1 calls" in r.stderr, r.stderr
    with duckdb.connect(str(db), read_only=True) as con:
        got = dict(con.execute("SELECT model_sent, cost_usd FROM calls").fetchall())
    assert got == {"gpt-4o": Decimal("0.0035"), "my-finetune": Decimal("0.0012")}
    rules.write_text('providers:\n  openai: {price: {"*": {input: 10, output: 10}}}\n')
    r = llmtap("cost", "backfill", "--db", str(db), "--rules", str(rules), "--all")
    assert r.returncode == 0 and "priced 2 calls" in r.stderr, r.stderr
    with duckdb.connect(str(db), read_only=True) as con:
        assert {c for (c,) in con.execute("SELECT cost_usd FROM calls").fetchall()} == {Decimal("0.011")}
        # The sessions' totals follow their calls' new prices.
        sessions = con.execute("SELECT cost_usd FROM sessions").fetchall()
    assert sessions and all(cost == Decimal("0.011") for (cost,) in sessions)


def test_rules_prices_follow_edits_while_recording(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text('providers:\n  openai: {price: {"*": {input: 1, output: 1}}}\n')
    db = tmp_path / "calls.duckdb"
    from llmtap.recorder.services import Options

    rec = Recorder(db, serve=False, services=Options(rules=str(rules)))
    committed = threading.Event()
    rec.on_written = lambda n: committed.set()
    rec.start()
    try:
        rec.call_finished(finished("gpt-4o").finished())
        assert committed.wait(30)
        assert rec.pricer is not None
        rules.write_text('providers:\n  openai: {price: {"*": {input: 2, output: 2}}}\n')
        os.utime(rules, ns=(1, 1))  # a new mtime even within the file system's time resolution
        rec.pricer.rules._checked = -10.0  # the once-a-second check is due
        rec.call_finished(finished("gpt-4o").finished())
    finally:
        rec.close()
    with duckdb.connect(str(db), read_only=True) as con:
        costs = [c for (c,) in con.execute("SELECT cost_usd FROM calls ORDER BY id").fetchall()]
    # 1100 tokens × $1, then × $2 per million
    assert costs == [Decimal("0.0011"), Decimal("0.0022")]


# -- end to end ------------------------------------------------------------------------------------------
def test_a_real_run_prices_calls_by_rules_and_stats_json_says_so(tmp_path: Path, fake: FakeProvider) -> None:
    fake.input_tokens = 1000
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"providers:\n"
                     f"  local:\n    base_url: '{fake.url}/v1'\n    api: openai\n"
                     f'    price: {{"priced-*": {{input: 3, output: 15}}}}\n')
    db = tmp_path / "calls.duckdb"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtap", "run", "--db", str(db), "--rules", str(rules), "--confdir",
         str(tmp_path / "ca"), "--proxy", "off", "--gateway", "127.0.0.1:0", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        from test_cli import Lines

        err = Lines(proc.stderr)
        gateway = re.search(r"(http://\S+)/<provider>", err.wait_for("gateway")).group(1)
        with httpx.Client(timeout=30) as client:
            for model in ("priced-model", "priced-model", "other-model"):
                r = client.post(f"{gateway}/local/chat/completions",
                                json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200
            out_tokens = r.json()["usage"]["completion_tokens"]
        # Read through the running llmtap (the remote reader), as a user would.
        stats = subprocess.run([sys.executable, "-m", "llmtap", "stats", "--db", str(db), "--json"],
                               capture_output=True, text=True, timeout=120)
        held = subprocess.run([sys.executable, "-m", "llmtap", "cost", "backfill", "--db", str(db)],
                              capture_output=True, text=True, timeout=120)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert stats.returncode == 0, stats.stderr
    groups = {g["model"]: g for g in json.loads(stats.stdout)}
    # 1000 × 3 + out × 15 per million, twice
    expected = Decimal(2) * (Decimal(1000 * 3) + Decimal(out_tokens * 15)) / Decimal(1_000_000)
    assert Decimal(str(groups["priced-model"]["cost_usd"])) == expected
    assert groups["priced-model"]["unpriced"] == 0
    # A loopback provider without a price is never guessed.
    assert groups["other-model"]["cost_usd"] is None and groups["other-model"]["unpriced"] == 1
    assert held.returncode == 2 and "stop it" in held.stderr, held.stderr
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT cost_source FROM calls WHERE model_sent = 'priced-model'").fetchall() == [
            ("rules.yaml",), ("rules.yaml",)]


# -- each dialect's own wire format, through the recorder's extraction ---------------------------------
WIRE = {
    # claude-sonnet-4-5 as above: 1000 plain + 2000 read + 3000 written input, 500 output:
    # 1000 × 3 + 2000 × 0.3 + 3000 × 3.75 + 500 × 15 = 22350 / 1e6
    "anthropic": ("anthropic.messages", "anthropic", "claude-sonnet-4-5", {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 1000, "cache_creation_input_tokens": 3000, "cache_read_input_tokens": 2000,
                  "output_tokens": 500}}, Decimal("0.02235")),
    # The same with 2000 of the 3000 written for an hour ($6 a million, not $3.75), as Anthropic
    # splits them in `cache_creation`: 1000 × 3 + 2000 × 0.3 + 1000 × 3.75 + 2000 × 6 + 500 × 15
    # = 26850 / 1e6
    "anthropic_1h": ("anthropic.messages", "anthropic", "claude-sonnet-4-5", {
        "id": "msg_2", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 1000, "cache_creation_input_tokens": 3000, "cache_read_input_tokens": 2000,
                  "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
                  "output_tokens": 500}}, Decimal("0.02685")),
    # gemini-2.5-flash as above: 200 answer + 500 thought tokens are all output:
    # 1000 × 0.3 + 700 × 2.5 = 2050 / 1e6
    "gemini": ("gemini.generate", "gemini", "gemini-2.5-flash", {
        "candidates": [{"content": {"role": "model", "parts": [{"text": "hi"}]}, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 1000, "candidatesTokenCount": 200, "thoughtsTokenCount": 500,
                          "totalTokenCount": 1700}, "modelVersion": "gemini-2.5-flash"}, Decimal("0.00205")),
    # o3 as above: 1000 plain + 1000 cached input, 1500 output (1200 reasoning):
    # 1000 × 2 + 1000 × 0.5 + 1500 × 8 = 14500 / 1e6
    "responses": ("openai.responses", "openai", "o3", {
        "id": "resp_1", "object": "response", "status": "completed", "model": "o3-2025-04-16",
        "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]}],
        "usage": {"input_tokens": 2000, "input_tokens_details": {"cached_tokens": 1000}, "output_tokens": 1500,
                  "output_tokens_details": {"reasoning_tokens": 1200}, "total_tokens": 3500}}, Decimal("0.0145")),
    # OpenRouter says what it charged: taken as sent.
    "openrouter": ("openai.chat", "openrouter", "openai/gpt-4o", {
        "id": "gen-1", "object": "chat.completion", "model": "openai/gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100, "cost": 0.0035123}},
        Decimal("0.0035123")),
    # Ollama with `price: free` in rules.yaml.
    "ollama": ("ollama.chat", "ollama", "llama3", {
        "model": "llama3", "created_at": "2026-11-01T12:00:00Z", "message": {"role": "assistant", "content": "hi"},
        "done": True, "done_reason": "stop", "prompt_eval_count": 1000, "eval_count": 100}, Decimal(0)),
}


def test_each_dialects_wire_usage_is_priced_exactly(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("providers:\n  ollama: {price: free}\n")
    from llmtap.recorder.services import Options

    calls, names = [], {}
    for name, (api, provider, model, body, _) in WIRE.items():
        call = finished(model, provider, json.dumps(body).encode())
        call.api = api
        calls.append(call)
        names[call.id] = name
    db = tmp_path / "calls.duckdb"
    record(db, calls, services=Options(rules=str(rules)))
    with duckdb.connect(str(db), read_only=True) as con:
        got = {r[0]: r[1:] for r in con.execute(
            "SELECT id, cost_usd, cost_source, cache_read_tokens, cache_write_tokens FROM calls").fetchall()}
    by_name = {names[cid]: v for cid, v in got.items()}
    for name, (_, _, _, _, expected) in WIRE.items():
        assert by_name[name][0] == expected, name
    assert by_name["anthropic"][2:] == (2000, 3000)
    assert by_name["openrouter"][1] == "provider" and by_name["ollama"][1] == "rules.yaml"
    assert by_name["gemini"][1].startswith("genai-prices")
    # Priced again from what the record kept (the usage object too, for the hour's writes): the same.
    r = llmtap("cost", "backfill", "--db", str(db), "--rules", str(rules), "--all")
    assert r.returncode == 0, r.stderr
    with duckdb.connect(str(db), read_only=True) as con:
        again = {names[cid]: cost for cid, cost in con.execute("SELECT id, cost_usd FROM calls").fetchall()}
    assert again == {name: expected for name, (*_, expected) in WIRE.items()}


# -- llmtap prices update: online only when asked ----------------------------------------------------------
TABLE = [{"id": "openai", "name": "OpenAI", "api_pattern": r"https://api\.openai\.com", "models": [
    {"id": "gpt-4o", "match": {"equals": "gpt-4o"}, "prices": {"input_mtok": 1, "output_mtok": 2}}]}]


def test_prices_update_saves_a_table_that_pricing_then_uses(tmp_path: Path) -> None:
    import http.server

    from llmtap import paths

    class Table(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(TABLE).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Table)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        r = llmtap("prices", "update", "--url", f"http://127.0.0.1:{server.server_port}/data.json")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert r.returncode == 0, r.stderr
    saved = paths.default_prices()
    assert f"saved 1 providers and 1 models to {saved}" in r.stdout
    assert saved.stat().st_mode & 0o777 == 0o600
    # 1000 × 1 + 100 × 2 = 1200 / 1e6, by the saved table, which says when it was fetched.
    p = Pricer(None, prices_file=saved).price(Usage(input_tokens=1000, output_tokens=100), provider="openai",
                                              models=("gpt-4o",), url=None, when=NOV)
    assert p.cost_usd == Decimal("0.0012") and "table fetched" in p.source


def test_prices_update_offline_says_so_and_keeps_the_table(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    r = llmtap("prices", "update", "--url", f"http://127.0.0.1:{port}/data.json")
    assert r.returncode == 2
    assert "Are you offline? llmtap keeps pricing with the table genai-prices" in r.stderr
    from llmtap import paths

    assert not paths.default_prices().exists()
