"""`minitron eval --tasks ...`: run each task on the loaded (sharded) model, one results dict.

Task names: `perplexity` (the --data text, rolling windows with --stride), `cloze=FILE.jsonl`,
`choice=FILE.jsonl`, and the built-ins `shakespeare-cloze`, `shakespeare-next`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_minitron.config import ConfigError
from megatron_minitron.data.tokenizer import Tokenizer
from megatron_minitron.evaluate import tasks as T
from megatron_minitron.evaluate.loglik import encode_pair, score
from megatron_minitron.options import option


@dataclass
class EvalConfig:
    tasks: list[str] = option(factory=lambda: ["perplexity"],
                              help="perplexity, cloze=FILE.jsonl, choice=FILE.jsonl, "
                                   "shakespeare-cloze, shakespeare-next")
    seq_length: int = option(512, help="tokens per window or request")
    stride: int | None = option(None, help="perplexity: rolling windows every STRIDE tokens "
                                           "(default: disjoint windows)")
    max_windows: int | None = option(None, help="perplexity: at most this many windows")
    micro_batch_size: int = option(1, help="windows or requests per forward pass")
    num_fewshot: int = option(0, help="multiple-choice: examples shown before each question")
    limit: int | None = option(None, help="first N items of each task")
    seed: int = option(1234, help="few-shot examples and built-in task items")
    lm_eval: list[str] | None = option(None, metavar="TASK",
                                       help="lm-eval-harness tasks run through the adapter "
                                            "(needs lm-eval)")
    lm_eval_include: str | None = option(None, metavar="DIR",
                                         help="directory of local lm-eval task YAMLs")


def parse_task(spec: str) -> tuple[str, Path | None]:
    """`perplexity`, a built-in name, or KIND=FILE with KIND cloze|choice; checked up front."""
    kind, _, file = spec.partition("=")
    if kind in ("perplexity", *T.BUILTIN_TASKS) and not file:
        return kind, None
    if kind in ("cloze", "choice") and file:
        if not Path(file).is_file():
            raise ConfigError(f"task {spec}: {file} not found")
        return kind, Path(file)
    raise ConfigError(f"unknown task {spec!r}: perplexity, cloze=FILE, choice=FILE, "
                      f"{', '.join(T.BUILTIN_TASKS)}")


def task_rows(kind: str, file: Path | None, cfg: EvalConfig) -> list[dict]:
    rows = T.builtin_rows(kind, seed=cfg.seed) if file is None else T.read_jsonl(file)
    return rows[:cfg.limit] if cfg.limit else rows


def run_task(chunks, tok: Tokenizer, kind: str, rows: list[dict], cfg: EvalConfig) -> dict:
    """Metrics of one cloze or multiple-choice task."""
    if kind in ("cloze", "shakespeare-cloze"):
        reqs = [encode_pair(tok, c, x) for c, x in T.cloze_items(rows)]
        return T.cloze_metrics(score(chunks, reqs, cfg.seq_length, cfg.micro_batch_size))
    items = T.with_fewshot(T.choice_items(rows), cfg.num_fewshot, cfg.seed)
    results = score(chunks, T.choice_requests(tok, items), cfg.seq_length, cfg.micro_batch_size)
    return T.choice_metrics(items, [ll for ll, _ in results]) | {"num_fewshot": cfg.num_fewshot}


def table(results: dict[str, dict]) -> str:
    lines = [f"{'task':<28} {'metric':<11} {'value':>10}"]
    for name, metrics in results.items():
        for k, v in metrics.items():
            if k not in ("items", "num_fewshot", "tokens", "windows", "seconds"):
                lines.append(f"{name:<28} {k:<11} {v:>10.4f}")
    return "\n".join(lines)
