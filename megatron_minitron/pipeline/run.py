"""`minitron run CONFIG.yaml`: every stage of the method, one after another, each cached.

A stage is one stage function (stages.py, search.run.search) called with the config's own
dataclasses, in this process on every rank: exactly what a user typing the command that
`--dry-run` prints would get. A stage is skipped when its marker (.stages/NAME.json) holds the
same key: a hash of its arguments (canonical JSON of the dataclasses and paths), of the keys of
the stages it reads and of the size and time of the files it reads. A stage that did not finish
is started again from scratch, except distillation and search, which resume from what they
saved when their key is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_minitron.checkpoint.atomic import directory_lock, write_text
from megatron_minitron.checkpoint.mcore import is_mcore_dir
from megatron_minitron.commands import VERBS, canonical, command_line, complete, run
from megatron_minitron.config import ConfigError, ModelConfig, prefixed
from megatron_minitron.distill.train import iteration_dir
from megatron_minitron.pipeline.config import BUILTIN, RunConfig
from megatron_minitron.pipeline.report import PRUNE_RECORD
from megatron_minitron.runtime.distributed import barrier, is_main_rank, launch_env

log = logging.getLogger("minitron")
MARKERS = ".stages"


@dataclass
class Stage:
    name: str
    verb: str  # the minitron verb whose stage function runs it (commands.VERBS)
    args: dict  # that function's keyword arguments: paths and settings dataclasses
    output: Path
    reads: list[str] = field(default_factory=list)  # stages whose outputs it reads
    files: list[Path] = field(default_factory=list)  # outside files it reads
    resumable: bool = False
    make_dir: bool = False  # create `output` before the command (which writes into it)
    key: str = ""

    @property
    def command(self) -> list[str]:
        """The `minitron` command that does the same, as --dry-run prints it."""
        return command_line(self.verb, self.args)


def _builtin(entry: str) -> list[Path]:
    from megatron_minitron.data import demo

    assets = {"shakespeare-train": demo.train_plays, "shakespeare-valid": demo.held_out_plays,
              "smollm2": lambda: [demo.smollm2_gguf()],
              "gemma3-270m": lambda: [demo.gemma3_gguf()]}
    name = entry[len(BUILTIN):]
    if name not in assets:
        raise ConfigError(f"unknown built-in {entry!r} (known: "
                          f"{', '.join(BUILTIN + k for k in assets)})")
    return assets[name]()


TEXT_SUFFIXES = (".txt", ".md", ".json", ".jsonl")


def _split_data(entries: list[str], where: str, missing: list[str] | None
                ) -> tuple[list[Path], list[str]]:
    """(text/JSONL files, indexed-dataset prefixes). Every entry must exist, unless `missing`
    collects the absent ones (planning a run for another machine: a name ending in .txt, .md,
    .json or .jsonl counts as a text file, any other as a prefix)."""
    from megatron_minitron.data.calibration import indexed_prefix

    if not entries:
        raise ConfigError(f"{where}: no data given")
    files, prefixes = [], []
    for e in entries:
        if e.startswith(BUILTIN):
            files += _builtin(e)
        elif (prefix := indexed_prefix(Path(e))) is not None:
            prefixes.append(prefix)
        elif Path(e).is_file():
            files.append(Path(e))
        elif missing is not None:  # planned as what its name says it is
            missing.append(f"{where}: {e}")
            (files if Path(e).suffix in TEXT_SUFFIXES else prefixes).append(
                Path(e) if Path(e).suffix in TEXT_SUFFIXES else e)
        else:
            raise ConfigError(f"{where}: {e} is neither a file nor an indexed-dataset prefix")
    return files, prefixes


def teacher_source(cfg: RunConfig) -> Path:
    src = cfg.teacher.source
    return _builtin(src)[0] if src.startswith(BUILTIN) else Path(src)


def teacher_model(cfg: RunConfig, dry_run: bool) -> ModelConfig:
    """The teacher's shape: from its checkpoint/HF config/GGUF, or teacher.shape."""
    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.checkpoint.sources import detect_format, open_source

    shape = cfg.teacher_shape()
    src = teacher_source(cfg)
    if not src.exists():
        if dry_run and shape is not None:
            return shape
        raise ConfigError(f"teacher.source: {src} not found")
    fmt = detect_format(src)
    if fmt == "mcore":
        return mcore.read_meta(src).model
    return open_source(src, fmt).config  # headers only


