"""Every setting is one dataclass field: the command line, the YAML of `minitron run`, the
commands the pipeline builds and docs/commands.md all come from it. These checks fail when a
field is unreachable from one of them, or when two of them disagree on a default or a type."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from megatron_minitron.cli import build_parser
from megatron_minitron.config import ParallelConfig
from megatron_minitron.distill.train import DistillConfig
from megatron_minitron.evaluate.suite import EvalConfig
from megatron_minitron.importance.run import ImportanceConfig
from megatron_minitron.options import _base, default_of, from_args, options, to_argv
from megatron_minitron.pipeline.config import RunConfig, from_dict
from megatron_minitron.prune.plan import PruneTarget
from megatron_minitron.search.run import SearchConfig
from tests.conftest import ROOT, tiny_run_config

# verb -> (its settings dataclass, the arguments it requires besides them, YAML section)
VERBS = {
    "importance": (ImportanceConfig, ["--load", "C", "--out", "S"], "importance"),
    "prune": (PruneTarget, ["--load", "C", "--out", "O"], "prune"),
    "distill": (DistillConfig, ["--teacher", "T", "--student", "S", "--data", "D", "--save", "R",
                                "--train-iters", "3"], "distill"),
    "search": (SearchConfig, ["--load", "C", "--scores", "S", "--data", "D", "--valid-data", "V",
                              "--out", "O"], "search"),
    "eval": (EvalConfig, ["--load", "C"], "eval"),
}


def _parse(verb: str, *args: str):
    return build_parser().parse_args([verb, *VERBS[verb][1], *args])


def _leaves(cls, obj):
    """(setter, field, metadata, type, value) of every command-line field of `obj`, those of a
    nested settings dataclass (search's KD) included."""
    for f, meta, tp in options(cls):
        if dataclasses.is_dataclass(tp):
            for g, gmeta, gtp in options(tp):
                if g.name not in meta["skip"]:
                    def put(o, v, f=f, g=g):
                        return dataclasses.replace(o, **{f.name: dataclasses.replace(
                            getattr(o, f.name), **{g.name: v})})
                    yield put, g, gmeta, gtp, getattr(getattr(obj, f.name), g.name)
        else:
            yield (lambda o, v, f=f: dataclasses.replace(o, **{f.name: v})), f, meta, tp, \
                getattr(obj, f.name)


def _other(f: dataclasses.Field, meta: dict, tp, default):
    """A valid value of the field's type other than `default`."""
    base, _ = _base(tp)
    if meta["choices"]:
        pick = [c for c in meta["choices"] if c != default and
                not (isinstance(default, tuple) and (c,) == default)]
        return (pick[0],) if typing.get_origin(base) is tuple else pick[0]
    if base is bool:
        return not default if default is not None else True
    if base is int:
        return (default or 0) + 3
    if base is float:
        return (default or 0) + 0.25
    if base is str:
        return "90,5,5"
    if typing.get_origin(base) in (list, tuple):
        return typing.get_origin(base)(map(typing.get_args(base)[0], [2, 3]))
    raise AssertionError(f"no test value for {f.name}: {tp}")


@pytest.mark.parametrize("verb", VERBS)
def test_cli_and_yaml_defaults_are_the_dataclass_defaults(verb):
    cls, _, section = VERBS[verb]
    assert [f.name for f in dataclasses.fields(cls)] == [f.name for f, _, _ in options(cls)]
    from_cli = from_args(cls, _parse(verb))
    required = {k: v for k, v in dataclasses.asdict(from_cli).items()
                if default_of(next(f for f in dataclasses.fields(cls) if f.name == k))
                is dataclasses.MISSING}
    assert from_cli == cls(**required)
    yaml_cls = type(getattr(RunConfig(), section))
    from_yaml = from_dict(yaml_cls, required, section)
    for f, _, _ in options(cls):  # YAML sections may only change what their stage needs
        if f.name not in ("train_iters", "kd_weight", "lm_weight", "target_params"):
            assert getattr(from_yaml, f.name) == getattr(from_cli, f.name), (section, f.name)
    assert from_args(ParallelConfig, _parse(verb)) == ParallelConfig()


@pytest.mark.parametrize("verb", VERBS)
def test_every_field_set_on_the_command_line_round_trips(verb):
    """Each field changed from its default: rendered to flags, parsed back, the same value."""
    cls, _, _ = VERBS[verb]
    base = from_args(cls, _parse(verb))
    for put, f, meta, tp, value in _leaves(cls, base):
        changed = put(base, _other(f, meta, tp, value))
        argv = to_argv(changed)
        assert from_args(cls, _parse(verb, *argv)) == changed, (f.name, argv)
    par = ParallelConfig(tp=2, pp=2, vpp=2, sequence_parallel=True, precision="bf16")
    assert from_args(ParallelConfig, _parse(verb, *to_argv(par))) == par


def test_pipeline_commands_parse_back_to_the_yaml_sections(tiny_llama_hf, tmp_path):
    """What `minitron run` executes for a YAML config (stage functions called with the config's
    dataclasses) is what the command lines it prints (--dry-run) give when typed."""
    from megatron_minitron.commands import VERBS, arguments, canonical
    from megatron_minitron.pipeline.run import build_stages

    raw = tiny_run_config(tmp_path, tiny_llama_hf,
                          importance={"block_sizes": [1, 2], "micro_batch_size": 2},
                          prune={"drop_layers": [1], "norm_rescale": False, "hidden": None},
                          distill={"top_k": 8, "distributed_optimizer": False},
                          eval={"micro_batch_size": 3, "num_fewshot": 1},
                          parallel={"tp": 2, "sequence_parallel": True, "precision": "fp32"},
                          correction={"train_iters": 2})
    cfg = from_dict(RunConfig, raw)
    stages = build_stages(cfg)
    assert {"convert", "data-train", "correction", "importance", "prune", "distill",
            "eval-original", "eval-pruned", "export"} <= {s.name for s in stages}
    for stage in stages:
        parsed = build_parser().parse_args(stage.command)
        assert canonical(arguments(VERBS[stage.verb], parsed)) == canonical(stage.args), \
            (stage.name, stage.command)
    by_name = {s.name: s.args for s in stages}
    assert by_name["prune"]["settings"] == cfg.prune
    assert by_name["eval-pruned"]["settings"] == cfg.eval
    assert by_name["distill"]["parallel"] == cfg.parallel


def test_commands_page_is_generated_from_the_code():
    from megatron_minitron.reference import commands_markdown

    page = (ROOT / "docs" / "commands.md").read_text()
    assert page == commands_markdown(), \
        "docs/commands.md is stale: python -m megatron_minitron.reference > docs/commands.md"
    for cls, _, _ in VERBS.values():
        for _, f, meta, _, _ in _leaves(cls, from_args(cls, _parse(next(
                v for v, spec in VERBS.items() if spec[0] is cls)))):
            assert (meta["flag"] or "--" + f.name.replace("_", "-")) in page, f.name
