"""Every setting is declared once, as a dataclass field made by `option()`. The command line,
the YAML sections of `minitron run`, the commands `minitron run` builds and prints, and
docs/commands.md are derived from those fields (torchtitan's job_config is the model).

A field's type decides its flag: `bool` is a switch (`--no-NAME` when it defaults to on, `--NAME`
/ `--no-NAME` when it may be None), `tuple[...]`/`list[...]` takes one or more values, anything
else takes one value of its type. Help text and defaults live on the field, nowhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

MISSING = dataclasses.MISSING


def option(default: Any = MISSING, *, help: str, flag: str | None = None,
           short: str | None = None, choices: tuple | None = None,
           factory: Callable[[], Any] | None = None, parse: Callable[[str], Any] | None = None,
           render: Callable[[Any], str] | None = None, choice_flags: bool = False,
           metavar: str | None = None, skip: tuple[str, ...] = (),
           aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field carrying its command-line face. `flag` defaults to --field-name;
    `short` is an alias (--tp) that command lines are written with; `aliases` are accepted too
    (Megatron's names where ours differ); `parse`/`render` read and write a value given as one
    string (e.g. a comma list); `choice_flags` makes each choice a flag of its own (--bf16). A field
    that is itself a settings dataclass contributes its options (but `skip`), with the defaults
    of this field's default instance: search's KD is a DistillConfig."""
    meta = {"help": help, "flag": flag, "short": short, "choices": choices, "parse": parse,
            "render": render, "choice_flags": choice_flags, "metavar": metavar, "skip": skip,
            "aliases": aliases}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"option": meta})
    return dataclasses.field(default=default, metadata={"option": meta})


def options(cls) -> list[tuple[dataclasses.Field, dict, Any]]:
    """(field, its option metadata, its type) for every option of a dataclass, in order."""
    hints = typing.get_type_hints(cls)
    return [(f, f.metadata["option"], hints[f.name]) for f in dataclasses.fields(cls)
            if "option" in f.metadata]


def flag_of(f: dataclasses.Field, meta: dict) -> str:
    return meta["flag"] or "--" + f.name.replace("_", "-")


def default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def _base(tp) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _is_sequence(tp) -> bool:
    return typing.get_origin(tp) in (list, tuple)


def _fields(cls, base=None, skip=()) -> list[tuple[dataclasses.Field, dict, Any, Any]]:
    """(field, metadata, type, default) of the options of `cls`, the defaults taken from the
    instance `base` when given (a nested settings dataclass)."""
    return [(f, meta, tp, default_of(f) if base is None else getattr(base, f.name))
            for f, meta, tp in options(cls) if f.name not in skip]


def _nested(tp) -> bool:
    return dataclasses.is_dataclass(_base(tp)[0])


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where there is one worth reading (not None, not a switch's)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or action.required:
            return action.help
        return super()._get_help_string(action)


def add_options(parser, cls, title: str | None = None, base=None, skip=()) -> None:
    """The flags of dataclass `cls` on `parser` (in an argument group when `title` is given)."""
    group = parser.add_argument_group(title) if title else parser
    for f, meta, tp, default in _fields(cls, base, skip):
        if _nested(tp):
            add_options(parser, tp, f"{title or cls.__name__}: {meta['help']}", default,
                        meta["skip"])
            continue
        base_tp, _ = _base(tp)
        flags = [flag_of(f, meta), *([meta["short"]] if meta["short"] else []), *meta["aliases"]]
        kw: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if meta["choice_flags"]:
            ex = group.add_mutually_exclusive_group()
            first = meta["choices"][0]
            for c in meta["choices"]:
                ex.add_argument(f"--{c}", dest=f.name, action="store_const", const=c,
                                help=f"{c} {meta['help']}" if c == first else
                                f"{c} (see --{first})")
            parser.set_defaults(**{f.name: default})
            continue
        if base_tp is bool:
            if default is None:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["action"] = "store_false" if default else "store_true"
            group.add_argument(*flags, default=default, **kw)
            continue
        if meta["parse"]:
            kw["type"] = meta["parse"]
        elif _is_sequence(base_tp):
            kw["nargs"] = "+"
            kw["type"] = typing.get_args(base_tp)[0]
        else:
            kw["type"] = base_tp
        if meta["choices"]:
            kw["choices"] = meta["choices"]
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        if default is MISSING:
            kw["required"] = True
        else:
            kw["default"] = list(default) if isinstance(default, tuple) else default
        group.add_argument(*flags, **kw)


def from_args(cls, ns: argparse.Namespace, base=None, skip=(), **extra):
    """The dataclass `cls` from parsed arguments (its options) and `extra` fields; fields not
    on the command line (`skip`) from the instance `base`."""
    values = {}
    for f, meta, tp, default in _fields(cls, base, skip):
        if _nested(tp):
            values[f.name] = from_args(tp, ns, default, meta["skip"])
            continue
        v = getattr(ns, f.name)
        if v is not None and typing.get_origin(_base(tp)[0]) is tuple:
            v = tuple(v)
        values[f.name] = v
    if base is not None:
        return dataclasses.replace(base, **values, **extra)
    return cls(**values, **extra)


def to_argv(obj, cls=None, base=None, skip=()) -> list[str]:
    """The flags that give `obj` from the defaults of `cls` (default: its own class), the
    dataclass of the command that will parse them: what a user would type."""
    out: list[str] = []
    for f, meta, tp, default in _fields(cls or type(obj), base, skip):
        v = getattr(obj, f.name)
        if _nested(tp):
            out += to_argv(v, tp, default, meta["skip"])
            continue
        if v == default or (isinstance(v, tuple | list) and list(v) == list(default or [])):
            continue
        flag = meta["short"] or flag_of(f, meta)
        base_tp, _ = _base(tp)
        if meta["choice_flags"]:
            out.append(f"--{v}")
        elif base_tp is bool:
            out.append(flag if v else ("--no-" + flag[2:] if default is None else flag))
        elif v is None:
            raise ValueError(f"{f.name}: None cannot be given on the command line")
        elif meta["render"]:
            out += [flag, meta["render"](v)]
        elif _is_sequence(base_tp):
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out


SIZE_SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_size(text: str) -> float:
    """A parameter budget as people write it: a count (`95M`, `4.5B`, `95e6`, `134515008`) or a
    fraction of the model (`0.7`, `70%`). Fractions come back as values in (0, 1], counts as
    values above 1; `fraction_of` resolves either."""
    t = str(text).strip().upper().replace("_", "").replace(",", "")
    try:
        if t.endswith("%"):
            value = float(t[:-1]) / 100
        elif t[-1:] in SIZE_SUFFIXES:
            value = float(t[:-1]) * SIZE_SUFFIXES[t[-1]]
        else:
            value = float(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a parameter count (95M, 4.5B, 95e6) or a fraction "
                         "(0.7, 70%)") from None
    if not value > 0:
        raise ValueError(f"{text!r}: a parameter budget must be positive")
    return value


BYTE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """A file size as transformers' `max_shard_size` takes it: `5GB`, `500MB`, `2GiB`, bytes."""
    t = str(text).strip().upper()
    number = t.rstrip("KMGTIB")
    try:
        value = int(float(number) * BYTE_UNITS[t[len(number):] or "B"])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (5GB, 500MB, 2GiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be positive")
    return value


def fraction_of(size: float, total: int) -> float:
    """A `parse_size` value as a count: fractions (<= 1) of `total`, counts as they are."""
    return size * total if size <= 1 else size
