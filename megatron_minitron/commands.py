"""The verbs of `minitron` as a table: each is a stage function, its settings dataclass and its
own inputs and outputs. The parser is built from the table, a parsed command becomes the
function's arguments (`arguments`), and a function's arguments become the command a user would
type (`command_line`, what `minitron run --dry-run` prints)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_minitron import stages
from megatron_minitron.checkpoint.hf_io import SHARD_BYTES
from megatron_minitron.checkpoint.mcore import FORMATS
from megatron_minitron.config import ParallelConfig
from megatron_minitron.distill.train import DistillConfig
from megatron_minitron.evaluate.suite import EvalConfig
from megatron_minitron.importance.run import ImportanceConfig
from megatron_minitron.options import (
    HelpFormatter,
    add_options,
    from_args,
    parse_bytes,
    to_argv,
)
from megatron_minitron.prune.plan import PruneTarget
from megatron_minitron.search.run import SearchConfig, search


@dataclass(frozen=True)
class Arg:
    """One of a verb's own arguments: argparse's flags and keywords. Its `dest` is the name of
    the stage function's parameter."""

    flags: tuple[str, ...]
    kw: dict

    @property
    def dest(self) -> str:
        return self.kw.get("dest") or self.flags[0].lstrip("-").replace("-", "_")


def arg(*flags: str, **kw) -> Arg:
    return Arg(flags, kw)


JSON_OUT = arg("--json", dest="json_out", type=Path, metavar="FILE",
               help="also write what the command reports (shapes, counts, choices) as JSON")


@dataclass(frozen=True)
class Verb:
    func: Callable
    help: str
    args: tuple[Arg, ...] = ()
    settings: type | None = None  # the settings dataclass, passed as `settings`
    parallel: bool = True  # takes ParallelConfig's flags, passed as `parallel`


CKPT = arg("--load", type=Path, required=True, help="checkpoint")
DATA_HELP = "indexed-dataset prefixes, optionally weighted: W1 PREFIX1 W2 PREFIX2"

VERBS: dict[str, Verb] = {
    "convert": Verb(stages.convert, "HF dir / GGUF / Megatron checkpoint -> mcore, Megatron-LM "
                                    "or HF", (
        arg("src", type=Path, help="HF directory, .gguf file, minitron checkpoint or Megatron-LM "
                                   "save directory (its latest iteration) or iter_* directory"),
        arg("dst", type=Path, help="new directory"),
        arg("--to", choices=("mcore", "megatron-lm", "megatron-bridge", "hf"), default="mcore",
            help="write a minitron (Megatron dist) checkpoint, a Megatron-LM save directory "
                 "(release/, loads with pretrain_gpt.py --load DST), a Megatron-Bridge one "
                 "(iter_0000000/ with run_config.yaml) or a HF directory"),
        arg("--tokenizer", type=Path, help="tokenizer file or directory to carry along, for a "
                                           "Megatron-LM source whose args name none on this "
                                           "machine"),
        arg("--max-shard-size", type=parse_bytes, default=SHARD_BYTES, metavar="SIZE",
            help="largest safetensors file of a HF export (5GB, 500MB, 2GiB), as transformers' "
                 "max_shard_size"), JSON_OUT)),
    "eval": Verb(stages.evaluate, "perplexity, cloze and multiple-choice tasks", (
        CKPT,
        arg("--data", type=Path, nargs="*", help="perplexity text files (default: held-out "
                                                  "plays)"),
        arg("--out", type=Path, help="write the result as JSON here")), EvalConfig),
    "preprocess": Verb(stages.preprocess, "text / JSONL -> Megatron indexed dataset (.bin/.idx)", (
        arg("--input", type=Path, nargs="+", required=True, help="text or JSONL files"),
        arg("--tokenizer", type=Path, required=True,
            help="tokenizer file, a directory holding one, or a checkpoint"),
        arg("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx"),
        arg("--json-key", default="text", help="text field of JSONL documents")),
        parallel=False),
    "importance": Verb(stages.importance, "activation importance of every prunable axis", (
        CKPT,
        arg("--data", type=Path, nargs="*", help="text, .jsonl files or indexed-dataset "
                                                  "prefixes (default: the Shakespeare training "
                                                  "plays)"),
        arg("--json-key", default="text", help="text field of JSONL documents"),
        arg("--out", type=Path, required=True, help="scores file (.safetensors)"), JSON_OUT),
        ImportanceConfig),
    "prune": Verb(stages.prune, "prune to a target shape; writes a new checkpoint", (
        CKPT,
        arg("--scores", type=Path, help="importance scores of --load (not needed for "
                                        "--drop-layers)"),
        arg("--out", type=Path, required=True, help="new checkpoint directory"),
        arg("--hf-out", type=Path, help="also export the pruned model as a Hugging Face "
                                        "directory"),
        arg("--out-format", choices=FORMATS, default="minitron",
            help="--out as a minitron checkpoint, a Megatron-LM or a Megatron-Bridge save "
                 "directory"),
        arg("--dry-run", action="store_true", default=False,
            help="print the plan (shape, parameters, dropped layers, how they were chosen); "
                 "write nothing"),
        JSON_OUT), PruneTarget),
    "distill": Verb(stages.distill, "knowledge-distillation retraining of a student", (
        arg("--teacher", type=Path, required=True, help="teacher checkpoint (frozen)"),
        arg("--student", type=Path, required=True, help="student checkpoint (e.g. pruned)"),
        arg("--data", "--data-path", nargs="+", required=True, help=DATA_HELP),
        arg("--valid-data", "--valid-data-path", nargs="+",
            help="validation prefixes (default: --split)"),
        arg("--save", type=Path, required=True, help="run directory (resumes from its latest)")),
        DistillConfig),
    "search": Verb(search, "candidate shapes at a parameter budget, each pruned and briefly "
                           "distilled, ranked", (
        arg("--load", type=Path, required=True, help="the teacher checkpoint"),
        arg("--scores", type=Path, required=True, help="its importance scores"),
        arg("--data", "--data-path", nargs="+", required=True, help=DATA_HELP),
        arg("--valid-data", "--valid-data-path", nargs="+", required=True,
            help="validation prefixes"),
        arg("--out", type=Path, required=True, help="search directory (resumes)")),
        SearchConfig),
    "generate": Verb(stages.generate, "greedy continuation of a prompt", (
        CKPT,
        arg("--prompt", required=True, help="text to continue"),
        arg("--max-new-tokens", type=int, default=32, help="tokens generated"))),
}

