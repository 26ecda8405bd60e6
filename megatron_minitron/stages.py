"""The stages of the method as functions of their inputs, outputs and settings dataclasses.

`minitron VERB` parses its arguments into exactly these parameters (commands.py); `minitron run`
and `search` build them from YAML and call the same functions. Nothing here reads argv. Each
returns what it produced. Parameter names are the command's flag names (`hf_out` is `--hf-out`),
`settings` is the verb's settings dataclass, `parallel` how it runs. The search stage is
`search.run.search`, which calls prune and distill.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from megatron_minitron.config import ConfigError, ModelConfig, ParallelConfig
from megatron_minitron.distill.train import DistillConfig
from megatron_minitron.evaluate.suite import EvalConfig
from megatron_minitron.importance.run import ImportanceConfig
from megatron_minitron.prune.plan import PruneTarget

log = logging.getLogger("minitron")


def locked(directory: Path):
    """The run directory a command writes, locked against a second command (global rank 0)."""
    from megatron_minitron.checkpoint.atomic import directory_lock
    from megatron_minitron.runtime.distributed import launch_env

    return directory_lock(directory, is_holder=launch_env()[0] == 0)


def write_json(path: Path | None, record: dict) -> None:
    """`--json FILE`: what a command reported, for scripts (first rank, written atomically)."""
    from megatron_minitron.checkpoint.atomic import write_text
    from megatron_minitron.runtime.distributed import is_main_rank

    if path is not None and is_main_rank():
        write_text(Path(path), json.dumps(record, indent=2, default=str))


def convert(src: Path, dst: Path, to: str = "mcore", parallel: ParallelConfig | None = None,
            json_out: Path | None = None, max_shard_size: int | None = None,
            tokenizer: Path | None = None) -> Path:
    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.checkpoint.convert import convert as convert_checkpoint

    out = convert_checkpoint(Path(src), Path(dst), to=to, parallel=parallel,
                             max_shard_bytes=max_shard_size, tokenizer=tokenizer)
    log.info("converted %s -> %s (%s)", src, out, to)
    if json_out is not None:
        model = mcore.read_meta(out if to != "hf" else Path(src)).model
        write_json(json_out, {"src": str(src), "dst": str(out), "to": to,
                              "model": model.to_dict(), "parameters": model.num_parameters()})
    return out


def preprocess(input: list[Path], tokenizer: Path, output_prefix: str, json_key: str = "text"
               ) -> str:
    from megatron_minitron.data.preprocess import preprocess as build
    from megatron_minitron.data.preprocess import resolve_tokenizer
    from megatron_minitron.runtime.distributed import host_barrier, launch_env

    if launch_env()[0] == 0:  # one writer under torchrun / srun (and inside `minitron run`)
        build([Path(f) for f in input], resolve_tokenizer(Path(tokenizer)), output_prefix,
              json_key)
    host_barrier()  # tokenizing a corpus may outlast NCCL's watchdog
    return output_prefix


def importance(load: Path, out: Path, settings: ImportanceConfig,
               parallel: ParallelConfig | None = None, data: list[Path] | None = None,
               json_key: str = "text", json_out: Path | None = None) -> Path:
    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.data.calibration import sample_windows, token_stream
    from megatron_minitron.data.demo import train_plays
    from megatron_minitron.data.tokenizer import load_tokenizer
    from megatron_minitron.importance import compute_importance
    from megatron_minitron.model import load_model

    cfg, parallel, load, out = settings, parallel or ParallelConfig(), Path(load), Path(out)
    if out.exists() or not out.parent.is_dir():
        raise ConfigError(f"scores file {out} exists or its directory does not; choose a new "
                          "path")
    meta = mcore.read_meta(load)
    parallel.check_sequence(cfg.seq_length)
    cfg.validate(meta.model)
    files = [Path(f) for f in data] if data else train_plays()
    tok = load_tokenizer(load)
    ids = token_stream(files, tok, meta.model.vocab_size, json_key)
    samples = sample_windows(ids, cfg.samples, cfg.seq_length, cfg.seed, tok.prefix)
    rt, meta, chunks = load_model(load, parallel)
    scores = compute_importance(chunks, meta.model, samples, cfg, {
        "checkpoint": str(load.resolve()), "fingerprint": meta.fingerprint,
        "data": [str(f) for f in files], "json_key": json_key, "data_tokens": len(ids)})
    if rt.is_main:
        scores.save(out)
        secs = scores.meta["seconds"]
        print(f"{out}: {cfg.samples} samples x {cfg.seq_length} tokens; activations "
              f"{secs['activations']:.1f} s, depth {secs.get('depth', 0):.1f} s"
              + (f", head masking {secs['heads']:.1f} s" if "heads" in secs else ""))
        write_json(json_out, {"out": str(out), **scores.meta})
    return out


def prune_summary(src: ModelConfig, plan) -> list[str]:
    """What a prune does, in lines: shape, parameters, dropped layers, how choices were made."""
    before, after = src.num_parameters(), plan.model.num_parameters()
    dropped = sorted(set(range(src.num_layers)) - set(plan.layers))
    return [plan.summary(),
            f"parameters {before:,} -> {after:,} ({after / before:.1%}); non-embedding "
            f"{src.num_parameters(False):,} -> {plan.model.num_parameters(False):,}",
            *([f"active per token {src.num_parameters(active=True):,} -> "
               f"{plan.model.num_parameters(active=True):,}"] if src.moe else []),
            *([f"dropped layers {dropped}"] if dropped else []), *plan.notes]


def candidate_lines(table: list[dict]) -> list[str]:
    """--strategy auto's candidates, best first."""
    rows = [f"    {r['loss']:8.4f}  {r['parameters']:>14,}  {r['strategy']}" for r in
            sorted(table, key=lambda r: r["loss"])]
    return ["  candidates (calibration loss, parameters, strategy):", *rows] if rows else []


