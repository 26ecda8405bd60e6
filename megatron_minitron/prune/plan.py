"""Which units survive: targets are validated, then every axis is ranked from the scores.

Pure functions of (model config, scores, target); all ranks compute the same plan. Indices are
global (TP=1 numbering) and sorted, so kept units keep their original order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from megatron_minitron.config import ConfigError, ModelConfig
from megatron_minitron.importance.scores import EXPERT_METRICS, HEAD_METRICS, Scores
from megatron_minitron.options import fraction_of, option, parse_bytes, parse_size

DEPTH_METRICS = ("auto", "block", "skip_loss", "block_influence")
ORDERS = ("joint", "depth-first", "width-first")  # see prune/strategy.py
STRATEGIES = ("given", "auto")
EXPERT_NEURONS = ("own", "common")


def strategy_option():
    """--strategy, for prune and for every search candidate."""
    return option("given", choices=STRATEGIES,
                  help="given: prune as the flags say; auto: prune candidate strategies (head "
                       "metric, heads in groups or whole groups, expert metric and neurons, norm "
                       "rescale, order) in memory and keep the lowest LM loss on calibration "
                       "windows importance did not use")


@dataclass
class PruneTarget:
    params: float | None = option(
        None, flag="--target-params", parse=parse_size, render=repr,
        metavar="N|FRACTION",
        help="parameters of the pruned model, a count (95M, 4.5B) or a fraction (0.7, 70%%): "
             "hidden and MLP (each expert's, under MoE) shrunk by about one ratio (hidden by "
             "it, the MLP to meet the count), "
             "as the papers' Minitron-8B and MN-Minitron-8B "
             "(with --target-layers/--drop-layers/--target-heads/--target-groups as given)")
    hidden: int | None = option(None, flag="--target-hidden", help="embedding channels kept")
    ffn: int | None = option(None, flag="--target-ffn", help="MLP neurons kept per layer")
    heads: int | None = option(None, flag="--target-heads", help="attention heads kept per layer")
    groups: int | None = option(None, flag="--target-groups",
                                help="query groups (KV heads) kept per layer")
    layers: int | None = option(None, flag="--target-layers", help="layers kept")
    experts: int | None = option(None, flag="--target-experts",
                                 help="MoE: experts kept per layer, the lowest-ranked dropped "
                                      "with their router rows (at least the router's top-k)")
    moe_ffn: int | None = option(None, flag="--target-moe-ffn",
                                 help="MoE: neurons kept in each expert, each expert keeping "
                                      "its own highest-scored ones")
    shared_ffn: int | None = option(None, flag="--target-shared-ffn",
                                    help="MoE: neurons kept in the shared expert (Qwen2-MoE)")
    mamba_heads: int | None = option(
        None, flag="--target-mamba-heads",
        help="hybrid models: Mamba heads kept per Mamba layer, the same number in each group "
             "(its B and C stay whole), each group keeping its highest-scored heads")
    mamba_head_dim: int | None = option(
        None, flag="--target-mamba-head-dim",
        help="hybrid models: channels kept per Mamba head, the same ones in every head of a layer")
    drop_layers: list[int] | None = option(
        None, parse=lambda s: [int(i) for i in s.split(",") if i.strip()],
        render=lambda v: ",".join(map(str, v)), metavar="I,J,...",
        help="drop these 0-based layers (no scores needed)")
    depth_metric: str = option("auto", choices=DEPTH_METRICS,
                               help="how --target-layers picks layers (auto: the contiguous block "
                                    "with the smallest LM-loss rise when the scores have it, "
                                    "else single-layer skip loss)")
    head_metric: str = option("activation", choices=tuple(HEAD_METRICS),
                              help="how heads and query groups are ranked: the paper's "
                                   "activation norm of each head, the norm of what it writes "
                                   "through the output projection (better where a norm follows "
                                   "attention, as in Gemma), or the LM-loss rise when it is "
                                   "masked (importance --head-samples)")
    expert_metric: str = option("output", choices=tuple(EXPERT_METRICS),
                                help="how experts are ranked: the L2 norm of their routed "
                                     "output summed over tokens (the peer's), the tokens "
                                     "routed to them, or the routing probability they got")
    expert_neurons: str = option("own", choices=EXPERT_NEURONS,
                                 help="how --target-moe-ffn picks neurons: each expert its own "
                                      "highest-scored, or the same ones in every expert, ranked "
                                      "by their token-weighted score over the experts (for "
                                      "experts upcycled from one dense MLP, whose neurons "
                                      "still correspond)")
    norm_rescale: bool = option(True, flag="--no-norm-rescale",
                                help="slice RMSNorm weights without the sqrt(h/h') rescale that "
                                     "keeps the pruned channels' share of the mean square")
    order: str = option("joint", choices=ORDERS,
                        help="joint: rank every axis on the unpruned model (the paper); "
                             "depth-first: cut layers, re-score width on the shallower model; "
                             "width-first: cut width, pick layers by LM loss on the narrower one")
    strategy: str = strategy_option()
    select_samples: int = option(8, help="with --strategy auto or --heterogeneous: calibration "
                                         "windows that score each candidate (drawn after "
                                         "importance's, disjoint)")
    heterogeneous: bool = option(
        False, help="each layer its own MLP width and attention kept or removed (Puzzle): every "
                    "layer's variants are scored by LM loss on calibration windows, and a "
                    "mixed-integer program picks one per layer under --target-params, "
                    "--target-memory and --target-latency (hidden, heads and groups stay "
                    "uniform, as --target-hidden/--target-heads/--target-groups say); "
                    "--target-ffn with --target-layers/--drop-layers name a homogeneous student "
                    "to start from, its size the budget unless one is given")
    refine_rounds: int = option(
        1, help="with --heterogeneous: rounds that re-score every layer's variants with the "
                "other layers as the student has them and keep the program's new choice only "
                "if it lowers the loss (each round costs one scoring pass)")
    layer_ffn_choices: list[float] = option(
        factory=lambda: [1.0, 0.75, 0.5, 0.25, 0.0],
        parse=lambda s: [float(x) for x in s.split(",") if x.strip()],
        render=lambda v: ",".join(f"{x:g}" for x in v), metavar="F,G,...",
        help="with --heterogeneous: the MLP widths a layer may keep, as fractions of the "
             "source's (0 removes the MLP; a layer with neither attention nor MLP is dropped)")
    target_memory: int | None = option(
        None, parse=parse_bytes, metavar="SIZE",
        help="with --heterogeneous: weights plus the KV cache at --budget-batch-size x "
             "--budget-seq-length, in the checkpoint's precision (300MB, 2GiB)")
    target_latency: float | None = option(
        None, metavar="MS",
        help="with --heterogeneous: milliseconds per forward of --budget-batch-size x "
             "--budget-seq-length tokens through the layers, from a table of every block variant "
             "measured on this machine when prune runs")
    budget_batch_size: int = option(1, help="sequences at which --target-memory and "
                                            "--target-latency are counted")
    budget_seq_length: int = option(2048, help="tokens per sequence at which --target-memory "
                                               "and --target-latency are counted")

    def names_homogeneous(self) -> bool:
        """Whether an MLP width or depth is given: with --heterogeneous, the student to start
        from."""
        return self.ffn is not None or self.layers is not None or bool(self.drop_layers)

    def budgeted(self) -> bool:
        return not all(b is None for b in (self.params, self.target_memory, self.target_latency))

    def needs_scores(self) -> bool:
        return any(v is not None for v in (self.params, self.hidden, self.ffn, self.heads,
                                           self.groups, self.layers, self.experts,
                                           self.moe_ffn, self.shared_ffn, self.mamba_heads,
                                           self.mamba_head_dim)) or self.heterogeneous


@dataclass
class PrunePlan:
    model: ModelConfig  # the pruned shape
    layers: list[int]  # kept source layers, in order; new layer i is source layer layers[i]
    hidden: torch.Tensor  # kept embedding channels
    heads: dict[int, torch.Tensor] = field(default_factory=dict)  # per kept source layer; the
    # kept query groups are those these heads belong to
    # kept MLP neurons; under MoE [new experts, neurons]: row j for new expert j
    ffn: dict[int, torch.Tensor] = field(default_factory=dict)
    experts: dict[int, torch.Tensor] = field(default_factory=dict)  # MoE; new expert j is
    # source expert experts[i][j]
    shared_ffn: dict[int, torch.Tensor] = field(default_factory=dict)  # shared-expert neurons
    # hybrid: per Mamba layer, kept heads (global numbers) and the head dimensions every kept
    # head keeps
    mamba_heads: dict[int, torch.Tensor] = field(default_factory=dict)
    mamba_dims: dict[int, torch.Tensor] = field(default_factory=dict)
    norm_rescale: bool = True  # see slicing: RMSNorm weights keep the pruned channels' share
    notes: list[str] = field(default_factory=list)  # how the choices were made, for the log

    def summary(self) -> str:
        m = self.model
        mlp = (f"{m.num_moe_experts} experts of {m.moe_ffn_hidden_size}" if m.moe else
               f"ffn per layer {m.layer_ffn}" if m.heterogeneous else f"ffn {m.ffn_hidden_size}")
        if m.moe_shared_ffn_hidden_size:
            mlp += f" + shared {m.moe_shared_ffn_hidden_size}"
        mamba = (f", Mamba {m.mamba_heads} heads of {m.mamba_head_dim} ({m.hybrid_pattern})"
                 if m.hybrid else "")
        attention = (f" (attention in {sum(m.layer_attention)} of {m.num_layers} layers)"
                     if m.heterogeneous else "")
        return (f"layers {m.num_layers}, hidden {m.hidden_size}, {mlp}, "
                f"heads {m.num_attention_heads} in {m.num_query_groups} groups{attention}{mamba}")


def _check_range(name: str, value: int | None, original: int) -> None:
    if value is not None and not 1 <= value <= original:
        raise ConfigError(f"target {name} {value} must be between 1 and the original {original}")


def pruned_config(cfg: ModelConfig, t: PruneTarget, kept: list[int] | None = None
                  ) -> ModelConfig:
    """The target shape, validated against the original; raises ConfigError naming the problem.
    A hybrid model's layer pattern follows the `kept` layers (make_plan passes them once chosen;
    before that, dropped layers or, for a layer count, the pattern's first layers)."""
    experts, moe_ffn, shared_ffn = _moe_target(cfg, t)
    mamba = _mamba_target(cfg, t)
    if t.heterogeneous:
        _check_heterogeneous(cfg, t)
    for name, value, original in (("hidden", t.hidden, cfg.hidden_size),
                                  ("ffn", t.ffn, cfg.ffn_hidden_size),
                                  ("heads", t.heads, cfg.num_attention_heads),
                                  ("groups", t.groups, cfg.num_query_groups),
                                  ("layers", t.layers, cfg.num_layers)):
        _check_range(name, value, original)
    if t.depth_metric not in DEPTH_METRICS:
        raise ConfigError(f"unknown depth metric {t.depth_metric!r} ({', '.join(DEPTH_METRICS)})")
    if t.layers is not None and t.drop_layers:
        raise ConfigError("give either a target layer count or layers to drop, not both")
    layers = cfg.num_layers
    if t.drop_layers:
        bad = [i for i in t.drop_layers if not 0 <= i < cfg.num_layers]
        if bad or len(set(t.drop_layers)) != len(t.drop_layers):
            raise ConfigError(f"layers to drop {t.drop_layers}: indices must be distinct and in "
                              f"0..{cfg.num_layers - 1}")
        layers = cfg.num_layers - len(t.drop_layers)
        if layers < 1:
            raise ConfigError(f"cannot drop all {cfg.num_layers} layers")
    elif t.layers is not None:
        layers = t.layers
    per_group = cfg.num_attention_heads // cfg.num_query_groups
    groups = t.groups or cfg.num_query_groups
    heads = t.heads or (groups * per_group if t.groups else cfg.num_attention_heads)
    if heads % groups:
        raise ConfigError(f"target heads {heads} is not a multiple of the query groups {groups}")
    if heads // groups > per_group:
        raise ConfigError(f"target {heads} heads in {groups} groups needs {heads // groups} heads "
                          f"per group; the model has {per_group}")
    hidden, ffn = t.hidden or cfg.hidden_size, t.ffn or cfg.ffn_hidden_size
    if cfg.hybrid:
        if kept is None:
            kept = _kept_layers(cfg, t, None, []) if t.drop_layers else list(range(layers))
        mamba["hybrid_pattern"] = "".join(cfg.hybrid_pattern[i] for i in kept)
    if t.params is not None and not t.heterogeneous:  # heterogeneous: the program's budget
        if t.hidden or t.ffn or t.moe_ffn:
            raise ConfigError("give --target-params or --target-hidden/--target-ffn"
                              f"{'/--target-moe-ffn' if cfg.moe else ''}, not both")
        shape = dataclasses.replace(cfg, num_layers=layers, num_attention_heads=heads,
                                    num_query_groups=groups, num_moe_experts=experts,
                                    moe_shared_ffn_hidden_size=shared_ffn, **mamba)
        hidden, width = width_for_params(shape, fraction_of(t.params, cfg.num_parameters()))
        moe_ffn, ffn = (width, ffn) if cfg.moe else (moe_ffn, width)
    new = dataclasses.replace(cfg, num_layers=layers, hidden_size=hidden,
                              ffn_hidden_size=ffn, num_moe_experts=experts,
                              moe_ffn_hidden_size=moe_ffn, moe_shared_ffn_hidden_size=shared_ffn,
                              num_attention_heads=heads, num_query_groups=groups,
                              # which layers slide is known once they are chosen (make_plan)
                              window_layers=cfg.window_layers if layers == cfg.num_layers
                              else None, **mamba)
    if t.norm_rescale and cfg.traits.normalization == "RMSNorm" and not cfg.hybrid:
        new.norm_epsilon = cfg.norm_epsilon * cfg.hidden_size / new.hidden_size
    new.validate()
    return new


