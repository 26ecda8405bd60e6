"""`minitron run CONFIG.yaml`: every stage of the method, one after another, each cached.

A stage is one `minitron` command (the arrows of the data flow), run in this process on every
rank, so what the pipeline does is exactly what a user typing the commands would get; `--dry-run`
prints them. A stage is skipped when its marker (.stages/NAME.json) holds the same key: a hash of
its command, of the keys of the stages it reads and of the size and time of the files it reads.
A stage that did not finish is started again from scratch, except distillation, which resumes from
its last checkpoint when its key is unchanged.
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
from megatron_minitron.config import ConfigError, ModelConfig, stage_error
from megatron_minitron.distill.train import DistillConfig
from megatron_minitron.options import to_argv
from megatron_minitron.pipeline.config import BUILTIN, RunConfig
from megatron_minitron.runtime.distributed import barrier, is_main_rank, launch_env
from megatron_minitron.search.run import SearchConfig

log = logging.getLogger("minitron")
MARKERS = ".stages"


@dataclass
class Stage:
    name: str
    argv: list[str]  # the minitron command
    output: Path
    reads: list[str] = field(default_factory=list)  # stages whose outputs it reads
    files: list[Path] = field(default_factory=list)  # outside files it reads
    resumable: bool = False
    make_dir: bool = False  # create `output` before the command (which writes into it)
    key: str = ""


def _builtin(entry: str) -> list[Path]:
    from megatron_minitron.data import demo

    assets = {"shakespeare-train": demo.train_plays, "shakespeare-valid": demo.held_out_plays,
              "smollm2": lambda: [demo.smollm2_gguf()]}
    name = entry[len(BUILTIN):]
    if name not in assets:
        raise ConfigError(f"unknown built-in {entry!r} (known: "
                          f"{', '.join(BUILTIN + k for k in assets)})")
    return assets[name]()


def _split_data(entries: list[str], where: str, missing: list[str] | None
                ) -> tuple[list[Path], list[str]]:
    """(text/JSONL files, indexed-dataset prefixes). Every entry must exist, unless `missing`
    collects the absent ones (planning a run for another machine: they count as prefixes)."""
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
        elif missing is not None:
            missing.append(f"{where}: {e}")
            prefixes.append(e)
        else:
            raise ConfigError(f"{where}: {e} is neither a file nor an indexed-dataset prefix")
    return files, prefixes


def teacher_source(cfg: RunConfig) -> Path:
    src = cfg.teacher.source
    return _builtin(src)[0] if src.startswith(BUILTIN) else Path(src)


def teacher_model(cfg: RunConfig, dry_run: bool) -> ModelConfig:
    """The teacher's shape: from its checkpoint/HF config/GGUF, or teacher.shape."""
    from megatron_minitron.checkpoint import convert, mcore
    from megatron_minitron.checkpoint.layout import model_config_from_hf

    shape = cfg.teacher_shape()
    src = teacher_source(cfg)
    if not src.exists():
        if dry_run and shape is not None:
            return shape
        raise ConfigError(f"teacher.source: {src} not found")
    fmt = convert.detect_format(src)
    if fmt == "mcore":
        return mcore.read_meta(src).model
    if fmt == "hf":
        return model_config_from_hf(json.loads((src / "config.json").read_text()), str(src))
    return convert.read_source(src, fmt)[0]