PARALLEL_TITLE = "parallelism and precision (Megatron names; --tp/--pp/--vpp short forms)"


def add_verbs(sub) -> None:
    """A subparser per verb: its own arguments, then its settings' and ParallelConfig's flags,
    made from their fields."""
    for name, verb in VERBS.items():
        p = sub.add_parser(name, help=verb.help, description=verb.help,
                           formatter_class=HelpFormatter)
        p.set_defaults(call=lambda ns, verb=verb: verb.func(**arguments(verb, ns)))
        for a in verb.args:
            p.add_argument(*a.flags, **a.kw)
        if verb.settings is not None:
            add_options(p, verb.settings, f"{name} settings")
        if verb.parallel:
            add_options(p, ParallelConfig, PARALLEL_TITLE)


def arguments(verb: Verb, ns: argparse.Namespace) -> dict[str, Any]:
    """The stage function's keyword arguments from a parsed command."""
    kwargs = {a.dest: getattr(ns, a.dest) for a in verb.args}
    if verb.settings is not None:
        kwargs["settings"] = from_args(verb.settings, ns)
    if verb.parallel:
        kwargs["parallel"] = from_args(ParallelConfig, ns)
    return kwargs


def complete(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with the verb's defaults for what it leaves out: what parsing its command line
    gives."""
    verb = VERBS[name]
    full = {a.dest: a.kw.get("default") for a in verb.args}
    if verb.parallel:
        full["parallel"] = ParallelConfig()
    return full | kwargs


def command_line(name: str, kwargs: dict[str, Any]) -> list[str]:
    """`minitron NAME ...` that parses to `kwargs` (the inverse of `arguments`)."""
    verb = VERBS[name]
    unknown = set(kwargs) - {a.dest for a in verb.args} - {"settings", "parallel"}
    if unknown:
        raise TypeError(f"{name}: no argument {', '.join(sorted(unknown))}")
    out = [name]
    for a in verb.args:
        v = kwargs.get(a.dest, a.kw.get("default"))
        if v is None or v == a.kw.get("default"):
            continue
        values = [str(x) for x in v] if isinstance(v, list | tuple) else [str(v)]
        out += values if not a.flags[0].startswith("-") else [a.flags[0], *values]
    if kwargs.get("settings") is not None:
        out += to_argv(kwargs["settings"], verb.settings)
    if kwargs.get("parallel") is not None:
        out += to_argv(kwargs["parallel"])
    return out


def run(name: str, kwargs: dict[str, Any]):
    return VERBS[name].func(**kwargs)


def canonical(value) -> Any:
    """JSON-able form of a stage's arguments (dataclasses as dicts, paths as strings): the key of
    a `minitron run` stage."""
    if dataclasses.is_dataclass(value):
        return {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return str(value) if isinstance(value, Path) else value