def _prune_record(src: Path, out: Path, model: ModelConfig, plan, written: bool,
                  candidates: list[dict] = (), heterogeneous: dict | None = None) -> dict:
    return {"load": str(src), "out": str(out), "written": written,
            "source": model.to_dict(), "model": plan.model.to_dict(),
            "parameters": [model.num_parameters(), plan.model.num_parameters()],
            "non_embedding": [model.num_parameters(False), plan.model.num_parameters(False)],
            "active": [model.num_parameters(active=True),
                       plan.model.num_parameters(active=True)],
            "kept_layers": plan.layers, "notes": plan.notes, "candidates": list(candidates),
            "heterogeneous": heterogeneous}


def prune(load: Path, out: Path, settings: PruneTarget, parallel: ParallelConfig | None = None,
          scores: Path | None = None, hf_out: Path | None = None, dry_run: bool = False,
          json_out: Path | None = None, out_format: str = "minitron") -> Path:
    import torch.distributed as dist

    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.checkpoint.atomic import check_destination
    from megatron_minitron.config import CheckpointMeta
    from megatron_minitron.importance import load_scores
    from megatron_minitron.model import load_model
    from megatron_minitron.prune import check_scores, make_plan, prune_model
    from megatron_minitron.prune.plan import pruned_config

    src, out, parallel = Path(load), Path(out), parallel or ParallelConfig()
    check_destination(out)
    if hf_out:
        check_destination(Path(hf_out))
    meta = mcore.read_meta(src)
    if hf_out and settings.heterogeneous:
        from megatron_minitron.checkpoint.layout import check_nemotron_nas

        check_nemotron_nas(meta.model)
    if not settings.needs_scores() and not settings.drop_layers:
        raise ConfigError("no pruning target: give --target-hidden, --target-ffn, "
                          "--target-heads, --target-groups, --target-layers, --drop-layers or "
                          "(hybrid models) --target-mamba-heads/--target-mamba-head-dim")
    # written at this TP and EP
    pruned_config(meta.model, settings).check_parallel(parallel.tp, 1, parallel.ep)
    if out_format != "minitron":
        from megatron_minitron.checkpoint.megatron_lm import check_describable

        check_describable(meta.model, settings.heterogeneous)
    loaded = load_scores(Path(scores)) if scores else None
    if loaded is not None:
        check_scores(loaded, meta.model, meta.fingerprint, str(src))
    plan = make_plan(meta.model, settings, loaded)
    rechoose = settings.strategy == "auto" or settings.order != "joint" or settings.heterogeneous
    if rechoose and loaded is None:
        raise ConfigError("--strategy auto, --order and --heterogeneous score on calibration "
                          "data: they need --scores")
    if dry_run:
        if settings.heterogeneous:
            plan.notes.append("heterogeneous: each layer's MLP width and attention are chosen "
                              "when the model is loaded; the shape above is the uniform base")
        elif rechoose:
            plan.notes.append(f"strategy {settings.strategy}, order {settings.order}: units (and "
                              "with auto, whole groups) are chosen when the model is loaded")
        print("\n".join([f"plan for {src} (nothing written):",
                         *(f"  {x}" for x in prune_summary(meta.model, plan))]))
        write_json(json_out, _prune_record(src, out, meta.model, plan, written=False))
        return out
    rt, meta, chunks = load_model(src, parallel, keep_dtype=True)
    table, het = [], None
    if rechoose:
        from megatron_minitron.prune.heterogeneous import heterogeneous_plan
        from megatron_minitron.prune.strategy import calibration, choose_plan, ordered_plan

        cal = calibration(src, loaded.meta, settings.select_samples)
        if settings.heterogeneous:
            plan, het = heterogeneous_plan(chunks, meta.model, settings, loaded, cal, rt.parallel)
        elif settings.strategy == "auto":
            plan, table = choose_plan(chunks, meta.model, settings, loaded, cal, rt.parallel)
        else:
            plan = ordered_plan(chunks, meta.model, settings, loaded, cal, rt.parallel)
    summary = prune_summary(meta.model, plan)
    log.info("pruning %s: %s", src, "; ".join(summary))
    new = prune_model(chunks, meta.model, plan, rt.parallel, release_source=True)
    history = [*meta.history, f"pruned to {plan.summary()}", *plan.notes]
    mcore.save_checkpoint(new, CheckpointMeta(model=plan.model, tokenizer=meta.tokenizer,
                                              source=f"mcore:{src.resolve()}", history=history,
                                              hidden_map=plan.hidden.tolist()),
                          out, mcore.tokenizer_files(src), fmt=out_format)
    if hf_out:
        from megatron_minitron.checkpoint.convert import export_hf

        export_hf(new, plan.model, out, Path(hf_out))
    if rt.is_main:
        print("\n".join([f"{out}:", *(f"  {x}" for x in summary), *candidate_lines(table)]))
        write_json(json_out, _prune_record(src, out, meta.model, plan, True, table, het))
    if dist.is_initialized():
        dist.barrier()
    return out