def _check_heterogeneous(cfg: ModelConfig, t: PruneTarget) -> None:
    """What --heterogeneous needs: a dense transformer, a budget, and no fixed MLP width or depth
    (the program chooses both per layer)."""
    if cfg.moe or cfg.hybrid or cfg.heterogeneous:
        has = "per-layer widths" if cfg.heterogeneous else "experts or Mamba layers"
        raise ConfigError(f"--heterogeneous prunes a homogeneous dense transformer; this "
                          f"{cfg.family} model has {has}")
    if t.strategy != "given" or t.order != "joint":
        raise ConfigError("--heterogeneous makes its own choices per layer: leave --strategy and "
                          "--order at their defaults")
    if not t.names_homogeneous() and not t.budgeted():
        raise ConfigError("--heterogeneous needs a budget (--target-params, --target-memory or "
                          "--target-latency) or a homogeneous student to start from "
                          "(--target-ffn, --target-layers, --drop-layers)")
    if t.refine_rounds < 0:
        raise ConfigError(f"--refine-rounds {t.refine_rounds}: must be >= 0")
    bad = [f for f in t.layer_ffn_choices if not 0 <= f <= 1]
    if bad or not t.layer_ffn_choices:
        raise ConfigError(f"--layer-ffn-choices {t.layer_ffn_choices}: fractions of the MLP "
                          "width between 0 and 1")
    if t.budget_batch_size < 1 or t.budget_seq_length < 1:
        raise ConfigError("--budget-batch-size and --budget-seq-length must be >= 1")


