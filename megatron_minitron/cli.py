"""`minitron <verb>`: the command line. Each verb parses its arguments into the settings
dataclasses (their flags are generated from the fields, options.py) and calls the library."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import warnings
from pathlib import Path

from megatron_minitron.config import ConfigError, ParallelConfig, TrainingError
from megatron_minitron.distill.train import DistillConfig
from megatron_minitron.evaluate.suite import EvalConfig
from megatron_minitron.importance.run import ImportanceConfig
from megatron_minitron.options import HelpFormatter, add_options, from_args
from megatron_minitron.prune.plan import PruneTarget
from megatron_minitron.search.run import SearchConfig

log = logging.getLogger("minitron")


def _add_parallel(p: argparse.ArgumentParser) -> None:
    add_options(p, ParallelConfig, "parallelism and precision (Megatron names; --tp/--pp/--vpp "
                                   "short forms)")


def _parallel(a) -> ParallelConfig:
    return from_args(ParallelConfig, a)


def _locked(directory: Path):
    """The run directory a command writes, locked against a second command (global rank 0)."""
    from megatron_minitron.checkpoint.atomic import directory_lock
    from megatron_minitron.runtime.distributed import launch_env

    return directory_lock(directory, is_holder=launch_env()[0] == 0)


def cmd_convert(a) -> None:
    from megatron_minitron.checkpoint.convert import convert

    out = convert(Path(a.src), Path(a.dst), to=a.to, parallel=_parallel(a))
    log.info("converted %s -> %s (%s)", a.src, out, a.to)


def _load(a, keep_dtype: bool = False):
    from megatron_minitron.model import load_model

    return load_model(Path(a.load), _parallel(a), keep_dtype)


def _eval_text(a) -> str:
    from megatron_minitron.data.demo import held_out_plays

    files = [Path(f) for f in a.data] if a.data else held_out_plays()
    for f in files:
        if not f.is_file():
            raise ConfigError(f"evaluation data {f} not found")
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    if not text.strip():
        raise ConfigError(f"evaluation data {', '.join(map(str, files))} is empty")
    return text


def cmd_eval(a) -> None:
    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.data.tokenizer import load_tokenizer
    from megatron_minitron.evaluate import suite
    from megatron_minitron.evaluate.perplexity import evaluate_windows, token_windows

    mcore.read_meta(Path(a.load))  # a missing checkpoint is the first thing to name
    cfg = from_args(EvalConfig, a)
    _parallel(a).check_sequence(cfg.seq_length)
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
    tok = load_tokenizer(Path(a.load))
    windows = None
    if any(k == "perplexity" for k, _ in specs):
        windows = token_windows(tok.encode(_eval_text(a)), cfg.seq_length, cfg.max_windows,
                                cfg.stride)
    rt, meta, chunks = _load(a)
    out: dict = {"tasks": {}}
    if windows is not None:
        res = evaluate_windows(chunks, windows, cfg.micro_batch_size, cfg.stride)
        out.update(res.__dict__)
        out["tasks"]["perplexity"] = {"loss": res.loss, "perplexity": res.perplexity,
                                      "tokens": res.tokens}
        if rt.is_main:
            print(f"{a.load}: {res.line()}")
    for name, (kind, task) in rows.items():
        out["tasks"][name] = suite.run_task(chunks, tok, kind, task, cfg)
    if cfg.lm_eval:
        from megatron_minitron.evaluate.harness import MinitronLM, run_lm_eval

        model = MinitronLM(chunks, tok, cfg.seq_length, cfg.micro_batch_size)
        res = run_lm_eval(model, cfg.lm_eval, manager, cfg.num_fewshot, cfg.limit)
        out["lm_eval"] = res["results"]
    if rt.is_main:
        if rows:
            print(suite.table(out["tasks"]))
        if cfg.lm_eval:
            from lm_eval.utils import make_table

            print(make_table(res))
        if a.out:
            from megatron_minitron.checkpoint.atomic import write_text

            write_text(Path(a.out), json.dumps(out, indent=2))


def _calibration_files(a) -> list[Path]:
    from megatron_minitron.data.demo import train_plays

    return [Path(f) for f in a.data] if a.data else train_plays()


def cmd_importance(a) -> None:
    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.data.calibration import sample_windows, token_stream
    from megatron_minitron.data.tokenizer import load_tokenizer
    from megatron_minitron.importance import compute_importance

    out = Path(a.out)
    if out.exists() or not out.parent.is_dir():
        raise ConfigError(f"scores file {out} exists or its directory does not; choose a new "
                          "path")
    meta = mcore.read_meta(Path(a.load))
    cfg = from_args(ImportanceConfig, a)
    _parallel(a).check_sequence(cfg.seq_length)
    cfg.validate(meta.model)
    files = _calibration_files(a)
    ids = token_stream(files, load_tokenizer(Path(a.load)), meta.model.vocab_size, a.json_key)
    samples = sample_windows(ids, cfg.samples, cfg.seq_length, cfg.seed)
    rt, meta, chunks = _load(a)
    scores = compute_importance(chunks, meta.model, samples, cfg, {
        "checkpoint": str(Path(a.load).resolve()), "fingerprint": meta.fingerprint,
        "data": [str(f) for f in files], "data_tokens": len(ids)})
    if rt.is_main:
        scores.save(out)
        secs = scores.meta["seconds"]
        print(f"{out}: {cfg.samples} samples x {cfg.seq_length} tokens; activations "
              f"{secs['activations']:.1f} s, depth {secs.get('depth', 0):.1f} s")


def cmd_prune(a) -> None:
    import torch.distributed as dist

    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.checkpoint.atomic import check_destination
    from megatron_minitron.config import CheckpointMeta
    from megatron_minitron.importance import load_scores
    from megatron_minitron.prune import check_scores, make_plan, prune_model
    from megatron_minitron.prune.plan import pruned_config

    src, out = Path(a.load), Path(a.out)
    check_destination(out)
    if a.hf_out:
        check_destination(Path(a.hf_out))
    meta = mcore.read_meta(src)
    target = from_args(PruneTarget, a)
    pruned_config(meta.model, target).check_parallel(a.tp, 1)  # it is written at this TP
    scores = load_scores(Path(a.scores)) if a.scores else None
    if scores is not None:
        check_scores(scores, meta.model, meta.fingerprint)
    plan = make_plan(meta.model, target, scores)
    rt, meta, chunks = _load(a, keep_dtype=True)
    if a.hf_out and rt.world_size > 1:
        raise ConfigError("--hf-out exports in one process; prune without torchrun or run "
                          "`minitron convert OUT HF --to hf` afterwards")
    new = prune_model(chunks, meta.model, plan, rt.parallel)
    history = [*meta.history, f"pruned to {plan.summary()}", *plan.notes]
    mcore.save_checkpoint(new, CheckpointMeta(model=plan.model, tokenizer=meta.tokenizer,
                                              source=f"mcore:{src.resolve()}", history=history,
                                              hidden_map=plan.hidden.tolist()),
                          out, mcore.tokenizer_files(src))
    if a.hf_out:
        from megatron_minitron.checkpoint.convert import export_hf

        export_hf(new, plan.model, out, Path(a.hf_out))
    if rt.is_main:
        before, after = meta.model.num_parameters(), plan.model.num_parameters()
        print(f"{out}: {plan.summary()}\n  parameters {before:,} -> {after:,} "
              f"({after / before:.1%}); non-embedding "
              f"{meta.model.num_parameters(False):,} -> {plan.model.num_parameters(False):,}")
        for n in plan.notes:
            print(f"  {n}")
    if dist.is_initialized():
        dist.barrier()


def cmd_preprocess(a) -> None:
    from megatron_minitron.data.preprocess import preprocess, resolve_tokenizer
    from megatron_minitron.runtime.distributed import barrier, launch_env

    if launch_env()[0] == 0:  # one writer under torchrun / srun (and inside `minitron run`)
        preprocess([Path(f) for f in a.input], resolve_tokenizer(Path(a.tokenizer)),
                   a.output_prefix, a.json_key)
    barrier()


def cmd_distill(a) -> None:
    from megatron_minitron.distill.train import Distiller

    cfg = from_args(DistillConfig, a)
    with _locked(Path(a.save)):
        d = Distiller(Path(a.teacher), Path(a.student), a.data, Path(a.save), cfg, _parallel(a),
                      a.valid_data)
        out = d.run()
    if d.rt.is_main:
        print(f"distilled student: {out}")


def cmd_search(a) -> None:
    from megatron_minitron.search.run import search

    cfg, parallel = from_args(SearchConfig, a), _parallel(a)
    parallel.check_sequence(cfg.seq_length)
    with _locked(Path(a.out)):
        search(Path(a.load), Path(a.scores), cfg, a.data, a.valid_data, Path(a.out), parallel)


def cmd_run(a) -> None:
    from megatron_minitron.pipeline.config import load_config
    from megatron_minitron.pipeline.run import run_pipeline

    run_pipeline(load_config(Path(a.config)), a.dry_run, a.world_size)


def cmd_generate(a) -> None:
    from megatron_minitron.data.tokenizer import load_tokenizer
    from megatron_minitron.evaluate.generate import greedy

    rt, meta, chunks = _load(a)
    tok = load_tokenizer(Path(a.load))
    new = greedy(chunks, tok.encode(a.prompt), a.max_new_tokens, tok.eos_id)
    if rt.is_main:
        print(a.prompt + tok.decode(new))


def _verb(sub, name: str, func, help: str, settings=None, parallel: bool = True
          ) -> argparse.ArgumentParser:
    """A verb's parser with the flags of its settings dataclass and of ParallelConfig, made
    from their fields; the caller adds the verb's own inputs and outputs."""
    p = sub.add_parser(name, help=help, description=help,
                       formatter_class=HelpFormatter)
    p.set_defaults(func=func)
    if settings is not None:
        add_options(p, settings, f"{name} settings")
    if parallel:
        _add_parallel(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minitron", description="Minitron pruning and distillation "
                                "for Megatron-Core models (`minitron VERB --help` for a verb)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, including the full cause of a failed load")
    sub = p.add_subparsers(dest="verb", required=True)

    c = _verb(sub, "convert", cmd_convert, "HF dir / GGUF / Megatron checkpoint -> mcore or HF")
    c.add_argument("src", help="HF directory, .gguf file or minitron checkpoint")
    c.add_argument("dst", help="new directory")
    c.add_argument("--to", choices=("mcore", "hf"), default="mcore",
                   help="write a minitron (Megatron dist) checkpoint or a HF directory")

    e = _verb(sub, "eval", cmd_eval, "perplexity, cloze and multiple-choice tasks", EvalConfig)
    e.add_argument("--load", required=True, help="checkpoint")
    e.add_argument("--data", nargs="*", help="perplexity text files (default: held-out plays)")
    e.add_argument("--out", help="write the result as JSON here")

    pp = _verb(sub, "preprocess", cmd_preprocess,
               "text / JSONL -> Megatron indexed dataset (.bin/.idx)", parallel=False)
    pp.add_argument("--input", nargs="+", required=True, help="text or JSONL files")
    pp.add_argument("--tokenizer", required=True,
                    help="tokenizer file, a directory holding one, or a checkpoint")
    pp.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    pp.add_argument("--json-key", default="text", help="text field of JSONL documents")

    i = _verb(sub, "importance", cmd_importance, "activation importance of every prunable axis",
              ImportanceConfig)
    i.add_argument("--load", required=True, help="checkpoint")
    i.add_argument("--data", nargs="*", help="text, .jsonl files or indexed-dataset prefixes "
                   "(default: the Shakespeare training plays)")
    i.add_argument("--json-key", default="text", help="text field of JSONL documents")
    i.add_argument("--out", required=True, help="scores file (.safetensors)")

    r = _verb(sub, "prune", cmd_prune, "prune to a target shape; writes a new checkpoint",
              PruneTarget)
    r.add_argument("--load", required=True, help="checkpoint")
    r.add_argument("--scores", help="importance scores of --load (not needed for --drop-layers)")
    r.add_argument("--out", required=True, help="new checkpoint directory")
    r.add_argument("--hf-out", help="also export the pruned model as a Hugging Face directory")

    d = _verb(sub, "distill", cmd_distill, "knowledge-distillation retraining of a student",
              DistillConfig)
    d.add_argument("--teacher", required=True, help="teacher checkpoint (frozen)")
    d.add_argument("--student", required=True, help="student checkpoint (e.g. pruned)")
    d.add_argument("--data", nargs="+", required=True,
                   help="indexed-dataset prefixes, optionally weighted: W1 PREFIX1 W2 PREFIX2")
    d.add_argument("--valid-data", nargs="+", help="validation prefixes (default: --split)")
    d.add_argument("--save", required=True, help="run directory (resumes from its latest)")

    s = _verb(sub, "search", cmd_search, "candidate shapes at a parameter budget, each pruned "
              "and briefly distilled, ranked", SearchConfig)
    s.add_argument("--load", required=True, help="the teacher checkpoint")
    s.add_argument("--scores", required=True, help="its importance scores")
    s.add_argument("--data", nargs="+", required=True, help="training indexed-dataset prefixes")
    s.add_argument("--valid-data", nargs="+", required=True, help="validation prefixes")
    s.add_argument("--out", required=True, help="search directory (resumes)")

    rn = _verb(sub, "run", cmd_run, "the whole pipeline from a YAML config, stages cached",
               parallel=False)
    rn.add_argument("config", help="YAML file (see configs/)")
    rn.add_argument("--dry-run", action="store_true",
                    help="validate, print the shapes, parameter counts and commands; run nothing")
    rn.add_argument("--world-size", type=int,
                    help="with --dry-run: the number of processes to plan for (default: tp*pp)")

    g = _verb(sub, "generate", cmd_generate, "greedy continuation of a prompt")
    g.add_argument("--load", required=True, help="checkpoint")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated")
    return p


def _quiet_third_party() -> None:
    # Megatron warns about apex, TE and deprecated flags on every import: noise for our users.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("megatron", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_verb(argv: list[str]) -> int:
    """One verb, leaving the process group up (for `minitron run`, which chains verbs)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="[minitron] %(message)s")
    _quiet_third_party()
    try:
        args.func(args)
    except (ConfigError, TrainingError) as e:  # exit 2: bad usage or input; 3: training failed
        print(f"minitron {args.verb}: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def main(argv: list[str] | None = None) -> int:
    from megatron_minitron.runtime.distributed import shutdown

    try:
        return run_verb(sys.argv[1:] if argv is None else argv)
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