class _Plan:
    """The stages of a run, built in the order they run; each step returns what later ones
    read (paths and the names of the stages that write them)."""

    def __init__(self, cfg: RunConfig, missing: list[str] | None):
        self.cfg, self.missing, self.d = cfg, missing, cfg.directory
        self.stages: list[Stage] = []

    def add(self, name: str, verb: str, output: Path, reads: list[str], files=(), *,
            resumable: bool = False, make_dir: bool = False, **args) -> None:
        """A stage calling `verb`'s function with `args`; every stage that takes a layout runs
        at the config's."""
        if VERBS[verb].parallel:
            args.setdefault("parallel", self.cfg.parallel)
        self.stages.append(Stage(name, verb, complete(verb, args), output, list(reads),
                                 list(files), resumable, make_dir))

    def teacher(self) -> tuple[Path, list[str]]:
        """A checkpoint of the teacher: the source itself, or its conversion."""
        src = teacher_source(self.cfg)
        if self.missing is not None and not src.exists():
            self.missing.append(f"teacher.source: {src}")
        if is_mcore_dir(src) or (self.missing is not None and not src.exists()):
            return src, []  # already a checkpoint (or, planning elsewhere, assumed to be)
        self.add("convert", "convert", self.d / "teacher", [], [src], src=src,
                 dst=self.d / "teacher")
        return self.d / "teacher", ["convert"]

    def data(self, teacher: Path, teacher_reads: list[str]):
        """(train files, train prefixes, valid prefixes, text valid files, data stages): text
        and JSONL files are tokenized into indexed datasets first."""
        cfg = self.cfg
        train_files, train = _split_data(cfg.data.train, "data.train", self.missing)
        valid_files, valid = _split_data(cfg.data.valid, "data.valid", self.missing)
        reads = []
        for name, files, prefixes in (("train", train_files, train), ("valid", valid_files,
                                                                      valid)):
            if files:
                out = self.d / "data" / name
                self.add(f"data-{name}", "preprocess", out, teacher_reads, files, make_dir=True,
                         input=files, tokenizer=teacher, output_prefix=str(out / name),
                         json_key=cfg.data.json_key)
                prefixes.insert(0, str(out / name))
                reads.append(f"data-{name}")
        text_valid = [f for f in valid_files if f.suffix != ".jsonl"]
        if not text_valid and self.missing is None and "perplexity" in cfg.eval.tasks:
            raise ConfigError("data.valid: held-out perplexity needs at least one text file")
        return train_files, train, valid, text_valid, reads

    def student(self, teacher: Path, teacher_reads: list[str], train_files: list[Path],
                train: list[str], valid: list[str], data_reads: list[str]):
        """Importance, then prune or search: (pruned checkpoint, checkpoint distillation
        starts from, the stage that writes them)."""
        cfg, d = self.cfg, self.d
        searching = cfg.search.given
        reads, scores = list(teacher_reads), None
        if cfg.prune.needs_scores() or searching:
            scores = d / "importance" / "scores.safetensors"
            calib = [*train_files, *train[1 if train_files else 0:]]
            self.add("importance", "importance", scores, teacher_reads, train_files,
                     load=teacher, out=scores, settings=cfg.importance, data=calib,
                     json_key=cfg.data.json_key)
            reads.append("importance")
        if searching:
            self.add("search", "search", d / "search", [*reads, *data_reads], resumable=True,
                     load=teacher, scores=scores, data=train, valid_data=valid,
                     out=d / "search", settings=cfg.search)
            return d / "search" / "best_pruned", d / "search" / "best", "search"
        self.add("prune", "prune", d / "pruned", reads, load=teacher, out=d / "pruned",
                 settings=cfg.prune, scores=scores, json_out=d / PRUNE_RECORD)
        return d / "pruned", d / "pruned", "prune"