def _mamba_target(cfg: ModelConfig, t: PruneTarget) -> dict:
    """The Mamba fields of the pruned shape: heads stay a multiple of the groups (each group
    keeps as many, so B and C, shared within a group, stay whole)."""
    if not cfg.hybrid:
        for flag, value in (("--target-mamba-heads", t.mamba_heads),
                            ("--target-mamba-head-dim", t.mamba_head_dim)):
            if value is not None:
                raise ConfigError(f"{flag}: this {cfg.family} model has no Mamba layers")
        return {}
    _check_range("mamba heads", t.mamba_heads, cfg.mamba_heads)
    _check_range("mamba head dim", t.mamba_head_dim, cfg.mamba_head_dim)
    heads = t.mamba_heads or cfg.mamba_heads
    if heads % cfg.mamba_groups:
        raise ConfigError(f"target Mamba heads {heads} is not a multiple of the "
                          f"{cfg.mamba_groups} groups: each group keeps as many heads")
    return dict(mamba_heads=heads, mamba_head_dim=t.mamba_head_dim or cfg.mamba_head_dim)


def _moe_target(cfg: ModelConfig, t: PruneTarget
                ) -> tuple[int | None, int | None, int | None]:
    """(experts, expert width, shared-expert width) kept; the dense-MLP target refused on an
    MoE model, the expert targets on a dense one."""
    if not cfg.moe:
        for flag, value in (("--target-experts", t.experts), ("--target-moe-ffn", t.moe_ffn),
                            ("--target-shared-ffn", t.shared_ffn)):
            if value is not None:
                raise ConfigError(f"{flag}: this {cfg.family} model has no experts")
        return None, None, None
    if t.shared_ffn is not None and not cfg.moe_shared_ffn_hidden_size:
        raise ConfigError(f"--target-shared-ffn: this {cfg.family} model has no shared expert")
    if t.ffn is not None:
        raise ConfigError("--target-ffn: this mixture-of-experts model has no dense MLP; "
                          "--target-moe-ffn sets the experts' width")
    _check_range("experts", t.experts, cfg.num_moe_experts)
    _check_range("moe-ffn", t.moe_ffn, cfg.moe_ffn_hidden_size)
    _check_range("shared-ffn", t.shared_ffn, cfg.moe_shared_ffn_hidden_size)
    if t.experts is not None and t.experts < cfg.moe_router_topk:
        raise ConfigError(f"target experts {t.experts} is below the router's top-k "
                          f"{cfg.moe_router_topk}: every token needs that many experts")
    return (t.experts or cfg.num_moe_experts, t.moe_ffn or cfg.moe_ffn_hidden_size,
            t.shared_ffn or cfg.moe_shared_ffn_hidden_size)


