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


def _problems(line: str, whole: bool) -> list[str]:
    """What is wrong with one quoted line: a file it names that does not exist, a flag its verb
    does not have, or (a whole command without placeholders) a command that does not parse."""
    out = [f"names {path}, which does not exist" for path in _FILE.findall(line)
           if not (ROOT / path).exists()]
    m = _LAUNCH.search(line)
    if not (m and m.group(1) in _verbs()):
        return out
    verb, rest = m.group(1), m.group(2)
    sub = _verbs()[verb]
    flags = re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest)
    unknown = [f for f in flags if f not in sub._option_string_actions]
    if unknown:
        out.append(f"`minitron {verb}` has no {unknown}")
    if whole and not unknown and not re.search(r"[\[\]|]|\.\.|\b[A-Z][A-Z_]{2,}\b", rest):
        try:
            build_parser().parse_args([verb, *shlex.split(rest)])
        except SystemExit:
            out.append(f"`minitron {verb}{rest}` does not parse")
    return out


def _verbs() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "verb").choices


def _documents() -> list[str]:
    return sorted({where for where, _, _ in _quoted_lines()})


def test_every_document_quotes_commands():
    assert {"README.md", "demo.yaml", "llama31-8b-to-4b-width.yaml"} <= set(_documents())


@pytest.mark.parametrize("where", _documents())
def test_commands_and_files_a_document_quotes_are_real(where):
    """One test per document (README, each docs/ page, each config's comments)."""
    lines = [(line, whole) for w, line, whole in _quoted_lines() if w == where]
    assert any(_FILE.search(line) or _LAUNCH.search(line) for line, _ in lines), where
    problems = [f"{p}: {line}" for line, whole in lines for p in _problems(line, whole)]
    assert not problems, f"{where}:\n" + "\n".join(problems)
