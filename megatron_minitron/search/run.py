"""`minitron search`: prune every candidate shape from the cached scores, distill each briefly
with the same tokens and seed, rank by held-out loss after that short KD.

Each candidate is `minitron prune` then `minitron distill` into OUT/<name>/ (all ranks, one
candidate after another); OUT/<name>/result.json marks it done, so an interrupted search resumes
with the next unfinished one (a half-finished distillation resumes from its checkpoint).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_minitron.checkpoint.atomic import write_text
from megatron_minitron.config import ModelConfig, stage_error
from megatron_minitron.distill.report import val_lm_first_last
from megatron_minitron.runtime.distributed import barrier, is_main_rank
from megatron_minitron.search.space import AXES, Candidate, enumerate_shapes, spread

log = logging.getLogger("minitron")


@dataclass
class SearchConfig:
    target_params: float
    tolerance: float = 0.05
    axes: tuple[str, ...] = AXES
    candidates: int = 4
    step: int = 64  # hidden / MLP widths in multiples of this
    kd_tokens: int = 65536  # per candidate
    global_batch_size: int = 8
    seq_length: int = 256
    lr: float = 1e-4
    min_lr: float = 1e-5
    eval_iters: int = 4
    seed: int = 1234

    @property
    def train_iters(self) -> int:
        return max(1, self.kd_tokens // (self.global_batch_size * self.seq_length))


def plan(teacher: ModelConfig, cfg: SearchConfig, tp: int) -> list[Candidate]:
    shapes = enumerate_shapes(teacher, cfg.target_params, cfg.tolerance, tuple(cfg.axes),
                              cfg.step, tp)
    return spread(shapes, cfg.candidates, teacher)


def _verb(argv: list[str]) -> None:
    from megatron_minitron.cli import run_verb

    rc = run_verb(argv)
    if rc:
        raise stage_error(rc, f"search: `minitron {argv[0]}` failed for a candidate; rerun to "
                              "resume")


def run_candidate(c: Candidate, teacher: Path, scores: Path, t: ModelConfig, cfg: SearchConfig,
                  data: list[str], valid: list[str], out: Path, parallel: list[str]) -> dict:
    d = out / c.name
    done = d / "result.json"
    if done.is_file():
        log.info("search: %s finished earlier, skipped", c.name)
        return json.loads(done.read_text())
    pruned = d / "pruned"
    if is_main_rank():
        d.mkdir(parents=True, exist_ok=True)
        if pruned.exists() and not (pruned / "minitron.json").is_file():
            shutil.rmtree(pruned)
    barrier()
    target = c.target(t)
    if not (pruned / "minitron.json").is_file():
        flags = [f"--target-{k}" for k in ("hidden", "ffn", "heads", "layers")]
        values = (target.hidden, target.ffn, target.heads, target.layers)
        _verb(["prune", "--load", str(teacher), "--scores", str(scores), "--out", str(pruned),
               *[x for f, v in zip(flags, values, strict=True) if v is not None
                 for x in (f, str(v))], *parallel])
    _verb(["distill", "--teacher", str(teacher), "--student", str(pruned), "--data", *data,
           "--valid-data", *valid, "--save", str(d / "distill"), "--train-iters",
           str(cfg.train_iters), "--global-batch-size", str(cfg.global_batch_size),
           "--seq-length", str(cfg.seq_length), "--lr", str(cfg.lr), "--min-lr", str(cfg.min_lr),
           "--eval-iters", str(cfg.eval_iters), "--seed", str(cfg.seed), *parallel])
    before, after = val_lm_first_last(d / "distill")
    result = {**asdict(c), "name": c.name, "loss_pruned": before, "loss_kd": after,
              "checkpoint": str(d / "distill" / f"iter_{cfg.train_iters:07d}")}
    if is_main_rank():
        write_text(done, json.dumps(result, indent=2))
    barrier()
    return result


def search(teacher: Path, scores: Path, cfg: SearchConfig, data: list[str], valid: list[str],
           out: Path, tp: int = 1, parallel: list[str] | None = None) -> dict:
    from megatron_minitron.checkpoint import mcore

    t = mcore.read_meta(teacher).model
    candidates = plan(t, cfg, tp)
    if is_main_rank():
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "plan.json", json.dumps([asdict(c) | {"name": c.name}
                                                  for c in candidates], indent=2))
    log.info("search: %d candidates of %d parameters +/- %.0f%%: %s", len(candidates),
             cfg.target_params, cfg.tolerance * 100, ", ".join(c.name for c in candidates))
    results = [run_candidate(c, teacher, scores, t, cfg, data, valid, out, parallel or [])
               for c in candidates]
    results.sort(key=lambda r: (r["loss_kd"], r["name"]))
    report = {"config": asdict(cfg), "teacher": str(teacher), "ranking": results,
              "best": results[0]}
    if is_main_rank():
        write_outputs(out, report)
    return report


def ranking_table(results: list[dict]) -> str:
    by_pruned = {r["name"]: i + 1 for i, r in enumerate(sorted(results,
                                                                 key=lambda r: r["loss_pruned"]))}
    lines = ["| rank after KD | candidate | parameters | loss after pruning (rank) | "
             "loss after KD |", "|---|---|---|---|---|"]
    lines += [f"| {i + 1} | {r['name']} | {r['params']:,} | {r['loss_pruned']:.4f} "
              f"({by_pruned[r['name']]}) | {r['loss_kd']:.4f} |" for i, r in enumerate(results)]
    return "\n".join(lines)


def write_outputs(out: Path, report: dict) -> None:
    write_text(out / "results.json", json.dumps(report, indent=2))
    table = ranking_table(report["ranking"])
    write_text(out / "ranking.md", table + "\n")
    winner = Path(report["best"]["checkpoint"]).resolve()
    for link, target in (("best", winner), ("best_pruned", winner.parent.parent / "pruned")):
        if (out / link).is_symlink() or (out / link).exists():
            (out / link).unlink()
        (out / link).symlink_to(target, target_is_directory=True)
    _plot(report["ranking"], out / "search.png")
    print(table)
    print(f"best: {report['best']['name']} -> {out / 'best'}")


def _plot(results: list[dict], png: Path) -> None:
    from megatron_minitron.plots import pyplot, save

    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r in results:
        x = r["params"] / 1e6
        ax.plot([x, x], [r["loss_pruned"], r["loss_kd"]], "-", color="0.7")
        ax.scatter([x], [r["loss_pruned"]], marker="x", color="tab:red")
        ax.scatter([x], [r["loss_kd"]], marker="o", color="tab:blue")
        ax.annotate(r["name"], (x, r["loss_kd"]), fontsize=7, textcoords="offset points",
                    xytext=(4, -10))
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("held-out loss (x: pruned, o: after short KD)")
    ax.grid(alpha=0.3)
    save(fig, png)