def build_stages(cfg: RunConfig, missing: list[str] | None = None) -> list[Stage]:
    """The stages of this run, in order (nothing is read but the inputs' names). With
    `missing` (a dry run), absent inputs are listed there instead of failing; an absent teacher
    counts as a minitron checkpoint."""
    plan, d = _Plan(cfg, missing), cfg.directory
    teacher, teacher_reads = plan.teacher()
    train_files, train, valid, text_valid, data_reads = plan.data(teacher, teacher_reads)
    evals = [("teacher", teacher, teacher_reads)]
    if cfg.correction.train_iters > 0:
        plan.add("correction", "distill", d / "correction", teacher_reads + data_reads,
                 resumable=True, teacher=teacher, student=teacher, data=train, save=d /
                 "correction", settings=cfg.correction, valid_data=valid)
        teacher = iteration_dir(d / "correction", cfg.correction.train_iters)
        teacher_reads = ["correction"]
        evals = [("original", *evals[0][1:]), ("teacher", teacher, teacher_reads)]
    pruned, student_from, prune_stage = plan.student(teacher, teacher_reads, train_files, train,
                                                     valid, data_reads)
    plan.add("distill", "distill", d / "distill", [*teacher_reads, prune_stage, *data_reads],
             resumable=True, teacher=teacher, student=student_from, data=train,
             save=d / "distill", settings=cfg.distill, valid_data=valid)
    student = iteration_dir(d / "distill", cfg.distill.train_iters)
    evals += [("pruned", pruned, [prune_stage]), ("distilled", student, ["distill"])]
    for name, ckpt, reads in evals:
        out = d / "eval" / f"{name}.json"
        plan.add(f"eval-{name}", "eval", out, reads, text_valid, load=ckpt,
                 settings=cfg.eval, data=text_valid, out=out)
    if cfg.export.hf:
        plan.add("export", "convert", d / "hf", ["distill"], src=student, dst=d / "hf", to="hf")
    return plan.stages


def _stamp(p: Path) -> list:
    paths = sorted(p.rglob("*")) if p.is_dir() else [p]
    return [[str(q), q.stat().st_size, q.stat().st_mtime_ns] for q in paths if q.is_file()]


def assign_keys(stages: list[Stage]) -> None:
    keys: dict[str, str] = {}
    for s in stages:
        payload = json.dumps([s.verb, canonical(s.args), [keys[r] for r in s.reads],
                              [_stamp(f) for f in s.files]])
        s.key = keys[s.name] = hashlib.sha256(payload.encode()).hexdigest()[:16]