def width_for_params(cfg: ModelConfig, target: float) -> tuple[int, int]:
    """(hidden, MLP width) for a parameter budget: hidden shrunk by the ratio that would bring
    both widths to the budget together, then the MLP (each expert's, under MoE: the expert count
    stays as given) set to meet the count; widths in steps of 64 (8 for models narrower than
    512), so any usual TP size divides them."""
    step = 64 if min(cfg.hidden_size, cfg.mlp_width) >= 512 else 8
    mlp = "moe_ffn_hidden_size" if cfg.moe else "ffn_hidden_size"

    def count(h: float, f: float) -> int:
        return dataclasses.replace(cfg, hidden_size=max(1, round(h)),
                                   **{mlp: max(1, round(f))}).num_parameters()

    if target >= cfg.num_parameters():
        raise ConfigError(f"target {target:,.0f} parameters is not below the model's "
                          f"{cfg.num_parameters():,} at this depth, head and expert count")
    lo, hi = 0.0, 1.0  # the common ratio, by bisection (the count grows with it)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(cfg.hidden_size * mid, cfg.mlp_width * mid) < target \
            else (lo, mid)
    hidden = min(cfg.hidden_size, max(step, round(cfg.hidden_size * lo / step) * step))
    per_neuron = count(hidden, 2) - count(hidden, 1)
    ffn = (target - count(hidden, 0)) / per_neuron
    ffn = min(cfg.mlp_width, max(step, round(ffn / step) * step))
    if abs(count(hidden, ffn) / target - 1) > 0.05:
        raise ConfigError(f"no width reaches {target:,.0f} parameters within 5% (the embedding "
                          "alone may be larger); lower the target or prune depth too")
    return hidden, ffn


