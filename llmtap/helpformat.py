"""The help formatter every area's subcommands share."""

from __future__ import annotations

import argparse
import textwrap


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


def add_db_argument(parser: argparse.ArgumentParser) -> None:
    """`--db PATH`, as every command that reads the record takes it."""
    from pathlib import Path

    from llmtap import paths

    parser.add_argument("--db", type=Path, default=None, metavar="PATH",
                        help=f"the DuckDB file (default: {paths.default_db()})")
