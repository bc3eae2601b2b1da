#!/usr/bin/env python3
"""docs/options.md, written from the commands' own argparse parsers so that it cannot drift.

    python tools/option_tables.py           rewrite docs/options.md
    python tools/option_tables.py --check   exit 1, saying so, when docs/options.md differs

The commands are the dispatcher's (commands/cli.py: the main command, COMMANDS and
PROGRAMS), so a new command gets its table without an edit here. tests/test_docs.py runs
the check.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

from dllama_mpi.commands import cli

REPO = Path(__file__).resolve().parents[1]
OPTIONS_MD = REPO / "docs" / "options.md"
STALE = f"{OPTIONS_MD.relative_to(REPO)} differs from the parsers: run python tools/option_tables.py"


def parsers() -> Iterator[argparse.ArgumentParser]:
    """Every command's parser, in the order `python -m dllama_mpi --help` lists them."""
    yield cli.build_parser()
    for command in cli.COMMANDS:
        yield cli.build_parser(command)
    for module, _ in cli.PROGRAMS.values():
        yield importlib.import_module(module).build_parser()


def _cell(text: str) -> str:
    """Text inside a markdown table cell: a `|` would end the cell, a `*` start emphasis."""
    return " ".join(text.split()).replace("|", "\\|").replace("*", "\\*")


def _args(action: argparse.Action) -> str:
    """An argument's values as --help writes them (`B [B ...]`, `{f32,q80}`, `[output]`); empty for a flag."""
    if action.nargs == 0:
        return ""
    return argparse.HelpFormatter("")._format_args(action, action.dest.upper() if action.option_strings else action.dest)


def _exclusions(parser: argparse.ArgumentParser) -> dict[argparse.Action, list[argparse.Action]]:
    """For each option in a mutually exclusive group, the others of its group."""
    others: dict[argparse.Action, list[argparse.Action]] = {}
    for group in parser._mutually_exclusive_groups:
        for action in group._group_actions:
            others[action] = [a for a in group._group_actions if a is not action]
    return others


def table(parser: argparse.ArgumentParser) -> str:
    """One command's section: its description, then a row per argument (help left out)."""
    formatter = parser._get_formatter()  # the one --help uses: %(default)s expanded the same way
    exclusive = _exclusions(parser)
    lines = [f"## `{parser.prog}`", "", " ".join(parser.description.split()), ""]
    if parser.epilog:
        lines += [" ".join(parser.epilog.split()), ""]
    lines += ["| argument | takes | meaning |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        meaning = formatter._expand_help(action) if action.help else ""
        if action.required and action.option_strings:
            meaning += "; required"
        if action in exclusive:
            meaning += "; not with " + ", ".join(a.option_strings[0] for a in exclusive[action])
        if action.option_strings:
            name, value = ", ".join(action.option_strings), _args(action)
        else:  # a positional argument: its name is what it takes
            name, value = _args(action), ""
        lines.append(f"| `{name}` | {f'`{value}`' if value else ''} | {_cell(meaning)} |")
    return "\n".join(lines)


def render() -> str:
    sections = "\n\n".join(table(p) for p in parsers())
    return ("# Options of every command\n\n"
            "<!-- Written by tools/option_tables.py from the commands' parsers; edit the parsers, then run it. -->\n\n"
            "Generated from the argparse parsers themselves (`python tools/option_tables.py`; CI fails when this "
            "page and the parsers differ). Every command also takes `-h` / `--help`, which prints the same. "
            "What the options do together is in [usage.md](usage.md).\n\n"
            f"{sections}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--check", action="store_true", help=f"only compare with {OPTIONS_MD.relative_to(REPO)}")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = OPTIONS_MD.read_text() if OPTIONS_MD.exists() else ""
        if current != text:
            print(STALE, file=sys.stderr)
            return 1
        return 0
    OPTIONS_MD.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