def check_scores(scores: Scores, cfg: ModelConfig, fingerprint: str, load: str = "CKPT") -> None:
    rerun = f"; rerun `minitron importance --load {load} --out NEW_SCORES`"
    if scores.meta.get("model") != cfg.to_dict():
        raise ConfigError("the scores were computed for a model of another shape "
                          f"({scores.meta.get('checkpoint', '?')}), not this checkpoint{rerun}")
    theirs = scores.meta.get("fingerprint", "")
    if theirs and fingerprint and theirs != fingerprint:
        raise ConfigError(f"the scores were computed for checkpoint "
                          f"{scores.meta.get('checkpoint', '?')} (fingerprint {theirs[:12]}), "
                          f"not this one ({fingerprint[:12]}){rerun}")


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k).indices.sort().values


def _kept_layers(cfg: ModelConfig, t: PruneTarget, scores: Scores | None,
                 notes: list[str]) -> list[int]:
    if t.drop_layers:
        return [i for i in range(cfg.num_layers) if i not in set(t.drop_layers)]
    if t.layers is None or t.layers == cfg.num_layers:
        return list(range(cfg.num_layers))
    drop = cfg.num_layers - t.layers
    metric = t.depth_metric
    if metric == "auto":
        have = f"depth.skip_loss.k{drop}" in scores.tensors
        metric = "block" if have else "skip_loss" if "depth.skip_loss.k1" in scores.tensors \
            else "block_influence"
        if not have:
            notes.append(f"depth: the scores have no LM loss for blocks of {drop} layers, so "
                         f"layers are chosen one by one by {metric}; for the contiguous block, "
                         f"rerun importance with --block-sizes {drop} (or pass --depth-metric)")
    if metric == "block":
        rise = scores.layers("skip_loss", block=drop)
        start = int(rise.argmin())
        notes.append(f"depth: dropped the contiguous block {start}..{start + drop - 1} "
                     f"(LM-loss rise {rise[start]:.4f} on the calibration samples)")
        gone = set(range(start, start + drop))
    else:
        s = scores.layers(metric)
        gone = set(s.argsort()[:drop].tolist())
        notes.append(f"depth: dropped layers {sorted(gone)}, the lowest by {metric}")
    return [i for i in range(cfg.num_layers) if i not in gone]


