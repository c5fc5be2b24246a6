"""Subcommands of this area, registered on the `llmtap` parser."""

from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add this area's subcommands; each sets `func` to a callable(args) -> exit code."""
