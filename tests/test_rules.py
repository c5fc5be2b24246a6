"""rules.yaml: what a user writes, what `llmtap rules check` tells them, and how calls match."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmtap.addons.rules import RulesError, load_rules, parse_rules

REPO = Path(__file__).resolve().parents[1]


def problems(text: str) -> list[str]:
    with pytest.raises(RulesError) as info:
        parse_rules(textwrap.dedent(text), "rules.yaml")
    return info.value.problems


def test_shipped_example_is_valid_and_routes_gpt_4o_with_a_fallback() -> None:
    rules = load_rules(REPO / "rules.yaml")
    route = rules.match(model="gpt-4o", host="api.openai.com", path="/chat/completions", client=None, api="openai")
    assert route is not None
    assert [(t.provider, t.model) for t in route.targets] == [("openai", "gpt-4o"), ("openrouter", "openai/gpt-4o")]


def test_gateway_path_maps_onto_the_providers_base_url() -> None:
    rules = parse_rules("providers:\n  lab: {base_url: 'http://10.0.0.5:8000/v1/', api: openai}\n")
    assert rules.provider_for_url("https", "openrouter.ai", 443, "/api/v1/chat/completions")[1] == "/chat/completions"
    lab, rest = rules.provider_for_url("http", "10.0.0.5", 8000, "/v1/models")
    assert (lab.name, rest) == ("lab", "/models")
    # Same host, another port or a path outside the base: not that provider.
    assert rules.provider_for_url("http", "10.0.0.5", 8001, "/v1/models") is None
    assert rules.provider_for_url("http", "10.0.0.5", 8000, "/v10/models") is None
    assert {("openrouter.ai", 443), ("api.anthropic.com", 443), ("10.0.0.5", 8000)} <= rules.intercept_addresses()


def test_first_matching_route_wins_and_narrowing_globs_apply() -> None:
    rules = parse_rules(textwrap.dedent("""\
        routes:
          - name: cline-only
            match: {model: "gpt-*", client: "Cline*"}
            targets: [{provider: openrouter}]
          - name: any-gpt
            match: {model: "gpt-*", path: "/chat/completions"}
            targets: [{provider: openai}]
          - name: claude
            match: {model: "*"}
            targets: [{provider: anthropic}]
        """))
    m = rules.match
    assert m(model="gpt-4o", host="x", path="/chat/completions", client="Cline/3.1", api="openai").name == "cline-only"
    assert m(model="gpt-4o", host="x", path="/chat/completions", client="curl/8", api="openai").name == "any-gpt"
    assert m(model="gpt-4o", host="x", path="/responses", client="curl/8", api="openai") is None
    # An anthropic request never lands on a route whose targets speak openai.
    assert m(model="gpt-4o", host="x", path="/v1/messages", client="Cline/3.1", api="anthropic").name == "claude"


def test_retry_words_decide_which_failures_fall_back() -> None:
    rules = parse_rules(textwrap.dedent("""\
        routes:
          - match: {model: "*"}
            targets: [{provider: openai}]
            retry: {attempts: 3, on: [timeout, 429, 5xx]}
        """))
    retry = rules.routes[0].retry
    assert retry.attempts == 3 and retry.retries_timeout and not retry.retries_connect
    assert retry.retries_status(429) and retry.retries_status(503) and retry.retries_status(529)
    assert not retry.retries_status(400) and not retry.retries_status(408)


def test_every_problem_is_reported_with_its_line_and_a_fix() -> None:
    found = problems("""\
        providers:
          lab: {base_url: "http://10.0.0.5:8000/v1", api: opnai, key: sk-abc}
        routes:
          - match: {model: "gpt-[4o"}
            targets:
              - {provider: openai}
              - {provider: anthropc}
            retry: {attempts: 0, on: [connect, 5xx, sometimes]}
            timout: {connect_s: 5}
          - match: {model: "claude*"}
            targets:
              - {provider: openai}
              - {provider: anthropic}
        """)
    text = "\n".join(found)
    assert "rules.yaml:2: provider `lab`: do not put a key in rules.yaml; write `key_env: NAME`" in text
    assert "rules.yaml:2: provider `lab`: api `opnai` is not known; did you mean `openai`?" in text
    assert "rules.yaml:4: route `route 1`: match.model 'gpt-[4o' is not a valid glob" in text
    assert "rules.yaml:7: route `route 1`: unknown provider `anthropc`; did you mean `anthropic`?" in text
    assert "rules.yaml:8: route `route 1`: retry.attempts must be a whole number from 1 to 20, got 0" in text
    assert "rules.yaml:8: route `route 1`: retry.on `sometimes` is not a failure kind" in text
    assert "rules.yaml:9: route 1: unknown key `timout`; did you mean `timeout`?" in text
    assert "rules.yaml:13: route `route 2`: provider `anthropic` speaks api `anthropic` but `openai` speaks `openai`" in text
    assert len(found) == 8


def test_yaml_syntax_error_names_the_line() -> None:
    assert problems("routes:\n  - match: {model: 'x'\n")[0].startswith("rules.yaml:3: not valid YAML")


def test_rules_check_command(tmp_path: Path) -> None:
    good = subprocess.run([sys.executable, "-m", "llmtap", "rules", "check", str(REPO / "rules.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert "2 routes" in good.stdout and "gpt-4o: model=gpt-4o" in good.stdout
    bad = tmp_path / "rules.yaml"
    bad.write_text("routes:\n  - match: {model: x}\n    targets: [{provider: nope}]\n")
    out = subprocess.run([sys.executable, "-m", "llmtap", "rules", "check", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"{bad}:3: route `route 1`: unknown provider `nope`" in out.stderr
