"""How the axes are pruned together, and the choice of a strategy on calibration data.

`--order`: the paper ranks every axis on the unpruned model and cuts them at once (`joint`).
`depth-first` cuts the layers, recomputes the width scores on the shallower model and then cuts
width; `width-first` cuts width, then picks the layers by LM loss on the narrower model. Both are
composed into one plan over the source model, so the pruned checkpoint is still written by one
`prune_model` from the original weights.

`--strategy auto`: a few candidate plans (head metric, heads inside groups or as whole groups,
the expert metric and neurons, norm rescale on/off, then the order) are pruned in memory and
scored by LM loss on calibration windows that importance did not use; the lowest wins. Nothing
is tuned on evaluation text.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_minitron.config import ConfigError, ModelConfig, ParallelConfig
from megatron_minitron.importance.scores import EXPERT_METRICS, HEAD_METRICS, Scores
from megatron_minitron.options import fraction_of
from megatron_minitron.prune.plan import (
    EXPERT_NEURONS,
    ORDERS,
    PrunePlan,
    PruneTarget,
    make_plan,
    pruned_config,
)
from megatron_minitron.prune.run import prune_model

log = logging.getLogger("minitron")


def split_target(cfg: ModelConfig, t: PruneTarget) -> tuple[PruneTarget, PruneTarget]:
    """(depth only, width only): the width target in absolute sizes of the final shape, so a
    parameter budget means the same whichever is cut first."""
    final = pruned_config(cfg, t)
    depth = dataclasses.replace(t, params=None, hidden=None, ffn=None, heads=None, groups=None,
                                experts=None, moe_ffn=None, shared_ffn=None, mamba_heads=None,
                                mamba_head_dim=None)
    mlp = (dict(experts=final.num_moe_experts, moe_ffn=final.moe_ffn_hidden_size,
                shared_ffn=final.moe_shared_ffn_hidden_size) if cfg.moe else
           dict(ffn=final.ffn_hidden_size))
    width = dataclasses.replace(t, params=None, layers=None, drop_layers=None,
                                hidden=final.hidden_size, heads=final.num_attention_heads,
                                groups=final.num_query_groups, **mlp)
    return depth, width


def compose(first: PrunePlan, second: PrunePlan) -> PrunePlan:
    """`second` (made on `first.model`) expressed over `first`'s source."""
    layers = [first.layers[j] for j in second.layers]
    pairs = list(zip(layers, second.layers, strict=True))

    def then(kept: dict, again: dict) -> dict:  # `again` picks among `kept`'s survivors
        return {i: kept[i][again[j]] for i, j in pairs if j in again}

    # MoE: new expert e is first's expert second.experts[j][e], whose neurons are a row of
    # first.ffn; second.ffn[j][e] picks among that row
    ffn = ({i: first.ffn[i][second.experts[j]].gather(1, second.ffn[j]) for i, j in pairs}
           if second.experts else then(first.ffn, second.ffn))
    return PrunePlan(second.model, layers, first.hidden[second.hidden],
                     heads=then(first.heads, second.heads), ffn=ffn,
                     experts=then(first.experts, second.experts),
                     shared_ffn=then(first.shared_ffn, second.shared_ffn),
                     mamba_heads=then(first.mamba_heads, second.mamba_heads),
                     mamba_dims=then(first.mamba_dims, second.mamba_dims),
                     norm_rescale=first.norm_rescale, notes=first.notes + second.notes)


@dataclass
class Calibration:
    """What re-scoring and candidate selection run on: the importance windows (as the scores
    file records them) and, after them in the same seeded draw, windows importance never saw."""
    samples: torch.Tensor  # [N, L+1], the importance samples
    select: torch.Tensor  # [M, L+1], disjoint from `samples`
    scores_meta: dict
    micro_batch_size: int = 1


