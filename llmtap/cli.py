"""The `llmtap` command. Each area registers its own subcommands so this file stays a router."""

from __future__ import annotations

import argparse
import os
import sys

from llmtap import __version__

# A module of its own so the areas can use it without importing this router, which imports
# every area (the import contracts in pyproject.toml).
from llmtap.helpformat import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmtap",
        description=(
            "A transparent proxy for LLM APIs: routes model names by rules.yaml with fallbacks "
            "and records every exchange (request, response, reasoning, tool calls, tokens, "
            "timings) into one DuckDB file."
        ),
        epilog="Run `llmtap COMMAND --help` for the options of each command.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llmtap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Imported here so `llmtap --help` stays fast and a broken area names itself.
    from llmtap.addons import commands as proxy_commands
    from llmtap.compose import run_tui_with_proxy
    from llmtap.recorder import commands as recorder_commands
    from llmtap.tui import commands as tui_commands

    # The proxy and the UI never import each other; `run --tui` is wired together here.
    proxy_commands.register(sub, run_tui=run_tui_with_proxy)
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
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here rather than in the interpreter's exit
        return code
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        # DuckDB's bindings turn a Ctrl-C during a query on the main thread into this error
        # (imported here, not above: `llmtap run`'s process never loads DuckDB).
        from llmtap.recorder.endpoint import is_interrupted

        if is_interrupted(exc):
            return 130
        raise
    except BrokenPipeError:
        # `llmtap stats --json | head`: the reader has all it wanted. As Python's docs advise,
        # point stdout at devnull so the exit's own flush cannot fail again, and end as a
        # program killed by SIGPIPE would (128 + 13), without a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
