"""Every command the README and the configs tell users to run names files that exist, a verb that
exists and flags that verb accepts; concrete ones (no placeholders) parse completely."""

from __future__ import annotations

import re
import shlex

import pytest

from megatron_minitron.cli import build_parser
from tests.conftest import ROOT

# `minitron VERB`, `slurm/minitron.sbatch VERB`, `scripts/torchrun.sh VERB`, `-m ...cli VERB`
_LAUNCH = re.compile(r"(?:^|\s)(?:minitron|\S*minitron\.sbatch|\S*torchrun\.sh|-m "
                     r"megatron_minitron(?:\.cli)?)\s+([a-z]+)(.*)")
_FILE = re.compile(r"(?<![\w/])((?:slurm|scripts|configs|benchmarks|tests)/[\w.-]+)")


def _quoted_lines() -> list[tuple[str, str, bool]]:
    """(where, line, whole command?) for code blocks and inline code (often a command's start
    only: its flags are checked, not its completeness) of README.md and the docs/ pages (not the
    generated docs/commands.md), and the configs' comments."""
    out = []
    pages = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md")
                                          if p.name != "commands.md")
    for page in pages:
        where = page.relative_to(ROOT).as_posix()
        in_block = False
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                in_block = not in_block
            elif in_block:
                out.append((where, line.split(" # ")[0].strip(), True))
            else:
                out += [(where, span, False) for span in re.findall(r"`([^`]+)`", line)]
    for cfg in sorted((ROOT / "configs").glob("*.yaml")):
        out += [(cfg.name, line.lstrip("# ").split("  (")[0].strip(), True)
                for line in cfg.read_text().splitlines() if line.startswith("#")]
    return out


def _commands():
    found = []
    for where, line, whole in _quoted_lines():
        for path in _FILE.findall(line):
            found.append(pytest.param(where, line, path, None, whole, id=f"{where}:{path}"))
        m = _LAUNCH.search(line)
        if m and m.group(1) in _verbs():
            found.append(pytest.param(where, line, None, m, whole, id=f"{where}:{line[:40]}"))
    return found


def _verbs() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "verb").choices


def test_commands_were_found():
    kinds = {p.values[0] for p in _commands()}
    assert {"README.md", "demo.yaml", "llama31-8b-to-4b-width.yaml"} <= kinds


@pytest.mark.parametrize(("where", "line", "path", "match", "whole"), _commands())
def test_quoted_command(where, line, path, match, whole):
    if path is not None:
        assert (ROOT / path).exists(), f"{where} names {path}, which does not exist: {line}"
        return
    verb, rest = match.group(1), match.group(2)
    sub = _verbs()[verb]
    flags = re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest)
    unknown = [f for f in flags if f not in sub._option_string_actions]
    assert not unknown, f"{where}: `minitron {verb}` has no {unknown}: {line}"
    concrete = whole and not re.search(r"[\[\]|]|\.\.|\b[A-Z][A-Z_]{2,}\b", rest)
    if concrete:
        try:
            build_parser().parse_args([verb, *shlex.split(rest)])
        except SystemExit:
            pytest.fail(f"{where}: `minitron {verb}{rest}` does not parse")