def build_stages(cfg: RunConfig, world_size: int = 1, missing: list[str] | None = None
                 ) -> list[Stage]:
    """The commands of this run, in order (nothing is read but the inputs' names). With
    `missing` (a dry run), absent inputs are listed there instead of failing; an absent teacher
    counts as a minitron checkpoint."""
    d = cfg.directory
    par = to_argv(cfg.parallel)
    stages: list[Stage] = []
    src = teacher_source(cfg)
    if missing is not None and not src.exists():
        missing.append(f"teacher.source: {src}")
    if (src / "minitron.json").is_file() or (missing is not None and not src.exists()):
        teacher = src  # already a checkpoint: nothing to convert
    else:
        if world_size > 1:
            raise ConfigError("teacher.source: importing HF/GGUF weights runs in one process; "
                              f"run `minitron convert {src} DST` first and set teacher.source "
                              "to DST")
        teacher = d / "teacher"
        stages.append(Stage("convert", ["convert", str(src), str(teacher)], teacher,
                            files=[src]))
    teacher_reads = [s.name for s in stages]

    train_files, train_prefixes = _split_data(cfg.data.train, "data.train", missing)
    valid_files, valid_prefixes = _split_data(cfg.data.valid, "data.valid", missing)
    for name, files, prefixes in (("train", train_files, train_prefixes),
                                  ("valid", valid_files, valid_prefixes)):
        if files:
            out = d / "data" / name
            stages.append(Stage(f"data-{name}", [
                "preprocess", "--input", *map(str, files), "--tokenizer", str(teacher),
                "--output-prefix", str(out / name), "--json-key", cfg.data.json_key],
                out, teacher_reads, files, make_dir=True))
            prefixes.insert(0, str(out / name))
    data_reads = [s.name for s in stages if s.name.startswith("data-")]
    text_valid = [f for f in valid_files if f.suffix != ".jsonl"]
    if not text_valid and missing is None and "perplexity" in cfg.eval.tasks:
        raise ConfigError("data.valid: held-out perplexity needs at least one text file")

    if cfg.correction.train_iters > 0:
        out = d / "correction"
        stages.append(Stage("correction", [
            "distill", "--teacher", str(teacher), "--student", str(teacher), "--data",
            *train_prefixes, "--valid-data", *valid_prefixes, "--save", str(out),
            *to_argv(cfg.correction, DistillConfig), *par], out, teacher_reads + data_reads,
            resumable=True))
        original, original_reads = teacher, teacher_reads
        teacher = out / f"iter_{cfg.correction.train_iters:07d}"
        teacher_reads = ["correction"]

    prune_reads = list(teacher_reads)
    prune_args = ["prune", "--load", str(teacher), "--out", str(d / "pruned"),
                  *to_argv(cfg.prune)]
    searching = cfg.search.target_params is not None
    if cfg.prune.needs_scores() or searching:
        scores = d / "importance" / "scores.safetensors"
        calib = [*map(str, train_files), *train_prefixes[1 if train_files else 0:]]
        stages.append(Stage("importance", [
            "importance", "--load", str(teacher), "--data", *calib, "--json-key",
            cfg.data.json_key, "--out", str(scores), *to_argv(cfg.importance), *par],
            scores, teacher_reads,
            train_files))
        prune_args += ["--scores", str(scores)]
        prune_reads.append("importance")
    if searching:
        stages.append(Stage("search", [
            "search", "--load", str(teacher), "--scores", str(scores), "--data", *train_prefixes,
            "--valid-data", *valid_prefixes, "--out", str(d / "search"),
            *to_argv(cfg.search, SearchConfig), *par], d / "search",
            [*prune_reads, *data_reads], resumable=True))
        pruned, student_from, prune_stage = d / "search" / "best_pruned", \
            d / "search" / "best", "search"
    else:
        stages.append(Stage("prune", [*prune_args, *par], d / "pruned", prune_reads))
        pruned = student_from = d / "pruned"
        prune_stage = "prune"

    distill = d / "distill"
    stages.append(Stage("distill", [
        "distill", "--teacher", str(teacher), "--student", str(student_from), "--data",
        *train_prefixes, "--valid-data", *valid_prefixes, "--save", str(distill),
        *to_argv(cfg.distill), *par], distill, [*teacher_reads, prune_stage, *data_reads],
        resumable=True))
    student = distill / f"iter_{cfg.distill.train_iters:07d}"

    evals = [("teacher", teacher, teacher_reads), ("pruned", pruned, [prune_stage]),
             ("distilled", student, ["distill"])]
    if cfg.correction.train_iters > 0:
        evals.insert(0, ("original", original, original_reads))
    for name, ckpt, reads in evals:
        out = d / "eval" / f"{name}.json"
        stages.append(Stage(f"eval-{name}", [
            "eval", "--load", str(ckpt), "--data", *map(str, text_valid), "--out", str(out),
            *to_argv(cfg.eval), *par], out, reads,
            text_valid))
    if cfg.export.hf and world_size == 1:
        stages.append(Stage("export", ["convert", str(student), str(d / "hf"), "--to", "hf"],
                            d / "hf", ["distill"]))
    return stages


