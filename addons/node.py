"""Making Node tools go through llmtap's proxy.

Node's built-in fetch() -- what the npm openai and anthropic SDKs, and so Cline, use -- ignores
HTTPS_PROXY. Node 24 and 22.21+ honour it under NODE_USE_ENV_PROXY=1; older ones (Node 20 is
still what many distributions ship) only through a preload that installs undici's
EnvHttpProxyAgent as fetch's dispatcher. `llmtap env` and `llmtap wrap` set both, and keep a copy
of undici in llmtap's data folder for the preload, installed with npm the first time it is needed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from llmtap import paths

PRELOAD = Path(__file__).with_name("node_proxy.cjs")
# undici 6 runs on Node 18+, and its dispatcher interface is the one Node 20's own fetch calls
# (undici 7 changed the handler hooks).
UNDICI_SPEC = "undici@6"


def node_version(node: str = "node") -> tuple[int, int, int] | None:
    """The version of `node` on PATH, or None when there is none (or it does not answer)."""
    exe = shutil.which(node)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.match(r"v(\d+)\.(\d+)\.(\d+)", out.strip())
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def honours_env_proxy(version: tuple[int, int, int]) -> bool:
    """True when this Node's fetch() follows HTTPS_PROXY by itself under NODE_USE_ENV_PROXY=1."""
    major, minor, _ = version
    return major >= 24 or (major == 22 and minor >= 21)


def undici_dir() -> Path:
    """Where llmtap's copy of undici lives (LLMTAP_UNDICI_DIR overrides, e.g. for a shared copy)."""
    override = os.environ.get("LLMTAP_UNDICI_DIR")
    return Path(override) if override else paths.data_dir() / "node"


def has_undici(where: Path) -> bool:
    return (where / "node_modules" / "undici" / "package.json").is_file()


def ensure_undici(where: Path) -> bool:
    """Install undici into `where` unless it is there. Says what it does on stderr (stdout may
    be an `eval`). False, with the reason printed, when it cannot be had."""
    if has_undici(where):
        return True
    npm = shutil.which("npm")
    if npm is None:
        print("llmtap: this Node's fetch() ignores HTTPS_PROXY, and npm is not on PATH to install "
              f"undici for it. Install it yourself: npm install --prefix {where} {UNDICI_SPEC}",
              file=sys.stderr)
        return False
    print(f"llmtap: installing {UNDICI_SPEC} into {where}, so that Node's fetch() uses the proxy "
          "(once)", file=sys.stderr)
    where.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run([npm, "install", "--prefix", str(where), "--no-audit", "--no-fund",
                            "--silent", UNDICI_SPEC], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"llmtap: npm could not install undici ({exc}); Node tools may bypass llmtap. "
              f"Try: npm install --prefix {where} {UNDICI_SPEC}", file=sys.stderr)
        return False
    if r.returncode != 0 or not has_undici(where):
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"llmtap: npm install {UNDICI_SPEC} failed ({tail[0]}); Node tools may bypass llmtap. "
              f"Try: npm install --prefix {where} {UNDICI_SPEC}", file=sys.stderr)
        return False
    return True


def node_env(environ: dict[str, str], *, install: bool) -> dict[str, str]:
    """The variables that make Node tools use the proxy, given the environment they start in.

    With `install`, undici is fetched when the `node` on PATH needs it and llmtap has none yet.
    """
    where = undici_dir()
    if install:
        version = node_version()
        if version is not None and not honours_env_proxy(version):
            ensure_undici(where)
    preload = str(PRELOAD)
    if " " in preload:
        preload = f'"{preload}"'
    options = environ.get("NODE_OPTIONS", "")
    if str(PRELOAD) not in options:
        options = f"{options} --require {preload}".strip()
    return {
        "NODE_USE_ENV_PROXY": "1",
        "NODE_OPTIONS": options,
        "LLMTAP_UNDICI_DIR": str(where),
        # Cline runs its sessions in a background hub process that keeps the environment of
        # whichever `cline` started it first, so a wrapped `cline` would talk to the provider
        # directly; local mode runs the session in the wrapped process itself.
        "CLINE_SESSION_BACKEND_MODE": "local",
    }