def distill(teacher: Path, student: Path, data: list[str], save: Path, settings: DistillConfig,
            parallel: ParallelConfig | None = None, valid_data: list[str] | None = None) -> Path:
    """Returns the last checkpoint."""
    from megatron_minitron.distill.train import Distiller

    with locked(Path(save)):
        d = Distiller(Path(teacher), Path(student), data, Path(save), settings,
                      parallel or ParallelConfig(), valid_data)
        out = d.run()
    if d.rt.is_main:
        print(f"distilled student: {out}")
    return out


def _eval_text(data: list[Path] | None) -> str:
    from megatron_minitron.data.demo import held_out_plays

    files = [Path(f) for f in data] if data else held_out_plays()
    for f in files:
        if not f.is_file():
            raise ConfigError(f"evaluation data {f} not found")
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    if not text.strip():
        raise ConfigError(f"evaluation data {', '.join(map(str, files))} is empty")
    return text


def evaluate(load: Path, settings: EvalConfig, parallel: ParallelConfig | None = None,
             data: list[Path] | None = None, out: Path | None = None) -> dict:
    """Every task of `settings.tasks` (and lm-eval's): one results dict, also written to `out`."""
    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.data.tokenizer import load_tokenizer
    from megatron_minitron.evaluate import suite
    from megatron_minitron.evaluate.perplexity import evaluate_windows, token_windows
    from megatron_minitron.model import load_model

    cfg, parallel, load = settings, parallel or ParallelConfig(), Path(load)
    mcore.read_meta(load)  # a missing checkpoint is the first thing to name
    parallel.check_sequence(cfg.seq_length)
    specs = [suite.parse_task(t) for t in cfg.tasks]  # every file read before the model loads
    rows = {f"{k}={f}" if f else k: (k, suite.task_rows(k, f, cfg)) for k, f in specs
            if k != "perplexity"}
    manager = None
    if cfg.lm_eval:
        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("--lm-eval needs the optional package lm-eval (pip install lm-eval)")
        from megatron_minitron.evaluate.harness import task_manager

        manager = task_manager(cfg.lm_eval,
                               Path(cfg.lm_eval_include) if cfg.lm_eval_include else None)
    tok = load_tokenizer(load)
    windows = None
    if any(k == "perplexity" for k, _ in specs):
        windows = token_windows(tok.encode(_eval_text(data)), cfg.seq_length, cfg.max_windows,
                                cfg.stride, tok.prefix)
    rt, meta, chunks = load_model(load, parallel)
    result: dict = {"tasks": {}}
    if windows is not None:
        res = evaluate_windows(chunks, windows, cfg.micro_batch_size, cfg.stride)
        result.update(res.__dict__)
        result["tasks"]["perplexity"] = {"loss": res.loss, "perplexity": res.perplexity,
                                         "tokens": res.tokens}
        if rt.is_main:
            print(f"{load}: {res.line()}")
    for name, (kind, task) in rows.items():
        result["tasks"][name] = suite.run_task(chunks, tok, kind, task, cfg)
    if cfg.lm_eval:
        from megatron_minitron.evaluate.harness import MinitronLM, run_lm_eval

        model = MinitronLM(chunks, tok, cfg.seq_length, cfg.micro_batch_size)
        harness = run_lm_eval(model, cfg.lm_eval, manager, cfg.num_fewshot, cfg.limit)
        result["lm_eval"] = harness["results"]
    if rt.is_main:
        if rows:
            print(suite.table(result["tasks"]))
        if cfg.lm_eval:
            from lm_eval.utils import make_table

            print(make_table(harness))
        if out:
            from megatron_minitron.checkpoint.atomic import write_text

            write_text(Path(out), json.dumps(result, indent=2))
    return result


def generate(load: Path, prompt: str, max_new_tokens: int = 32,
             parallel: ParallelConfig | None = None) -> str:
    from megatron_minitron.data.tokenizer import load_tokenizer
    from megatron_minitron.evaluate.generate import greedy
    from megatron_minitron.model import load_model

    tok = load_tokenizer(Path(load))
    ids = tok.prefix + tok.encode(prompt)
    if not ids:
        raise ConfigError("the prompt is empty and this tokenizer adds no BOS to start from; "
                          "give --prompt some text")
    rt, meta, chunks = load_model(Path(load), parallel or ParallelConfig())
    text = prompt + tok.decode(greedy(chunks, ids, max_new_tokens, tok.eos_id))
    if rt.is_main:
        print(text)
    return text
