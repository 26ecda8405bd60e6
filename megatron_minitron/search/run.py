"""`minitron search`: prune every candidate shape from the cached scores, distill each briefly
with the same tokens and seed, rank by held-out loss after that short KD.

Each candidate is `minitron prune` then `minitron distill` into OUT/<name>/ (all ranks, one
candidate after another); OUT/<name>/result.json marks it done, so an interrupted search resumes
with the next unfinished one (a half-finished distillation resumes from its checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_minitron import stages
from megatron_minitron.checkpoint.atomic import write_text
from megatron_minitron.checkpoint.mcore import is_mcore_dir
from megatron_minitron.config import ConfigError, ModelConfig, ParallelConfig, prefixed
from megatron_minitron.distill.report import val_lm_first_last
from megatron_minitron.distill.train import DistillConfig, iteration_dir
from megatron_minitron.options import fraction_of, option, parse_size
from megatron_minitron.prune.plan import strategy_option
from megatron_minitron.runtime.distributed import barrier, is_main_rank
from megatron_minitron.search.space import (
    AXES,
    Candidate,
    enumerate_shapes,
    heterogeneous_twins,
    spread,
)

log = logging.getLogger("minitron")


@dataclass
class SearchConfig:
    target_params: float | None = option(None, parse=parse_size, render=repr,
                                         metavar="N|FRACTION",
                                         help="parameters of the pruned model: a count (95M, "
                                              "4.5B, 95e6) or a fraction of the teacher's (0.7, "
                                              "70%%)")
    target_active_params: float | None = option(
        None, parse=parse_size, render=repr, metavar="N|FRACTION",
        help="instead of --target-params, for a mixture of experts: the parameters one token "
             "goes through (attention, router, top-k experts, shared expert, embeddings), a "
             "count or a fraction of the teacher's")
    tolerance: float = option(0.05, help="candidates within this fraction of the target")
    axes: tuple[str, ...] = option(AXES, choices=AXES, help="axes the candidates prune")
    candidates: int = option(4, help="candidates pruned and distilled")
    strategy: str = strategy_option()
    step: int = option(64, help="width granularity (hidden, ffn)")
    heterogeneous: bool = option(
        False, help="also a heterogeneous candidate per distinct hidden and heads of the "
                    "candidates, at its parameter count: each layer's MLP width and attention "
                    "chosen by prune --heterogeneous (dense models)")
    kd_tokens: int = option(65536, help="distillation tokens per candidate")
    kd: DistillConfig = option(
        factory=lambda: DistillConfig(train_iters=1, seq_length=256, eval_iters=4),
        skip=("train_iters",), help="the short distillation of every candidate (its "
                                    "iterations: --kd-tokens / (global batch x sequence))")

    @property
    def given(self) -> bool:
        return self.target_params is not None or self.target_active_params is not None

    def budget(self) -> tuple[float, bool]:
        """(target count or fraction, whether it counts active parameters)."""
        if (self.target_params is None) == (self.target_active_params is None):
            raise ConfigError("give one of --target-params and --target-active-params")
        if self.target_params is not None:
            return self.target_params, False
        return self.target_active_params, True

    @property
    def train_iters(self) -> int:
        return max(1, self.kd_tokens // (self.kd.global_batch_size * self.kd.seq_length))


def plan(teacher: ModelConfig, cfg: SearchConfig, tp: int) -> list[Candidate]:
    target, active = cfg.budget()
    shapes = enumerate_shapes(teacher, target, cfg.tolerance, tuple(cfg.axes), cfg.step, tp,
                              active=active)
    chosen = spread(shapes, cfg.candidates, teacher)
    if cfg.heterogeneous:
        if teacher.moe or teacher.hybrid:
            raise ConfigError("--heterogeneous: per-layer widths are for dense transformers; "
                              f"this {teacher.family} model has experts or Mamba layers")
        chosen += heterogeneous_twins(chosen)
    return chosen


def kd_config(cfg: SearchConfig) -> DistillConfig:
    """The short distillation every candidate gets."""
    return dataclasses.replace(cfg.kd, train_iters=cfg.train_iters)


def run_candidate(c: Candidate, teacher: Path, scores: Path, t: ModelConfig, cfg: SearchConfig,
                  data: list[str], valid: list[str], out: Path, parallel: ParallelConfig
                  ) -> dict:
    d = out / c.name
    done = d / "result.json"
    if done.is_file():
        log.info("search: %s finished earlier, skipped", c.name)
        return json.loads(done.read_text())
    pruned = d / "pruned"
    if is_main_rank():
        d.mkdir(parents=True, exist_ok=True)
        if pruned.exists() and not is_mcore_dir(pruned):
            shutil.rmtree(pruned)
    barrier()
    with prefixed(f"search: candidate {c.name}"):
        if not is_mcore_dir(pruned):
            # a heterogeneous candidate makes its own per-layer choices (no --strategy)
            target = c.target(t) if c.heterogeneous else dataclasses.replace(
                c.target(t), strategy=cfg.strategy)
            stages.prune(teacher, pruned, target, parallel, scores=scores)
        stages.distill(teacher, pruned, data, d / "distill", kd_config(cfg), parallel, valid)
    before, after = val_lm_first_last(d / "distill")
    result = {**asdict(c), "name": c.name, "loss_pruned": before, "loss_kd": after,
              "checkpoint": str(iteration_dir(d / "distill", cfg.train_iters))}
    if c.heterogeneous:  # the program may stay under its budget
        from megatron_minitron.checkpoint import mcore

        result.update(budget=c.params, params=mcore.read_meta(pruned).model.num_parameters())
    if is_main_rank():
        write_text(done, json.dumps(result, indent=2))
    barrier()
    return result


def search(load: Path, scores: Path, data: list[str], valid_data: list[str], out: Path,
           settings: SearchConfig, parallel: ParallelConfig | None = None) -> dict:
    """The search stage (`minitron search`): candidate shapes of `settings.target_params`, each
    pruned and briefly distilled, ranked by their loss after KD. Resumes: finished candidates
    are kept. Returns the report (also results.json and ranking.md in `out`)."""
    parallel = parallel or ParallelConfig()
    parallel.check_sequence(settings.kd.seq_length)
    settings.budget()
    with stages.locked(Path(out)):  # a directory this leaves empty is removed
        return _search(Path(load), Path(scores), settings, data, valid_data, Path(out), parallel)


def _search(teacher: Path, scores: Path, cfg: SearchConfig, data: list[str], valid: list[str],
            out: Path, parallel: ParallelConfig) -> dict:
    from megatron_minitron.checkpoint import mcore

    t = mcore.read_meta(teacher).model
    candidates = plan(t, cfg, parallel.tp)
    if is_main_rank():
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "plan.json", json.dumps([asdict(c) | {"name": c.name}
                                                  for c in candidates], indent=2))
    target, active = cfg.budget()
    target = fraction_of(target, t.num_parameters(active=active))  # 0.7: 70% of the teacher's
    log.info("search: %d candidates of %s %sparameters +/- %.0f%%: %s", len(candidates),
             f"{target:,.0f}", "active " if active else "", cfg.tolerance * 100,
             ", ".join(c.name for c in candidates))
    results = [run_candidate(c, teacher, scores, t, cfg, data, valid, out, parallel)
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
    lines += [f"| {i + 1} | {r['name']} | {_params(r)} | {r['loss_pruned']:.4f} "
              f"({by_pruned[r['name']]}) | {r['loss_kd']:.4f} |" for i, r in enumerate(results)]
    return "\n".join(lines)


def _params(r: dict) -> str:
    if r.get("experts"):
        return f"{r['params']:,} ({r['active_params']:,} active)"
    return f"{r['params']:,}"


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
