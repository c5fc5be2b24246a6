"""Where llmtap keeps its files by default (XDG on Linux, the platform's own elsewhere), and
that they are the user's alone: they hold traffic, keys and the CA."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

# Group and others get nothing: the DB, its WAL and DuckDB's temp files, the spool, the
# endpoint's token, exports and the CA's key are created under this umask.
PRIVATE_UMASK = 0o077

log = logging.getLogger("llmtap")


def private_umask() -> int:
    """Make every file this process (and its children) creates the user's alone; returns the
    umask before. Set by the `llmtap` commands that write, and by the recorder process."""
    old = os.umask(PRIVATE_UMASK)
    os.umask(old | PRIVATE_UMASK)
    return old


@contextlib.contextmanager
def private_files() -> Iterator[None]:
    """The private umask for the files made inside the block only (`llmtap wrap` hands the
    user's own umask to the command it runs)."""
    old = private_umask()
    try:
        yield
    finally:
        os.umask(old)


def tighten(path: Path) -> bool:
    """Take group and others' access away from `path` if it has any; True if it had. A file
    made by an older llmtap, or by DuckDB under a looser umask, is closed this way."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    if not mode & 0o077:
        return False
    try:
        os.chmod(path, stat.S_IMODE(mode) & ~0o077)
    except OSError as exc:
        log.warning("%s is readable by others and cannot be made private (%s); chmod go-rwx it",
                    path, exc.strerror or exc)
        return False
    return True


def private_ca_dir(path: Path) -> Path:
    """The CA's folder: only the user can enter it, made if missing, and the files mitmproxy
    and llmtap keep there are closed (others a user keeps there are left as they are)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    ours = [p for p in path.iterdir() if p.name.startswith(("mitmproxy-", "llmtap-"))]
    opened = [p for p in [path, *ours] if tighten(p)]
    if opened:
        log.warning("%s held files readable by others (%s); they are now private to you",
                    path, ", ".join(p.name for p in opened))
    return path


def private_record(db: Path) -> None:
    """Close the DB and the files beside it that hold its traffic (WAL, spool, DuckDB's temp
    folder) if an older llmtap or a looser umask left them open; says so once."""
    beside = [db, db.with_name(db.name + ".wal"), db.with_name(db.name + ".spool.jsonl"),
              db.with_name(db.name + ".tmp")]
    opened = [p for p in beside if tighten(p)]
    if db.parent == data_dir():
        tighten(db.parent)  # llmtap's own folder; a folder given with --db is the user's choice
    if opened:
        log.warning("%s were readable by others; they are now private to you",
                    ", ".join(str(p) for p in opened))


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def config_dir() -> Path:
    """Holds rules.yaml when the working directory has none."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "llmtap"
    return _xdg("XDG_CONFIG_HOME", ".config") / "llmtap"


def data_dir() -> Path:
    """Holds the DuckDB file and the spool."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "llmtap"
    return _xdg("XDG_DATA_HOME", ".local/share") / "llmtap"


def default_db() -> Path:
    return data_dir() / "llmtap.duckdb"


def default_confdir() -> Path:
    """mitmproxy's CA lives here (mitmproxy-ca-cert.pem)."""
    return config_dir() / "ca"


def default_rules() -> Path:
    """rules.yaml in the working directory if present, else the one in the config dir."""
    local = Path.cwd() / "rules.yaml"
    return local if local.is_file() else config_dir() / "rules.yaml"


def state_dir() -> Path:
    """Holds what llmtap keeps between runs that is neither config nor record (`llmtap sql`'s
    prompt history): XDG_STATE_HOME on Linux."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "llmtap"
    return _xdg("XDG_STATE_HOME", ".local/state") / "llmtap"


def default_prices() -> Path:
    """The genai-prices table `llmtap prices update` saved; without it, the one genai-prices ships."""
    return data_dir() / "genai-prices.json"
