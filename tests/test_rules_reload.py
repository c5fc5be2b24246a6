"""A rules file caught empty or half-written, as an editor's save leaves it for a moment,
never replaces the rules a running proxy routes by; an empty file is refused, not taken
for "no rules"."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from fakeprovider import FakeProvider
from llmtap.addons.runner import RulesHolder
from proxyharness import RunningProxy

ROUTE = """\
  - name: {name}
    match: {{model: "{model}"}}
    targets: [{{provider: up, model: {sent}}}]
"""


def rules_text(url: str, *routes: tuple[str, str, str]) -> str:
    return (f"providers:\n  up: {{base_url: '{url}/v1', api: openai}}\nroutes:\n"
            + "".join(ROUTE.format(name=n, model=m, sent=s) for n, m, s in routes))


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    gone = threading.Event()
    timer = threading.Timer(timeout, gone.set)
    timer.start()
    try:
        while not cond():
            if gone.wait(0.02):
                raise TimeoutError("condition not met")
    finally:
        timer.cancel()


def model_sent(proxy: RunningProxy, model: str) -> str:
    r = httpx.post(f"{proxy.gateway_url}/up/chat/completions", timeout=20,
                   json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    return r.json()["model"]


def test_rules_file_truncated_by_an_editor_keeps_routing_by_the_last_good_rules(
        tmp_path: Path, fake: FakeProvider, confdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="llmtap")
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(fake.url, ("smart", "smart", "gpt-routed")))
    with RunningProxy(path, confdir) as proxy:
        rules = proxy.proxy.rules
        assert model_sent(proxy, "smart") == "gpt-routed"
        with path.open("w"):  # what an editor's save does first
            pass
        wait_for(rules.settled)
        for _ in range(3):  # more looks at the same empty file say nothing more
            proxy.call_in_loop(rules.check)
        assert model_sent(proxy, "smart") == "gpt-routed"
        said = [r.getMessage() for r in caplog.records if "no rules in it" in r.getMessage()]
        assert len(said) == 1 and str(path) in said[0] and "Keeping the last good rules (1 routes)" in said[0]
        # The save completes: the new rules apply.
        path.write_text(rules_text(fake.url, ("smart", "smart", "gpt-saved")))
        wait_for(lambda: rules.settled() and model_sent(proxy, "smart") == "gpt-saved")


def test_a_rules_file_still_being_written_is_not_applied_until_it_holds_still(tmp_path: Path, fake: FakeProvider) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(fake.url, ("a", "a", "m-a"), ("b", "b", "m-b")))
    holder = RulesHolder(path)
    full = rules_text(fake.url, ("a", "a", "m-a2"), ("b", "b", "m-b2"))
    # A prefix that is valid YAML and valid rules: route `b` is missing.
    prefix = full[:full.index("  - name: b")]
    path.write_text(prefix)
    assert not holder.check()  # seen changing: not yet
    path.write_text(full)
    assert not holder.check()  # changed again since the last look
    assert holder.current.routes[0].targets[0].model == "m-a"
    assert holder.check()  # unchanged for a whole interval: applied
    assert [r.targets[0].model for r in holder.current.routes] == ["m-a2", "m-b2"]


@pytest.mark.parametrize("text, says", [("", "the file is empty"),
                                        ("# providers:\n#   ollama: {}\n\n", "the file holds nothing but comments")],
                         ids=["zero-bytes", "only-comments"])
def test_empty_rules_file_is_refused_by_check_and_at_start(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    check = subprocess.run([sys.executable, "-m", "llmtap", "rules", "check", str(path)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 2
    assert f"{path}: {says}" in check.stderr and "routes: []" in check.stderr
    run = subprocess.run([sys.executable, "-m", "llmtap", "run", "--no-record", "--rules", str(path),
                          "--confdir", str(tmp_path / "ca"), "--proxy", "127.0.0.1:0", "--gateway", "127.0.0.1:0"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert f"{path}: {says}" in run.stderr


def test_explicitly_empty_routes_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("routes: []\n")
    check = subprocess.run([sys.executable, "-m", "llmtap", "rules", "check", str(path)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "0 routes" in check.stdout