def _stamp(p: Path) -> list:
    paths = sorted(p.rglob("*")) if p.is_dir() else [p]
    return [[str(q), q.stat().st_size, q.stat().st_mtime_ns] for q in paths if q.is_file()]


def assign_keys(stages: list[Stage]) -> None:
    keys: dict[str, str] = {}
    for s in stages:
        payload = json.dumps([s.argv, [keys[r] for r in s.reads], [_stamp(f) for f in s.files]])
        s.key = keys[s.name] = hashlib.sha256(payload.encode()).hexdigest()[:16]


def validate(cfg: RunConfig, world_size: int, dry_run: bool) -> tuple[ModelConfig, ModelConfig]:
    """Every check that needs no model weights, before any work: (teacher, student) shapes."""
    from megatron_minitron.prune.plan import pruned_config

    p = cfg.parallel
    if world_size % (p.tp * p.pp):
        raise ConfigError(f"parallel: world size {world_size} is not divisible by tp*pp = "
                          f"{p.tp}*{p.pp}")
    dp = world_size // (p.tp * p.pp)
    searching = cfg.search.target_params is not None
    if searching and (cfg.prune.needs_scores() or cfg.prune.drop_layers):
        raise ConfigError("prune and search: give a prune target or a search, not both")
    if not searching and not cfg.prune.needs_scores() and not cfg.prune.drop_layers:
        raise ConfigError("prune: no target given (hidden, ffn, heads, groups, layers or "
                          "drop_layers), and no search.target_params")
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
                from megatron_minitron.search.run import plan

                student = plan(teacher, cfg.search, p.tp)[0].model(teacher)
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
    from megatron_minitron.cli import run_verb

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
             _short(stage.argv))
    t = time.time()
    rc = run_verb(stage.argv)
    if rc:
        raise stage_error(rc, f"stage {stage.name} failed (exit {rc}); finished stages are kept, "
                              "re-run to continue")
    seconds = time.time() - t
    barrier()
    if is_main_rank():
        write_text(done, json.dumps({"key": stage.key, "seconds": seconds,
                                     "argv": stage.argv}, indent=2))
        pending.unlink(missing_ok=True)
    return seconds


def run_pipeline(cfg: RunConfig, dry_run: bool = False, world_size: int | None = None) -> dict:
    """Run (or with dry_run only validate and print) every stage; returns the report. A dry
    run plans for `world_size` processes (default: tp * pp). The run directory is locked
    against a second `minitron run` while this one works in it."""
    world = (world_size or cfg.parallel.tp * cfg.parallel.pp) if dry_run else launch_env()[1]
    missing: list[str] | None = [] if dry_run else None
    stages = build_stages(cfg, world, missing)
    teacher, student = validate(cfg, world, dry_run)
    if dry_run:
        return _print_plan(cfg, stages, teacher, student, missing)
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
    checkpoints = {s.name[len("eval-"):]: Path(s.argv[2]) for s in stages
                   if s.name.startswith("eval-")}
    return write_report(cfg, checkpoints, seconds) if is_main_rank() else {}


def _print_plan(cfg: RunConfig, stages: list[Stage], teacher: ModelConfig,
                student: ModelConfig, missing: list[str]) -> dict:
    t, s = teacher.num_parameters(), student.num_parameters()
    lines = [f"config {cfg.name}: valid",
             f"  teacher  {_shape(teacher)}: {t / 1e9:.3f} B parameters",
             f"  student  {_shape(student)}: {s / 1e9:.3f} B parameters ({s / t:.1%})"]
    if cfg.expected_params:
        lines.append(f"  published size {cfg.expected_params / 1e9:.3f} B: "
                     f"{s / cfg.expected_params - 1:+.2%}")
    if cfg.search.target_params is not None:
        from megatron_minitron.search.run import plan

        lines.append("  search candidates (the student above is the first):")
        lines += [f"    {c.name:<24} {c.params / 1e9:.3f} B"
                  for c in plan(teacher, cfg.search, cfg.parallel.tp)]
    lines.append("  stages:")
    lines += [f"    {st.name:<15} minitron {_short(st.argv)}" for st in stages]
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
    return (f"layers {m.num_layers}, hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, heads "
            f"{m.num_attention_heads}/{m.num_query_groups} groups")
