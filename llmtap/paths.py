"""Where llmtap keeps its files by default (XDG on Linux, the platform's own elsewhere)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


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
