"""Lint, type-check and check the import contracts: ruff, mypy and lint-imports, configured in
pyproject.toml. Run by tests/test_tooling.py, so `./scripts/test.sh` runs it too.

    .venv/bin/python scripts/lint.py              # all three
    .venv/bin/python scripts/lint.py mypy imports # some

mypy and import-linter resolve `llmtap` by import path and then read its folder, and in the
repo that folder (llmtap/) does not hold llmtap.addons, llmtap.recorder and llmtap.tui: those
live in addons/, recorder/ and tui/ and are mapped in only at install time
([tool.setuptools.package-dir]). So both run over a tree of symbolic links in a temporary
folder, laid out as installed (llmtap/recorder -> recorder/, ...), with that folder first on
the import path. The links point at the working files, so nothing needs reinstalling and a
new module is seen at once. Paths in their messages read llmtap/recorder/x.py for recorder/x.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# package-dir of pyproject.toml: subpackage of llmtap -> folder in the repo.
MAPPED = {"addons": "addons", "dialects": "dialects", "recorder": "recorder", "tui": "tui"}
RUFF_PATHS = ["addons", "dialects", "recorder", "tui", "llmtap", "tests", "scripts"]


def installed_tree(dest: Path) -> Path:
    """dest/llmtap laid out as the installed package, of links into the repo."""
    pkg = dest / "llmtap"
    pkg.mkdir()
    for entry in (ROOT / "llmtap").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for sub, folder in MAPPED.items():
        (pkg / sub).symlink_to(ROOT / folder, target_is_directory=True)
    return dest


def tool(name: str) -> str:
    """The tool next to this Python (the .venv's), else the one on PATH."""
    path = BIN / name
    return str(path) if path.exists() else name


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=cwd, env=env).returncode


def main(argv: list[str]) -> int:
    wanted = argv or ["ruff", "mypy", "imports"]
    unknown = set(wanted) - {"ruff", "mypy", "imports"}
    if unknown:
        print(f"lint.py: unknown check {', '.join(sorted(unknown))}; give ruff, mypy or imports",
              file=sys.stderr)
        return 2
    failed: list[str] = []
    if "ruff" in wanted and run([tool("ruff"), "check", *RUFF_PATHS], ROOT) != 0:
        failed.append("ruff")
    with tempfile.TemporaryDirectory(prefix="llmtap-lint-") as tmp:
        tree = installed_tree(Path(tmp))
        # The tree first: ahead of the repo's own llmtap/ and of the editable install's finder.
        env = {**os.environ, "PYTHONPATH": str(tree), "MYPYPATH": str(tree)}
        config = str(ROOT / "pyproject.toml")
        if "mypy" in wanted and run([tool("mypy"), "--config-file", config,
                                     "--cache-dir", str(ROOT / ".mypy_cache"), "-p", "llmtap"],
                                    tree, env) != 0:
            failed.append("mypy")
        if "imports" in wanted and run([tool("lint-imports"), config, "--no-cache"],
                                       tree, env) != 0:
            failed.append("imports")
    if failed:
        print(f"lint.py: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