def validate(cfg: RunConfig, world_size: int, dry_run: bool) -> tuple[ModelConfig, ModelConfig]:
    """Every check that needs no model weights, before any work: (teacher, student) shapes."""
    from megatron_minitron.prune.plan import pruned_config

    p = cfg.parallel
    if world_size % (p.tp * p.pp):
        raise ConfigError(f"parallel: world size {world_size} is not divisible by tp*pp = "
                          f"{p.tp}*{p.pp}")
    dp = world_size // (p.tp * p.pp)
    searching = cfg.search.given
    if searching and (cfg.prune.needs_scores() or cfg.prune.drop_layers):
        raise ConfigError("prune and search: give a prune target or a search, not both")
    if not searching and not cfg.prune.needs_scores() and not cfg.prune.drop_layers:
        raise ConfigError("prune: no target given (params, hidden, ffn, heads, groups, layers "
                          "or drop_layers), and no search target (search.target_params or "
                          "search.target_active_params)")
    teacher = teacher_model(cfg, dry_run)
    teacher.check_parallel(p.tp, p.pp)
    for section in ("importance", "prune", "search", "distill", "correction", "eval"):
        try:
            if section == "importance" and (cfg.prune.needs_scores() or searching):
                cfg.importance.validate(teacher)
            elif section == "prune" and not searching:
                student = pruned_config(teacher, cfg.prune)
                student.check_parallel(p.tp, p.pp)
            elif section == "search" and searching:
                from megatron_minitron.search.run import kd_config, plan

                student = plan(teacher, cfg.search, p.tp)[0].model(teacher)
                kd_config(cfg.search).validate(dp)
                p.check_sequence(cfg.search.kd.seq_length, "kd.seq_length")
            elif section == "distill" or (section == "correction" and
                                          cfg.correction.train_iters > 0):
                getattr(cfg, section).validate(dp)
                if getattr(cfg, section).seq_length > teacher.max_position_embeddings:
                    raise ConfigError("seq_length exceeds the model's "
                                      f"{teacher.max_position_embeddings} positions")
            elif section == "eval":
                from megatron_minitron.evaluate.suite import parse_task

                if cfg.eval.seq_length > teacher.max_position_embeddings:
                    raise ConfigError(f"seq_length {cfg.eval.seq_length} exceeds the model's "
                                      f"{teacher.max_position_embeddings} positions")
                for t in cfg.eval.tasks:
                    parse_task(t)
            used = {"importance": cfg.prune.needs_scores() or searching, "search": searching,
                    "correction": cfg.correction.train_iters > 0}.get(section, True)
            if used and hasattr(getattr(cfg, section), "seq_length"):
                p.check_sequence(getattr(cfg, section).seq_length, "seq_length")
        except ConfigError as e:
            raise ConfigError(f"{section}: {e}") from None
    return teacher, student


def _run_stage(stage: Stage, markers: Path) -> float:
    done, pending = markers / f"{stage.name}.json", markers / f"{stage.name}.pending"
    resume = stage.resumable and pending.is_file() and pending.read_text() == stage.key
    barrier()
    if is_main_rank():
        done.unlink(missing_ok=True)
        if stage.output.exists() and not resume:  # stale or half-written: start over
            if stage.output.is_dir():
                shutil.rmtree(stage.output)
            else:
                stage.output.unlink()
        write_text(pending, stage.key)
        stage.output.parent.mkdir(parents=True, exist_ok=True)
        if stage.make_dir:
            stage.output.mkdir(exist_ok=True)
    barrier()
    log.info("stage %s%s: minitron %s", stage.name, " (resuming)" if resume else "",
             _short(stage.command))
    t = time.time()
    with prefixed(f"stage {stage.name} (finished stages are kept; rerun to continue)"):
        run(stage.verb, stage.args)
    seconds = time.time() - t
    barrier()
    if is_main_rank():
        write_text(done, json.dumps({"key": stage.key, "seconds": seconds,
                                     "command": stage.command}, indent=2))
        pending.unlink(missing_ok=True)
    return seconds


def run_pipeline(cfg: RunConfig, dry_run: bool = False, world_size: int | None = None) -> dict:
    """Run (or with dry_run only validate and print) every stage; returns the report. A dry
    run plans for `world_size` processes (default: tp * pp). The run directory is locked
    against a second `minitron run` while this one works in it."""
    world = (world_size or cfg.parallel.tp * cfg.parallel.pp) if dry_run else launch_env()[1]
    missing: list[str] | None = [] if dry_run else None
    stages = build_stages(cfg, missing)
    teacher, student = validate(cfg, world, dry_run)
    if dry_run:
        return _print_plan(cfg, stages, teacher, student, missing, world)
    assign_keys(stages)
    with directory_lock(cfg.directory, is_holder=launch_env()[0] == 0):
        return _run_stages(cfg, stages, world)