def _expert_neurons(per_expert: torch.Tensor, tokens: torch.Tensor | None,
                    width: int) -> torch.Tensor:
    """[kept experts, width] from their neuron scores: each expert's own best, or with `tokens`
    (those each expert received) the same ones in every expert, by token-weighted score."""
    if tokens is None:
        return _top(per_expert, width)
    return _top((per_expert * tokens[:, None]).sum(0), width).expand(len(per_expert), -1)


def make_plan(cfg: ModelConfig, target: PruneTarget, scores: Scores | None) -> PrunePlan:
    new = pruned_config(cfg, target)
    if scores is None and target.needs_scores():
        raise ConfigError("width targets and --target-layers need a scores file (--scores)")
    notes: list[str] = []
    depth_notes: list[str] = []
    layers = _kept_layers(cfg, target, scores, depth_notes)
    if cfg.hybrid:  # the pattern of the layers actually kept
        new = pruned_config(cfg, target, layers)
    if target.params is not None and not target.heterogeneous:
        want = fraction_of(target.params, cfg.num_parameters())
        notes.append(f"target {want:,.0f} parameters: hidden {cfg.hidden_size} -> "
                     f"{new.hidden_size} and MLP {cfg.mlp_width} -> {new.mlp_width}, "
                     f"about one ratio (width, as the papers' 8B models; depth only when asked), "
                     f"{new.num_parameters() / want - 1:+.1%} from the target")
    notes += depth_notes
    if cfg.window_layers is not None:  # a kept layer keeps its attention type
        new.window_layers = [cfg.window_layers[i] for i in layers]
    full = torch.arange
    if new.hidden_size < cfg.hidden_size:
        # Ranked over all layers, dropped ones included: on SmolLM2 that beat ranking over the
        # kept layers only in every combined target we measured.
        hidden = _top(scores.hidden(), new.hidden_size)
    else:
        hidden = full(cfg.hidden_size)
    plan = PrunePlan(new, layers, hidden, norm_rescale=target.norm_rescale, notes=notes)
    if cfg.hybrid:
        _plan_mamba(plan, cfg, scores)
    per_group = cfg.num_attention_heads // cfg.num_query_groups
    keep_per_group = new.num_attention_heads // new.num_query_groups
    # each pruned axis's scores once, for every layer (None: the axis keeps all its units)
    by_expert = (scores.experts(target.expert_metric)
                 if cfg.moe and new.num_moe_experts < cfg.num_moe_experts else None)
    by_neuron = scores.moe_ffn() if cfg.moe and new.mlp_width < cfg.mlp_width else None
    tokens = (scores.experts("tokens")
              if by_neuron is not None and target.expert_neurons == "common" else None)
    by_shared = (scores.axis("shared_ffn") if (new.moe_shared_ffn_hidden_size or 0) <
                 (cfg.moe_shared_ffn_hidden_size or 0) else None)
    by_ffn = (scores.axis("ffn")
              if not cfg.moe and new.ffn_hidden_size < cfg.ffn_hidden_size else None)
    by_head = (scores.heads(target.head_metric)
               if new.num_attention_heads < cfg.num_attention_heads else None)
    for i in layers:
        if cfg.moe:
            kept = (_top(by_expert[i], new.num_moe_experts) if by_expert is not None else
                    full(cfg.num_moe_experts))
            plan.experts[i] = kept
            plan.ffn[i] = (_expert_neurons(by_neuron[i][kept], None if tokens is None else
                                           tokens[i][kept], new.mlp_width)
                           if by_neuron is not None else
                           full(cfg.mlp_width).expand(new.num_moe_experts, -1))
            if cfg.moe_shared_ffn_hidden_size:
                plan.shared_ffn[i] = (_top(by_shared[i], new.moe_shared_ffn_hidden_size)
                                      if by_shared is not None else
                                      full(cfg.moe_shared_ffn_hidden_size))
        else:
            plan.ffn[i] = (_top(by_ffn[i], new.ffn_hidden_size) if by_ffn is not None else
                           full(cfg.ffn_hidden_size))
        if by_head is None:
            plan.heads[i] = full(cfg.num_attention_heads)
            continue
        head_scores = by_head[i].view(cfg.num_query_groups, per_group)
        groups = _top(head_scores.sum(-1), new.num_query_groups)
        plan.heads[i] = torch.cat([g * per_group + _top(head_scores[g], keep_per_group)
                                   for g in groups.tolist()])
    return plan


