"""docs/commands.md, generated from the parser (whose settings come from the dataclasses):
`python -m megatron_minitron.reference > docs/commands.md`. A test keeps the file current."""

from __future__ import annotations

import argparse

from megatron_minitron.cli import build_parser

HEADER = """# Commands and options

Generated from the code (`python -m megatron_minitron.reference > docs/commands.md`); every
setting is one dataclass field, so the command line, the YAML sections of `minitron run` (same
names, with `_` for `-`) and this page agree. Parallelism flags take Megatron's names.
"""


def _flags(a: argparse.Action) -> str:
    if not a.option_strings:
        return f"`{a.dest.upper()}`"
    return ", ".join(f"`{f}`" for f in a.option_strings)


def _default(a: argparse.Action) -> str:
    if a.required or not a.option_strings:
        return "required"
    if a.default is None or isinstance(a.default, bool):
        return ""
    return f"`{' '.join(map(str, a.default)) if isinstance(a.default, list) else a.default}`"


def _help(a: argparse.Action) -> str:
    text = (a.help or "").replace("|", "\\|")
    if a.choices and a.option_strings and a.nargs != 0:
        text += f" (one of: {', '.join(map(str, a.choices))})"
    return text


def _table(actions: list[argparse.Action]) -> list[str]:
    rows = ["| argument | default | meaning |", "|---|---|---|"]
    return rows + [f"| {_flags(a)} | {_default(a)} | {_help(a)} |" for a in actions
                   if not isinstance(a, argparse._HelpAction)]


def commands_markdown() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = [HEADER]
    for verb, p in sub.choices.items():
        out += [f"## minitron {verb}", "", p.description or "", ""]
        for group in p._action_groups:
            actions = [a for a in group._group_actions
                       if not isinstance(a, argparse._HelpAction)]
            if actions:
                out += [f"**{group.title}**", "", *_table(actions), ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(commands_markdown(), end="")
