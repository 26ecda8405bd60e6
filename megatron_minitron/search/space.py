"""Candidate shapes at a parameter budget (pure functions).

Homogeneous shapes (every layer the same) over the chosen axes: hidden and MLP width in multiples
of `step` (and of the TP size), query heads in whole heads per group (all groups kept, K/V kept,
as Minitron prunes heads), layer counts down to half; for a mixture of experts the MLP width is
each expert's, and the expert count goes down to the router's top-k; for a hybrid (Mamba) model
Mamba heads in whole heads per group (Minitron-SSM's group-aware cut), every layer kept (which
kinds a depth cut removes, and so its size, is the depth scores' choice: `prune --target-layers`
makes it). A shape is a candidate when
its exact parameter count (ModelConfig.num_parameters, the built model's own count; total, or
active per token) is within `tolerance` of the target. From all candidates K are kept, spread
from the deepest to the shallowest: the paper's finding is that width-heavy and depth-heavy
shapes rank differently after retraining than right after pruning, so the search must try both.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from megatron_minitron.config import ConfigError, ModelConfig
from megatron_minitron.options import fraction_of
from megatron_minitron.prune.plan import PruneTarget

# experts: MoE teachers only; mamba_heads: hybrid ones only
AXES = ("hidden", "ffn", "heads", "layers", "experts", "mamba_heads")


@dataclass(frozen=True)
class Candidate:
    hidden: int
    ffn: int  # the MLP width: each expert's under MoE
    heads: int
    layers: int
    params: int
    experts: int | None = None  # MoE
    active_params: int = 0  # per token; the total under MoE, where every parameter is used
    mamba_heads: int | None = None  # hybrid
    # `search --heterogeneous`: the same hidden and heads, each layer's MLP width and attention
    # chosen by `prune --heterogeneous` at this candidate's parameter count
    heterogeneous: bool = False

    @property
    def name(self) -> str:
        experts = f"-e{self.experts}" if self.experts else ""
        mamba = f"-m{self.mamba_heads}" if self.mamba_heads else ""
        if self.heterogeneous:
            return f"het-h{self.hidden}-a{self.heads}-p{self.params}"
        return f"L{self.layers}-h{self.hidden}-f{self.ffn}-a{self.heads}{experts}{mamba}"

    def target(self, teacher: ModelConfig) -> PruneTarget:
        """The prune target; axes left at the teacher's size are not pruned."""
        def keep(v, full):
            return None if v == full else v
        if self.heterogeneous:
            return PruneTarget(hidden=keep(self.hidden, teacher.hidden_size),
                               heads=keep(self.heads, teacher.num_attention_heads),
                               heterogeneous=True, params=float(self.params))
        ffn = keep(self.ffn, teacher.mlp_width)
        return PruneTarget(hidden=keep(self.hidden, teacher.hidden_size),
                           ffn=None if teacher.moe else ffn,
                           moe_ffn=ffn if teacher.moe else None,
                           experts=keep(self.experts, teacher.num_moe_experts),
                           heads=keep(self.heads, teacher.num_attention_heads),
                           layers=keep(self.layers, teacher.num_layers),
                           mamba_heads=keep(self.mamba_heads, teacher.mamba_heads or None))

    def model(self, teacher: ModelConfig) -> ModelConfig:
        width = ({"moe_ffn_hidden_size": self.ffn, "num_moe_experts": self.experts}
                 if teacher.moe else {"ffn_hidden_size": self.ffn})
        if teacher.hybrid:
            width["mamba_heads"] = self.mamba_heads
        return dataclasses.replace(teacher, hidden_size=self.hidden, num_layers=self.layers,
                                   num_attention_heads=self.heads, **width)


def heterogeneous_twins(candidates: list[Candidate]) -> list[Candidate]:
    """One heterogeneous candidate per distinct (hidden, heads) of `candidates`, at the
    parameter count of the first with them."""
    seen: dict[tuple[int, int], Candidate] = {}
    for c in candidates:
        seen.setdefault((c.hidden, c.heads), dataclasses.replace(c, heterogeneous=True))
    return list(seen.values())


def _widths(full: int, step: int) -> list[int]:
    return sorted({full, *range(step, full, step)})