def _run_stages(cfg: RunConfig, stages: list[Stage], world: int) -> dict:
    from megatron_minitron.pipeline.report import write_report

    if world > 1:  # the process group first: stages that write from one rank wait on it
        from megatron_minitron.runtime import init_runtime

        init_runtime(cfg.parallel)
    markers = cfg.directory / MARKERS
    if is_main_rank():
        markers.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for stage in stages:
        marker = markers / f"{stage.name}.json"
        done = json.loads(marker.read_text()) if marker.is_file() else {}
        if done.get("key") == stage.key and stage.output.exists():
            seconds[stage.name] = done["seconds"]
            log.info("stage %s: finished earlier, skipped", stage.name)
            continue
        seconds[stage.name] = _run_stage(stage, markers)
    barrier()
    checkpoints = {s.name[len("eval-"):]: Path(s.args["load"]) for s in stages
                   if s.name.startswith("eval-")}
    return write_report(cfg, checkpoints, seconds) if is_main_rank() else {}


def _batch_line(name: str, d, dp: int) -> str:
    """How a training stage's global batch is made at this world size."""
    accumulation = d.global_batch_size // (dp * d.micro_batch_size)
    tokens = d.global_batch_size * d.seq_length
    return (f"  {name}: global batch {d.global_batch_size} = {dp} data-parallel x micro-batch "
            f"{d.micro_batch_size} x {accumulation} accumulated; {tokens:,} tokens per step, "
            f"{d.train_iters:,} steps = {tokens * d.train_iters:,} tokens")


def _print_plan(cfg: RunConfig, stages: list[Stage], teacher: ModelConfig,
                student: ModelConfig, missing: list[str], world: int) -> dict:
    t, s = teacher.num_parameters(), student.num_parameters()
    lines = [f"config {cfg.name}: valid",
             f"  teacher  {_shape(teacher)}: {t / 1e9:.3f} B parameters",
             f"  student  {_shape(student)}: {s / 1e9:.3f} B parameters ({s / t:.1%})"]
    if cfg.expected_params:
        lines.append(f"  published size {cfg.expected_params / 1e9:.3f} B: "
                     f"{s / cfg.expected_params - 1:+.2%}")
    if cfg.search.given:
        from megatron_minitron.search.run import plan

        lines.append("  search candidates (the student above is the first):")
        lines += [f"    {c.name:<24} {c.params / 1e9:.3f} B"
                  for c in plan(teacher, cfg.search, cfg.parallel.tp)]
    dp = world // (cfg.parallel.tp * cfg.parallel.pp)
    lines.append(f"  world {world} = tp {cfg.parallel.tp} x pp {cfg.parallel.pp} x "
                 f"data-parallel {dp}")
    names = {st.name for st in stages}
    lines += [_batch_line(n, getattr(cfg, n), dp) for n in ("correction", "distill")
              if n in names]
    lines.append("  stages:")
    lines += [f"    {st.name:<15} minitron {_short(st.command)}" for st in stages]
    lines += [f"  not found here (needed where it runs): {m}" for m in missing]
    if is_main_rank():
        print("\n".join(lines))
    return {"teacher_params": t, "student_params": s, "stages": [st.name for st in stages]}


def _short(argv: list[str], keep: int = 2) -> str:
    """The command with long runs of file arguments elided (the markers keep it whole)."""
    out, run = [], []
    for a in [*argv, "--"]:
        if a.startswith("--"):
            out += run if len(run) <= keep + 1 else [*run[:keep], f"...(+{len(run) - keep})"]
            run = []
            out.append(a)
        else:
            run.append(a)
    return " ".join(out[:-1])


def _shape(m: ModelConfig) -> str:
    mamba = (f", Mamba heads {m.mamba_heads}/{m.mamba_groups} groups of {m.mamba_head_dim}"
             if m.hybrid else "")
    return (f"layers {m.num_layers}, hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, heads "
            f"{m.num_attention_heads}/{m.num_query_groups} groups{mamba}")