def mamba_scores(scores: Scores, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads [L, heads], head dimensions [L, head_dim]) from the mixer's channel scores: the L2
    norm of each head's channels, and of each head dimension over the heads."""
    channels = scores.axis("mamba").view(cfg.num_layers, cfg.mamba_heads, cfg.mamba_head_dim)
    return channels.norm(dim=2), channels.norm(dim=1)


def _plan_mamba(plan: PrunePlan, cfg: ModelConfig, scores: Scores | None) -> None:
    """Per kept Mamba layer: each group's highest-scored heads, and the head dimensions with the
    highest scores over all heads (one set for every head: the scan needs one head width)."""
    new, full = plan.model, torch.arange
    per_group, keep = (n // cfg.mamba_groups for n in (cfg.mamba_heads, new.mamba_heads))
    pruned = new.mamba_inner < cfg.mamba_inner
    by_head, by_dim = mamba_scores(scores, cfg) if pruned else (None, None)
    for i in plan.layers:
        if cfg.hybrid_pattern[i] != "M":
            continue
        if keep < per_group:
            groups = by_head[i].view(cfg.mamba_groups, per_group)
            plan.mamba_heads[i] = torch.cat([g * per_group + _top(groups[g], keep)
                                             for g in range(cfg.mamba_groups)])
        else:
            plan.mamba_heads[i] = full(cfg.mamba_heads)
        plan.mamba_dims[i] = (_top(by_dim[i], new.mamba_head_dim)
                              if new.mamba_head_dim < cfg.mamba_head_dim else
                              full(cfg.mamba_head_dim))