def enumerate_shapes(teacher: ModelConfig, target_params: float, tolerance: float = 0.05,
                     axes: tuple[str, ...] = AXES, step: int = 64, tp: int = 1,
                     min_depth: float = 0.5, active: bool = False) -> list[Candidate]:
    """Every shape over `axes` within tolerance of the target, by parameter count (`active`:
    the parameters one token goes through, a mixture of experts' compute budget)."""
    unknown = set(axes) - set(AXES)
    if unknown:
        raise ConfigError(f"unknown search axes {sorted(unknown)} (known: {', '.join(AXES)})")
    if not 0 < tolerance < 1 or step < 1:
        raise ConfigError("tolerance must be in (0, 1) and the width step >= 1")
    if active and not teacher.moe:
        raise ConfigError(f"a target in active parameters needs a mixture-of-experts teacher; "
                          f"every parameter of this {teacher.family} model is active")
    full = teacher.num_parameters(active=active)
    target_params = fraction_of(target_params, full)
    what = "active parameters" if active else "parameters"
    if not 0 < target_params < full:
        raise ConfigError(f"target {target_params:,.0f} {what} must be below the teacher's "
                          f"{full:,}")
    g, per_group = teacher.num_query_groups, teacher.num_attention_heads // \
        teacher.num_query_groups
    hidden = _widths(teacher.hidden_size, step) if "hidden" in axes else [teacher.hidden_size]
    ffn = [f for f in (_widths(teacher.mlp_width, step) if "ffn" in axes
                       else [teacher.mlp_width]) if f % tp == 0]
    experts = (range(teacher.moe_router_topk, teacher.num_moe_experts + 1)
               if teacher.moe and "experts" in axes else [teacher.num_moe_experts])
    heads = [g * k for k in range(1, per_group + 1)] if "heads" in axes \
        else [teacher.num_attention_heads]
    layers = range(max(1, int(teacher.num_layers * min_depth)), teacher.num_layers + 1) \
        if "layers" in axes and not teacher.hybrid else [teacher.num_layers]
    mamba = [None]
    if teacher.hybrid:
        mg, m_per_group = teacher.mamba_groups, teacher.mamba_heads // teacher.mamba_groups
        mamba = ([mg * k for k in range(1, m_per_group + 1) if mg * k % tp == 0]
                 if "mamba_heads" in axes else [teacher.mamba_heads])
    out = []
    for n_layers, a, h, f, e, m in itertools.product(layers, heads, hidden, ffn, experts, mamba):
        model = Candidate(h, f, a, n_layers, 0, e, mamba_heads=m).model(teacher)
        total, per_token = model.num_parameters(), model.num_parameters(active=True)
        if abs((per_token if active else total) / target_params - 1) <= tolerance:
            out.append(Candidate(h, f, a, n_layers, total, e, per_token, m))
    if not out:
        raise ConfigError(f"no shape over {', '.join(axes)} is within {tolerance:.0%} of "
                          f"{target_params:,.0f} {what}; widen --tolerance or --axes")
    return out


def _balance(c: Candidate, teacher: ModelConfig) -> float:
    """How unevenly the width axes are cut (0: all kept in the same proportion)."""
    ratios = [c.hidden / teacher.hidden_size, c.ffn / teacher.mlp_width,
              c.heads / teacher.num_attention_heads,
              *([c.experts / teacher.num_moe_experts] if teacher.moe else []),
              *([c.mamba_heads / teacher.mamba_heads] if teacher.hybrid else [])]
    return max(ratios) - min(ratios)


def spread(candidates: list[Candidate], k: int, teacher: ModelConfig) -> list[Candidate]:
    """k candidates from the deepest to the shallowest layer count present; at each depth the
    one with the most even width cut, then the closest to the target size."""
    if k < 1:
        raise ConfigError("the number of candidates must be >= 1")
    depths = sorted({c.layers for c in candidates}, reverse=True)
    n = min(k, len(depths))
    picks = [depths[round(i * (len(depths) - 1) / max(n - 1, 1))] for i in range(n)]
    chosen: list[Candidate] = []
    for depth in picks:
        pool = sorted((c for c in candidates if c.layers == depth and c not in chosen),
                      key=lambda c: (_balance(c, teacher), -c.params, c.name))
        chosen += pool[:1]
    rest = sorted((c for c in candidates if c not in chosen),
                  key=lambda c: (_balance(c, teacher), -c.params, c.name))
    return chosen + rest[:k - len(chosen)]
