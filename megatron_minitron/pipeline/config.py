"""`minitron run` configuration: one YAML file, one plain dataclass per section.

Sections reuse the dataclasses of the stages they drive (ImportanceConfig, PruneTarget,
DistillConfig, ParallelConfig), so a field means the same in YAML as on the command line. Parsing
is strict: an unknown key fails before any work, naming its path (`prune.hiden`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_minitron.config import ConfigError, ModelConfig, ParallelConfig
from megatron_minitron.distill.train import DistillConfig
from megatron_minitron.evaluate.suite import EvalConfig
from megatron_minitron.importance.run import ImportanceConfig
from megatron_minitron.options import default_of
from megatron_minitron.prune.plan import PruneTarget
from megatron_minitron.search.run import SearchConfig

BUILTIN = "builtin:"  # builtin:smollm2, builtin:shakespeare-train, builtin:shakespeare-valid


@dataclass
class TeacherSection:
    source: str = "builtin:smollm2"  # HF dir, .gguf file, minitron checkpoint or builtin:smollm2
    # The teacher's shape, for planning a run (--dry-run) where the checkpoint is not at hand.
    shape: dict | None = None


@dataclass
class DataSection:
    # Text or JSONL files or Megatron indexed-dataset prefixes; builtin:shakespeare-train|-valid.
    train: list[str] = field(default_factory=lambda: ["builtin:shakespeare-train"])
    valid: list[str] = field(default_factory=lambda: ["builtin:shakespeare-valid"])
    json_key: str = "text"


@dataclass
class CorrectionSection(DistillConfig):
    """Teacher correction (2408.11796): the teacher fine-tuned on the distillation data first
    (plain cross-entropy). 0 iterations: off."""

    train_iters: int = 0
    kd_weight: float = 0.0
    lm_weight: float = 1.0


@dataclass
class SearchSection(SearchConfig):
    """Candidate search instead of a fixed prune target: the winner (after its short KD) is
    the student distillation continues from. No target (the default): no search, the prune
    section decides."""


@dataclass
class ExportSection:
    hf: bool = True  # also write the distilled model as a Hugging Face directory


@dataclass
class RunConfig:
    name: str = "run"
    run_dir: str | None = None  # default: runs/<name>
    teacher: TeacherSection = field(default_factory=TeacherSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    correction: CorrectionSection = field(default_factory=CorrectionSection)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    prune: PruneTarget = field(default_factory=PruneTarget)
    search: SearchSection = field(default_factory=SearchSection)
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(train_iters=100))
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportSection = field(default_factory=ExportSection)
    # Published parameter count of the target model, if any: --dry-run reports the difference.
    expected_params: float | None = None

    @property
    def directory(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    def teacher_shape(self) -> ModelConfig | None:
        if self.teacher.shape is None:
            return None
        try:
            return ModelConfig.from_dict(dict(self.teacher.shape))
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"teacher.shape: {e}") from None


def _convert(value, tp, where: str, default=None):
    """`value` as the annotated type `tp` (YAML gives lists for tuples, ints for floats); a
    section starts from the field's `default` instance."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(value, next(a for a in args if a is not type(None)), where, default)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, default if dataclasses.is_dataclass(default) else None)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return origin(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float:  # PyYAML reads 1e9 (no dot, no sign) as a string: take it as a number
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp in (int, str, bool) and not (isinstance(value, tp) and
                                       (tp is bool or not isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is dict and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def from_dict(cls, d, where: str = "", base=None):
    """A `cls` from a mapping, refusing unknown keys and wrong types with the key's path; what
    the mapping leaves out comes from `base` (the section's default) or the class defaults."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"{path}: unknown key (known: {', '.join(sorted(fields))})")
        parse = fields[key].metadata.get("option", {}).get("parse")
        if isinstance(value, str) and parse is not None:  # e.g. a budget written "95M" or "70%"
            try:
                value = parse(value)
            except ValueError as e:
                raise ConfigError(f"{path}: {e}") from None
        kwargs[key] = _convert(value, hints[key], path, default_of(fields[key]))
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    for name, f in fields.items():
        if name not in kwargs and f.default is f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name}: required")
    return cls(**kwargs)


def load_config(path: Path) -> RunConfig:
    if not path.is_file():
        raise ConfigError(f"config {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    raw.setdefault("name", path.stem)
    return from_dict(RunConfig, raw)
