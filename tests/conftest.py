"""Shared fixtures: fake providers on 127.0.0.1, a real llmtap proxy, and a private user dir."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakeprovider import FakeProvider  # noqa: E402

# The Ctrl-C tests send SIGINT to the programs they start, as a terminal does to its foreground
# job. A suite started as a background job of a non-interactive shell (`cmd &` in a script, as
# some CI runners and `nohup sh -c '... &'` do) inherits SIGINT ignored, every program it starts
# inherits that, and CPython keeps an ignored SIGINT ignored: those programs then never see
# Ctrl-C and the tests hang until their timeouts. Catching it here gives the children the
# default action back (exec resets caught signals, not ignored ones).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _private_user_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the developer's own config, data or CA."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as fp:
        yield fp


@pytest.fixture
def fake2() -> Iterator[FakeProvider]:
    with FakeProvider() as fp:
        yield fp


@pytest.fixture(scope="session")
def confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA for the whole run: generating an RSA key per test would dominate the suite."""
    return tmp_path_factory.mktemp("confdir")
