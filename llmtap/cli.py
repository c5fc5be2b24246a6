"""The `llmtap` command. Each area registers its own subcommands so this file stays a router."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from llmtap import __version__


class HelpFormatter(argparse.HelpFormatter):
    """Wraps prose to the terminal and keeps indented lines (examples, tables) as written.

    argparse's default joins every line of an epilog into one paragraph, which scrambles
    examples; RawDescriptionHelpFormatter keeps them but leaves long prose unwrapped."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        prose: list[str] = []

        def flush() -> None:
            if prose:
                out.append(textwrap.fill(" ".join(prose), width, initial_indent=indent,
                                         subsequent_indent=indent, break_on_hyphens=False))
                prose.clear()

        for line in text.splitlines():
            if not line.strip():
                flush()
                out.append("")
            elif line[0].isspace():
                flush()
                out.append(indent + line)
            else:
                prose.append(line.strip())
        flush()
        return "\n".join(out)


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
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here rather than in the interpreter's exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `llmtap stats --json | head`: the reader has all it wanted. As Python's docs advise,
        # point stdout at devnull so the exit's own flush cannot fail again, and end as a
        # program killed by SIGPIPE would (128 + 13), without a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
