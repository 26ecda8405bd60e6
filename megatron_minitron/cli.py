"""`minitron <verb>`: argument parsing only; each verb calls one library function."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import warnings
from pathlib import Path

from megatron_minitron.config import PRECISIONS, ConfigError, ParallelConfig, TrainingError
from megatron_minitron.importance.stats import AGGREGATIONS
from megatron_minitron.prune.plan import DEPTH_METRICS
from megatron_minitron.search.space import AXES as SEARCH_AXES

log = logging.getLogger("minitron")


def _add_parallel(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism (Megatron names; --tp/--pp short forms)")
    g.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=1)
    g.add_argument("--virtual-pipeline-model-parallel-size", "--vpp", dest="vpp", type=int,
                   default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--micro-batch-size", type=int, default=1)
    prec = g.add_mutually_exclusive_group()
    for name in PRECISIONS:
        prec.add_argument(f"--{name}", dest="precision", action="store_const", const=name,
                          help=f"{name} weights and activations (default: bf16 on a GPU, fp32 on "
                               "CPU; convert and prune keep the checkpoint's dtype)")


def _parallel(a) -> ParallelConfig:
    return ParallelConfig(tp=a.tp, pp=a.pp, vpp=a.vpp, sequence_parallel=a.sequence_parallel,
                          precision=a.precision)


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
    _parallel(a).check_sequence(a.seq_length)
    cfg = suite.EvalConfig(seq_length=a.seq_length, micro_batch_size=a.micro_batch_size,
                           num_fewshot=a.num_fewshot, limit=a.limit, seed=a.seed)
    specs = [suite.parse_task(t) for t in a.tasks]  # every file read before the model loads
    rows = {f"{k}={f}" if f else k: (k, suite.task_rows(k, f, cfg)) for k, f in specs
            if k != "perplexity"}
    manager = None
    if a.lm_eval:
        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("--lm-eval needs the optional package lm-eval (pip install lm-eval)")
        from megatron_minitron.evaluate.harness import task_manager

        manager = task_manager(a.lm_eval, Path(a.lm_eval_include) if a.lm_eval_include else None)
    tok = load_tokenizer(Path(a.load))
    windows = None
    if any(k == "perplexity" for k, _ in specs):
        windows = token_windows(tok.encode(_eval_text(a)), a.seq_length, a.max_windows,
                                a.stride)
    rt, meta, chunks = _load(a)
    out: dict = {"tasks": {}}
    if windows is not None:
        res = evaluate_windows(chunks, windows, a.micro_batch_size, a.stride)
        out.update(res.__dict__)
        out["tasks"]["perplexity"] = {"loss": res.loss, "perplexity": res.perplexity,
                                      "tokens": res.tokens}
        if rt.is_main:
            print(f"{a.load}: {res.line()}")
    for name, (kind, task) in rows.items():
        out["tasks"][name] = suite.run_task(chunks, tok, kind, task, cfg)
    if a.lm_eval:
        from megatron_minitron.evaluate.harness import MinitronLM, run_lm_eval

        model = MinitronLM(chunks, tok, a.seq_length, a.micro_batch_size)
        res = run_lm_eval(model, a.lm_eval, manager, a.num_fewshot, a.limit)
        out["lm_eval"] = res["results"]
    if rt.is_main:
        if rows:
            print(suite.table(out["tasks"]))
        if a.lm_eval:
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
    from megatron_minitron.importance import ImportanceConfig, compute_importance

    out = Path(a.out)
    if out.exists() or not out.parent.is_dir():
        raise ConfigError(f"scores file {out} exists or its directory does not; choose a new "
                          "path")
    meta = mcore.read_meta(Path(a.load))
    _parallel(a).check_sequence(a.seq_length)
    cfg = ImportanceConfig(samples=a.samples, seq_length=a.seq_length, seq_agg=a.seq_agg,
                           sample_agg=a.sample_agg, block_sizes=tuple(a.block_sizes),
                           depth_samples=a.depth_samples, micro_batch_size=a.micro_batch_size,
                           seed=a.seed)
    cfg.validate(meta.model)
    files = _calibration_files(a)
    ids = token_stream(files, load_tokenizer(Path(a.load)), meta.model.vocab_size, a.json_key)
    samples = sample_windows(ids, a.samples, a.seq_length, a.seed)
    rt, meta, chunks = _load(a)
    scores = compute_importance(chunks, meta.model, samples, cfg, {
        "checkpoint": str(Path(a.load).resolve()), "fingerprint": meta.fingerprint,
        "data": [str(f) for f in files], "data_tokens": len(ids)})
    if rt.is_main:
        scores.save(out)
        secs = scores.meta["seconds"]
        print(f"{out}: {cfg.samples} samples x {cfg.seq_length} tokens; activations "
              f"{secs['activations']:.1f} s, depth {secs.get('depth', 0):.1f} s")


def _target(a):
    from megatron_minitron.prune import PruneTarget

    drop = [int(i) for i in a.drop_layers.split(",") if i.strip()] if a.drop_layers else None
    return PruneTarget(hidden=a.target_hidden, ffn=a.target_ffn, heads=a.target_heads,
                       groups=a.target_groups, layers=a.target_layers, drop_layers=drop,
                       depth_metric=a.depth_metric, norm_rescale=not a.no_norm_rescale)


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
    target = _target(a)
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
    from megatron_minitron.distill.train import DistillConfig, Distiller

    cfg = DistillConfig(
        train_iters=a.train_iters, global_batch_size=a.global_batch_size,
        micro_batch_size=a.micro_batch_size, seq_length=a.seq_length, lr=a.lr, min_lr=a.min_lr,
        warmup_iters=a.warmup_iters, weight_decay=a.weight_decay, clip_grad=a.clip_grad,
        temperature=a.temperature, kd_weight=a.kd_weight, lm_weight=a.lm_weight,
        hidden_weight=a.hidden_weight, top_k=a.top_k,
        eval_interval=a.eval_interval, eval_iters=a.eval_iters, save_interval=a.save_interval,
        keep_last=a.keep_last, log_interval=a.log_interval, seed=a.seed, split=a.split,
        distributed_optimizer=a.use_distributed_optimizer)
    with _locked(Path(a.save)):
        d = Distiller(Path(a.teacher), Path(a.student), a.data, Path(a.save), cfg, _parallel(a),
                      a.valid_data)
        out = d.run()
    if d.rt.is_main:
        print(f"distilled student: {out}")


def cmd_search(a) -> None:
    from megatron_minitron.search.run import SearchConfig, search

    _parallel(a).check_sequence(a.seq_length)
    cfg = SearchConfig(target_params=a.target_params, tolerance=a.tolerance, axes=tuple(a.axes),
                       candidates=a.candidates, step=a.step, kd_tokens=a.kd_tokens,
                       global_batch_size=a.global_batch_size, seq_length=a.seq_length, lr=a.lr,
                       min_lr=a.min_lr, eval_iters=a.eval_iters, seed=a.seed)
    parallel = ["--tp", str(a.tp), "--pp", str(a.pp), "--micro-batch-size",
                str(a.micro_batch_size), *(["--vpp", str(a.vpp)] if a.vpp else []),
                *([f"--{a.precision}"] if a.precision else []),
                *(["--sequence-parallel"] if a.sequence_parallel else [])]
    with _locked(Path(a.out)):
        search(Path(a.load), Path(a.scores), cfg, a.data, a.valid_data, Path(a.out), a.tp,
               parallel)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minitron", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="verb", required=True)

    c = sub.add_parser("convert", help="HF dir / GGUF / Megatron checkpoint -> mcore or HF")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", choices=("mcore", "hf"), default="mcore")
    _add_parallel(c)
    c.set_defaults(func=cmd_convert)

    e = sub.add_parser("eval", help="perplexity, cloze and multiple-choice tasks")
    e.add_argument("--load", required=True)
    e.add_argument("--tasks", nargs="+", default=["perplexity"],
                   help="perplexity, cloze=FILE.jsonl, choice=FILE.jsonl, shakespeare-cloze, "
                        "shakespeare-next")
    e.add_argument("--data", nargs="*", help="perplexity text files (default: held-out plays)")
    e.add_argument("--seq-length", type=int, default=512)
    e.add_argument("--stride", type=int, default=None,
                   help="perplexity: rolling windows every STRIDE tokens (default: disjoint)")
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--num-fewshot", type=int, default=0)
    e.add_argument("--limit", type=int, default=None, help="first N items of each task")
    e.add_argument("--seed", type=int, default=1234)
    e.add_argument("--lm-eval", nargs="+", metavar="TASK",
                   help="lm-eval-harness tasks run through the adapter (needs lm-eval)")
    e.add_argument("--lm-eval-include", metavar="DIR", help="directory of local lm-eval YAMLs")
    e.add_argument("--out", help="write the result as JSON here")
    _add_parallel(e)
    e.set_defaults(func=cmd_eval)

    pp = sub.add_parser("preprocess", help="text / JSONL -> Megatron indexed dataset (.bin/.idx)")
    pp.add_argument("--input", nargs="+", required=True)
    pp.add_argument("--tokenizer", required=True,
                    help="tokenizer file, a directory holding one, or a checkpoint")
    pp.add_argument("--output-prefix", required=True)
    pp.add_argument("--json-key", default="text")
    pp.set_defaults(func=cmd_preprocess)

    i = sub.add_parser("importance", help="activation importance of every prunable axis")
    i.add_argument("--load", required=True)
    i.add_argument("--data", nargs="*", help="text, .jsonl files or indexed-dataset prefixes "
                   "(default: the Shakespeare training plays)")
    i.add_argument("--json-key", default="text", help="text field of JSONL documents")
    i.add_argument("--samples", type=int, default=1024)
    i.add_argument("--seq-length", type=int, default=4096)
    i.add_argument("--seed", type=int, default=1234)
    i.add_argument("--seq-agg", choices=AGGREGATIONS, default="mean",
                   help="default aggregation over the sequence (all are stored)")
    i.add_argument("--sample-agg", choices=AGGREGATIONS, default="l2",
                   help="default aggregation over samples (all are stored)")
    i.add_argument("--block-sizes", type=int, nargs="+", default=[1],
                   help="measure the LM-loss rise of skipping every contiguous block of K layers")
    i.add_argument("--depth-samples", type=int, default=128,
                   help="samples for the layer-skip losses (0: block influence only)")
    i.add_argument("--out", required=True, help="scores file (.safetensors)")
    _add_parallel(i)
    i.set_defaults(func=cmd_importance)

    r = sub.add_parser("prune", help="prune to a target shape; writes a new checkpoint")
    r.add_argument("--load", required=True)
    r.add_argument("--scores", help="importance scores of --load (not needed for --drop-layers)")
    r.add_argument("--out", required=True)
    r.add_argument("--target-hidden", type=int)
    r.add_argument("--target-ffn", type=int)
    r.add_argument("--target-heads", type=int)
    r.add_argument("--target-groups", type=int)
    r.add_argument("--target-layers", type=int)
    r.add_argument("--drop-layers", help="comma-separated 0-based layer indices")
    r.add_argument("--depth-metric", default="auto", choices=DEPTH_METRICS,
                   help="how --target-layers picks layers (auto: the contiguous block with the "
                   "smallest LM-loss rise when the scores have it, else single-layer skip loss)")
    r.add_argument("--no-norm-rescale", action="store_true",
                   help="slice RMSNorm weights without the sqrt(h/h') rescale")
    r.add_argument("--hf-out", help="also export the pruned model as a Hugging Face directory")
    _add_parallel(r)
    r.set_defaults(func=cmd_prune)

    d = sub.add_parser("distill", help="knowledge-distillation retraining of a student")
    d.add_argument("--teacher", required=True)
    d.add_argument("--student", required=True)
    d.add_argument("--data", nargs="+", required=True,
                   help="indexed-dataset prefixes, optionally weighted: W1 PREFIX1 W2 PREFIX2")
    d.add_argument("--valid-data", nargs="+", help="validation prefixes (default: --split)")
    d.add_argument("--save", required=True, help="run directory (resumes from its latest)")
    d.add_argument("--train-iters", type=int, required=True)
    d.add_argument("--global-batch-size", type=int, default=8)
    d.add_argument("--seq-length", type=int, default=512)
    d.add_argument("--lr", type=float, default=1e-4)
    d.add_argument("--min-lr", type=float, default=1e-5)
    d.add_argument("--warmup-iters", type=int, default=0)
    d.add_argument("--weight-decay", type=float, default=0.01)
    d.add_argument("--clip-grad", type=float, default=1.0)
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--kd-weight", type=float, default=1.0)
    d.add_argument("--lm-weight", type=float, default=0.0,
                   help="weight of the LM cross-entropy (--kd-weight 0 --lm-weight 1: plain CE)")
    d.add_argument("--hidden-weight", type=float, default=0.0,
                   help="weight of the cosine loss between final hidden states, the teacher's "
                        "mapped onto the channels pruning kept")
    d.add_argument("--top-k", type=int, default=0,
                   help="KD over the teacher's k largest logits only (0: whole vocabulary)")
    d.add_argument("--eval-interval", type=int, default=0)
    d.add_argument("--eval-iters", type=int, default=2)
    d.add_argument("--save-interval", type=int, default=0)
    d.add_argument("--keep-last", type=int, default=2)
    d.add_argument("--log-interval", type=int, default=1)
    d.add_argument("--seed", type=int, default=1234)
    d.add_argument("--split", default="98,2,0")
    d.add_argument("--use-distributed-optimizer", action=argparse.BooleanOptionalAction,
                   default=None, help="default: on with CUDA, off on CPU")
    _add_parallel(d)
    d.set_defaults(func=cmd_distill)

    s = sub.add_parser("search", help="candidate shapes at a parameter budget, each pruned and "
                                      "briefly distilled, ranked")
    s.add_argument("--load", required=True, help="the teacher checkpoint")
    s.add_argument("--scores", required=True, help="its importance scores")
    s.add_argument("--target-params", type=float, required=True)
    s.add_argument("--tolerance", type=float, default=0.05)
    s.add_argument("--axes", nargs="+", default=list(SEARCH_AXES), choices=SEARCH_AXES)
    s.add_argument("--candidates", type=int, default=4)
    s.add_argument("--step", type=int, default=64, help="width granularity (hidden, ffn)")
    s.add_argument("--kd-tokens", type=int, default=65536, help="distillation tokens each")
    s.add_argument("--data", nargs="+", required=True, help="training indexed-dataset prefixes")
    s.add_argument("--valid-data", nargs="+", required=True, help="validation prefixes")
    s.add_argument("--global-batch-size", type=int, default=8)
    s.add_argument("--seq-length", type=int, default=256)
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--min-lr", type=float, default=1e-5)
    s.add_argument("--eval-iters", type=int, default=4)
    s.add_argument("--seed", type=int, default=1234)
    s.add_argument("--out", required=True, help="search directory (resumes)")
    _add_parallel(s)
    s.set_defaults(func=cmd_search)

    rn = sub.add_parser("run", help="the whole pipeline from a YAML config, stages cached")
    rn.add_argument("config", help="YAML file (see configs/)")
    rn.add_argument("--dry-run", action="store_true",
                    help="validate, print the shapes, parameter counts and commands; run nothing")
    rn.add_argument("--world-size", type=int,
                    help="with --dry-run: the number of processes to plan for (default: tp*pp)")
    rn.set_defaults(func=cmd_run)

    g = sub.add_parser("generate", help="greedy continuation of a prompt")
    g.add_argument("--load", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    _add_parallel(g)
    g.set_defaults(func=cmd_generate)
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
