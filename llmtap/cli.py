"""The `llmtap` command. Each area registers its own subcommands so this file stays a router."""

from __future__ import annotations

import argparse
import sys

from llmtap import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmtap",
        description=(
            "A transparent proxy for LLM APIs: routes model names by rules.yaml with fallbacks "
            "and records every exchange (request, response, reasoning, tool calls, tokens, "
            "timings) into one DuckDB file."
        ),
        epilog="Run `llmtap COMMAND --help` for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"llmtap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Imported here so `llmtap --help` stays fast and a broken area names itself.
    from llmtap.addons import commands as proxy_commands
    from llmtap.recorder import commands as recorder_commands
    from llmtap.tui import commands as tui_commands

    proxy_commands.register(sub)
    recorder_commands.register(sub)
    tui_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "wrap":  # the command `wrap` runs keeps the user's own umask
        from llmtap.paths import private_umask

        private_umask()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