def calibration(load, scores_meta: dict, select: int) -> Calibration:
    """The importance windows of `scores_meta` again, and `select` more from the same draw."""
    from megatron_minitron.data.calibration import sample_windows, token_stream
    from megatron_minitron.data.tokenizer import load_tokenizer

    m = scores_meta
    tok = load_tokenizer(Path(load))
    ids = token_stream([Path(f) for f in m["data"]], tok, m["model"]["vocab_size"],
                       m.get("json_key", "text"))
    draw = dict(seq_length=m["seq_length"], seed=m["seed"], prefix=tok.prefix)
    if select < 1:
        raise ConfigError("--select-samples must be >= 1")
    return Calibration(sample_windows(ids, m["samples"], **draw),
                       sample_windows(ids, select, skip=m["samples"], **draw), m,
                       m.get("micro_batch_size", 1))


def _rescore(chunks, model: ModelConfig, cal: Calibration, depth_blocks: tuple[int, ...],
             head_losses: bool) -> Scores:
    """Importance of a partly pruned model: width sums (and the head-masking losses when heads
    are ranked by them) when `depth_blocks` is empty, else only the depth losses on the depth
    samples."""
    from megatron_minitron.importance.run import ImportanceConfig, compute_importance

    m = cal.scores_meta
    if depth_blocks:
        n = max(1, m.get("depth_samples", 0))
        cfg = ImportanceConfig(samples=n, seq_length=m["seq_length"], depth_samples=n,
                               block_sizes=depth_blocks, micro_batch_size=cal.micro_batch_size)
        return compute_importance(chunks, model, cal.samples[:n], cfg)
    cfg = ImportanceConfig(samples=m["samples"], seq_length=m["seq_length"], depth_samples=0,
                           head_samples=m.get("head_samples", 0) if head_losses else 0,
                           micro_batch_size=cal.micro_batch_size)
    return compute_importance(chunks, model, cal.samples, cfg)


def ordered_plan(chunks, cfg: ModelConfig, t: PruneTarget, scores: Scores, cal: Calibration | None,
                 parallel: ParallelConfig) -> PrunePlan:
    """The plan for `t.order`; depth-first and width-first prune the first step in memory and
    re-score it (the seconds that took go into the plan's notes)."""
    depth, width = split_target(cfg, t)
    layers = pruned_config(cfg, depth).num_layers
    cuts_width = pruned_config(cfg, width).num_parameters() < cfg.num_parameters()
    if t.order == "joint" or layers == cfg.num_layers or not cuts_width or (
            t.order == "width-first" and t.drop_layers):  # fixed layers: nothing to re-choose
        return make_plan(cfg, t, scores)
    if cal is None:
        raise ConfigError(f"--order {t.order} re-scores the partly pruned model: it needs the "
                          "model loaded (not --dry-run)")
    first_t, second_t = (depth, width) if t.order == "depth-first" else (width, depth)
    first = make_plan(cfg, first_t, scores)
    start = time.time()
    partial = prune_model(chunks, cfg, first, parallel)
    # depth-first: width sums on the shallower model; width-first: the skip losses the depth
    # metric reads (single layers and the block of the dropped size) on the narrower one
    blocks = () if t.order == "depth-first" else tuple(sorted({1, cfg.num_layers - layers}))
    rescored = _rescore(partial, first.model, cal, blocks, t.head_metric == "loss")
    del partial
    gc.collect()
    second = make_plan(first.model, second_t, rescored)
    plan = compose(first, second)
    plan.notes.append(f"order {t.order}: re-scored the {'narrower' if blocks else 'shallower'} "
                      f"model in {time.time() - start:.1f} s")
    return plan


