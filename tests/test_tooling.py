"""The lint, type and import-contract checks (scripts/lint.py) pass, so `./scripts/test.sh`
is the one command a contributor runs; and the import contracts do catch a crossing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = ROOT / "scripts" / "lint.py"


def lint(script: Path, check: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), check], capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("check", ["ruff", "mypy", "imports"])
def test_the_tree_passes(check: str) -> None:
    done = lint(LINT, check)
    assert done.returncode == 0, f"scripts/lint.py {check} failed:\n{done.stdout}\n{done.stderr}"


@pytest.mark.timeout(600)
def test_a_recorder_importing_textual_or_a_ui_importing_the_proxy_breaks_the_contracts(tmp_path: Path) -> None:
    """The contracts run on a copy of the repo with three crossings a careless edit would make."""
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("llmtap", "addons", "dialects", "recorder", "tui", "scripts"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "recorder" / "times.py", "a") as f:
        f.write("\nimport textual  # noqa: E402,F401\n")
    with open(tmp_path / "tui" / "render.py", "a") as f:
        f.write("\nfrom llmtap.addons.runner import Proxy  # noqa: E402,F401\n")
    with open(tmp_path / "dialects" / "shapes.py", "a") as f:
        f.write("\nfrom llmtap.recorder import times  # noqa: E402,F401\n")

    done = lint(tmp_path / "scripts" / "lint.py", "imports")
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "llmtap.recorder.times -> textual" in out, out
    assert "llmtap.tui.render -> llmtap.addons.runner" in out, out
    assert "llmtap.dialects.shapes -> llmtap.recorder.times" in out, out
    assert "Contracts: 1 kept, 3 broken." in out, out


@pytest.mark.timeout(120)
def test_run_tui_through_the_command_still_runs_the_proxy_in_the_ui(tmp_path: Path, confdir: Path) -> None:
    """`llmtap run --tui` as typed, in a terminal (a pty): the wiring now lives in llmtap.compose,
    and the UI still starts the proxy, whose start-up error (a taken port) ends it with code 2
    and the message on the terminal."""
    import os
    import pty
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmtap", "run", "--tui", "--no-record", "--proxy", f"127.0.0.1:{port}",
             "--gateway", "off", "--confdir", str(confdir), "--rules", str(ROOT / "rules.yaml")],
            stdin=slave, stdout=slave, stderr=slave, cwd=tmp_path,
            env={**os.environ, "TERM": "xterm-256color", "HOME": str(tmp_path)})
        os.close(slave)
        out = b""
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal (it exited)
                break
            if not data:
                break
            out += data
        code = proc.wait(timeout=60)
    finally:
        os.close(master)
        taken.close()
    text = out.decode("utf-8", "replace")
    assert code == 2, text
    assert f"port 127.0.0.1:{port} (proxy) is in use by another program" in text, text