def choices(cfg: ModelConfig, t: PruneTarget, scores: Scores) -> list[list[dict]]:
    """What auto may change, one list of alternatives per choice, only where the target prunes
    that axis: the head metric (those the scores hold), heads inside groups or as whole groups,
    the expert metric and neurons, the norm rescale, the order."""
    new = pruned_config(cfg, t)
    per_group = cfg.num_attention_heads // cfg.num_query_groups
    out = []
    if new.num_attention_heads < cfg.num_attention_heads:
        out.append([{"head_metric": m} for m in HEAD_METRICS
                    if m != "loss" or "heads.mask_loss" in scores.tensors])
        whole = new.num_attention_heads // per_group
        if t.groups is None and new.num_attention_heads % per_group == 0 and \
                whole < cfg.num_query_groups:
            out.append([{"groups": None, "heads": t.heads}, {"groups": whole, "heads": None}])
    experts, neurons = _expert_cuts(cfg, new)
    if experts:
        out.append([{"expert_metric": m} for m in EXPERT_METRICS])
    if neurons:
        out.append([{"expert_neurons": m} for m in EXPERT_NEURONS])
    if cfg.traits.normalization == "RMSNorm" and (new.hidden_size < cfg.hidden_size or
                                                  new.mamba_inner < cfg.mamba_inner):
        out.append([{"norm_rescale": True}, {"norm_rescale": False}])
    width = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
             "num_moe_experts", "moe_ffn_hidden_size", "moe_shared_ffn_hidden_size",
             "mamba_heads", "mamba_head_dim")
    if new.num_layers < cfg.num_layers and any(getattr(new, k) != getattr(cfg, k) for k in width):
        out.append([{"order": o} for o in ORDERS])
    return out


def _expert_cuts(cfg: ModelConfig, new: ModelConfig) -> tuple[bool, bool]:
    """Whether `new` drops experts, and whether it narrows them (where the expert metric and
    --expert-neurons matter)."""
    return (cfg.moe and new.num_moe_experts < cfg.num_moe_experts,
            cfg.moe and new.mlp_width < cfg.mlp_width)


def describe(cfg: ModelConfig, t: PruneTarget) -> str:
    grouping = f"{t.groups} whole groups" if t.groups else "heads in groups"
    cuts_experts, cuts_neurons = _expert_cuts(cfg, pruned_config(cfg, t))
    experts = (f", expert metric {t.expert_metric}" if cuts_experts else "") + \
        (f", expert neurons {t.expert_neurons}" if cuts_neurons else "")
    return (f"order {t.order}, head metric {t.head_metric}, {grouping}{experts}, norm rescale "
            f"{'on' if t.norm_rescale else 'off'}")


def choose_plan(chunks, cfg: ModelConfig, t: PruneTarget, scores: Scores, cal: Calibration,
                parallel: ParallelConfig) -> tuple[PrunePlan, list[dict]]:
    """`--strategy auto`: the flags as given, then one choice at a time (coordinate descent: each
    alternative with the others at the best so far), so the candidates grow with the sum, not
    the product, of the alternatives. Each is pruned in memory and scored on `cal.select`.
    Returns the winning plan and the table of every candidate."""
    from megatron_minitron.evaluate.perplexity import evaluate_windows

    if t.params is not None:  # a fraction would change meaning once groups change the count
        t = dataclasses.replace(t, params=fraction_of(t.params, cfg.num_parameters()))
    table: list[dict] = []
    best: tuple[float, PrunePlan, PruneTarget] | None = None

    def score(target: PruneTarget) -> None:
        nonlocal best
        plan = ordered_plan(chunks, cfg, target, scores, cal, parallel)
        pruned = prune_model(chunks, cfg, plan, parallel)
        loss = evaluate_windows(pruned, cal.select, cal.micro_batch_size).loss
        del pruned
        gc.collect()
        table.append({"strategy": describe(cfg, target), "parameters": plan.model.num_parameters(),
                      "shape": plan.summary(), "loss": loss})
        log.info("auto: %s: calibration loss %.4f", describe(cfg, target), loss)
        if best is None or loss < best[0]:
            best = (loss, plan, target)

    score(t)
    for alternatives in choices(cfg, t, scores):
        for change in alternatives:
            target = dataclasses.replace(best[2], **change)
            try:
                pruned_config(cfg, target).check_parallel(parallel.tp, 1, parallel.ep)
            except ConfigError:  # e.g. whole groups that this TP size does not divide
                continue
            if describe(cfg, target) not in {r["strategy"] for r in table}:
                score(target)
    loss, plan, winner = best
    plan.notes.append(f"strategy auto: {describe(cfg, winner)} had the lowest LM loss "
                      f"({loss:.4f}) on {len(cal.select)} calibration windows importance did "
                      f"not use, of {len(table)} candidates")
    return plan, table
