"""`prune --heterogeneous`: each layer its own MLP width, attention kept or removed (Puzzle,
arXiv 2411.19146), chosen by a mixed-integer program over measured costs.

1. The uniform part of the target (hidden, heads, groups) is pruned in memory: the base.
2. Every layer of the base gets a menu of variants (MLP width from `--layer-ffn-choices`, keeping
   its highest-scored neurons; attention kept or removed). Each variant's effect is the LM-loss
   rise on calibration windows importance did not use, with only that layer changed: removed
   neurons and a removed attention are masked (zeroed at `linear_fc2`'s input and at the
   attention's output), which is exactly what removing them computes.
3. `scipy.optimize.milp` (HiGHS) picks one variant per layer, minimising the summed rises (the
   blocks are scored one at a time, as Puzzle does) under the budgets: parameters, memory
   (weights + KV cache at a batch x sequence) and latency from a table of every block measured
   on this machine.
A layer left with neither block is dropped. The plan is one plan over the source, so
`prune_model` writes the checkpoint once from the original weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from megatron_minitron.config import ConfigError, ModelConfig, ParallelConfig
from megatron_minitron.importance.hooks import decoder_layers
from megatron_minitron.importance.scores import Scores
from megatron_minitron.options import fraction_of
from megatron_minitron.prune.plan import PrunePlan, PruneTarget, _top, make_plan
from megatron_minitron.prune.run import prune_model

log = logging.getLogger("minitron")


@dataclass(frozen=True)
class Variant:
    """One layer's shape: its MLP width (0: no MLP) and whether it keeps attention."""

    ffn: int
    attention: bool

    def __str__(self) -> str:
        return f"{'attn' if self.attention else 'no-attn'}+ffn{self.ffn}"


def menu(base: ModelConfig, fractions: list[float], tp: int, widths: list[int] = ()
         ) -> list[Variant]:
    """The variants every layer may take: each fraction's width rounded down to a multiple of
    the TP size (each rank keeps an equal share) and `widths` as they are, with and without
    attention; the full layer first. A width of 0 with no attention is the dropped layer."""
    widths = sorted({int(f * base.ffn_hidden_size) // tp * tp for f in fractions} |
                    {base.ffn_hidden_size, *widths}, reverse=True)
    return [Variant(w, a) for a in (True, False) for w in widths]


def layer_parameters(base: ModelConfig, v: Variant) -> int:
    """The parameters of one layer of `base` shaped as `v` (exact, from ModelConfig's count)."""
    if not v.attention and not v.ffn:
        return 0
    one, none = (dataclasses.replace(base, num_layers=n, layer_ffn=[v.ffn] * n,
                                     layer_attention=[v.attention] * n, window_layers=None)
                 for n in (1, 0))
    return one.num_parameters(include_embeddings=False) - none.num_parameters(False)


def kv_cache_bytes(base: ModelConfig, batch: int, seq: int, itemsize: int) -> int:
    """One attention layer's K and V cache at `batch` x `seq` tokens."""
    return 2 * base.num_query_groups * base.kv_channels * batch * seq * itemsize


@dataclass
class Costs:
    """Per layer variant (same for every layer) and the fixed rest of the model, for each budget
    the target sets: parameters, bytes, milliseconds."""
    per_variant: dict[str, list[float]]
    fixed: dict[str, float]
    budget: dict[str, float]


def costs(src: ModelConfig, base: ModelConfig, variants: list[Variant], t: PruneTarget,
          itemsize: int, latency: dict[str, float] | None) -> Costs:
    """The budgets `t` sets, with each variant's cost: parameters (exact), memory (weights at
    `itemsize` bytes plus an attention layer's K/V cache), latency (`latency`'s table)."""
    params = [float(layer_parameters(base, v)) for v in variants]
    rest = float(base.num_parameters() - base.num_layers * layer_parameters(
        base, Variant(base.ffn_hidden_size, True)))
    per, fixed, budget = {}, {}, {}
    if t.params is not None:
        per["parameters"], fixed["parameters"] = params, rest
        budget["parameters"] = fraction_of(t.params, src.num_parameters())
    if t.target_memory is not None:
        kv = kv_cache_bytes(base, t.budget_batch_size, t.budget_seq_length, itemsize)
        per["memory"] = [p * itemsize + (kv if v.attention else 0)
                         for p, v in zip(params, variants, strict=True)]
        fixed["memory"], budget["memory"] = rest * itemsize, float(t.target_memory)
    if t.target_latency is not None:
        per["latency_ms"] = [variant_latency(latency, v) for v in variants]
        fixed["latency_ms"], budget["latency_ms"] = 0.0, float(t.target_latency)
    return Costs(per, fixed, budget)


def variant_latency(table: dict[str, float], v: Variant) -> float:
    """A layer's milliseconds from `measure_latency`'s table: its attention plus its MLP."""
    return (table["attention"] if v.attention else 0.0) + (table[f"ffn{v.ffn}"] if v.ffn else 0.0)


def check_feasible(c: Costs, layers: int) -> None:
    """Refuse, before any scoring, budgets that even the smallest variant in every layer
    exceeds."""
    least = {name: c.fixed[name] + layers * min(per) for name, per in c.per_variant.items()}
    over = [k for k in c.budget if least[k] > c.budget[k]]
    if over:
        raise ConfigError("no choice of layer variants fits the budget ("
                          + ", ".join(f"{k} {c.budget[k]:,.6g}, the smallest possible "
                                      f"{least[k]:,.6g}" for k in over)
                          + "): raise the budget or add smaller --layer-ffn-choices")


def select(rise: torch.Tensor, c: Costs, around: list[int] | None = None,
           changes: int | None = None) -> list[int]:
    """One variant per layer minimising the summed LM-loss rise [layers, variants] under every
    budget, and with `around` (a choice) at most `changes` layers other than it: scipy's
    mixed-integer linear program (HiGHS)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    layers, n = rise.shape
    check_feasible(c, layers)
    one_each = np.kron(np.eye(layers), np.ones(n))
    constraints = [LinearConstraint(one_each, 1, 1)]
    if around is not None:
        kept = np.zeros((1, layers * n))
        kept[0, [i * n + j for i, j in enumerate(around)]] = 1
        constraints.append(LinearConstraint(kept, layers - changes, np.inf))
    for name, per in c.per_variant.items():
        constraints.append(LinearConstraint(np.tile(per, layers)[None], -np.inf,
                                            c.budget[name] - c.fixed[name]))
    result = milp(rise.flatten().double().numpy(), constraints=constraints,
                  integrality=np.ones(layers * n), bounds=Bounds(0, 1))
    if result.x is None:  # each budget alone fits, not all of them together
        raise ConfigError("no choice of layer variants fits all the budgets together ("
                          + ", ".join(f"{k} {v:,.6g}" for k, v in c.budget.items())
                          + f"): {result.message}")
    return np.round(result.x).reshape(layers, n).argmax(1).tolist()


class _Masks:
    """Forward hooks that make one layer a variant: MLP neurons outside `keep` zeroed at
    `linear_fc2`'s input (this rank's TP slice), attention output zeroed."""

    def __init__(self, layer, keep: torch.Tensor | None, attention: bool, width: int):
        from megatron.core import parallel_state

        from megatron_minitron.runtime.distributed import device

        self.handles = []
        if keep is not None:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            rank = parallel_state.get_tensor_model_parallel_rank()
            mask = torch.zeros(width)
            mask[keep] = 1
            local = mask.chunk(tp)[rank].to(device())
            self.handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(
                lambda _m, args: (args[0] * local.to(args[0].dtype), *args[1:])))
        if not attention:
            self.handles.append(layer.self_attention.register_forward_hook(
                lambda _m, _a, out: (torch.zeros_like(out[0]), *out[1:])))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Shape:
    """The base model with some layers made variants by `_Masks` (on the ranks that hold them):
    how a student is evaluated without being written."""

    def __init__(self, chunks, base: ModelConfig, neurons: torch.Tensor):
        self.here = {layer.layer_number - 1: layer for layer in decoder_layers(chunks)}
        self.base, self.neurons, self.masks = base, neurons, {}

    def set(self, i: int, v: Variant) -> None:
        if i in self.masks:
            self.masks.pop(i).remove()
        width = self.base.ffn_hidden_size
        if i in self.here and v != Variant(width, True):
            self.masks[i] = _Masks(self.here[i], _top(self.neurons[i], v.ffn)
                                   if v.ffn < width else None, v.attention, width)

    @contextlib.contextmanager
    def shaped(self, student: list[Variant]):
        for i, v in enumerate(student):
            self.set(i, v)
        try:
            yield
        finally:
            for m in self.masks.values():
                m.remove()
            self.masks.clear()


def score_variants(chunks, base: ModelConfig, variants: list[Variant], neurons: torch.Tensor,
                   windows: torch.Tensor, micro_batch_size: int,
                   context: list[Variant] | None = None) -> tuple[torch.Tensor, float]:
    """[layers, variants]: each variant's LM-loss rise over `context` (a student; the unchanged
    base when None), one layer changed at a time, and the context's own loss. `neurons`
    [layers, ffn] ranks each layer's MLP neurons (highest kept). A change to layer i leaves
    its input as the context computes it, so each pass replays layer i's recorded input and
    runs from there (the depth metrics' prefix reuse)."""
    from megatron_minitron.importance.depth import replayed_losses, resumed_at

    context = context or [Variant(base.ffn_hidden_size, True)] * base.num_layers
    shape = _Shape(chunks, base, neurons)
    cells = [(i, j) for i in range(base.num_layers) for j, v in enumerate(variants)
             if v != context[i]]

    @contextlib.contextmanager
    def variant(inputs, i: int, v: Variant):
        shape.set(i, v)
        try:
            with resumed_at(chunks, i, inputs):
                yield
        finally:
            shape.set(i, context[i])

    passes = [lambda inputs, i=i, v=variants[j]: variant(inputs, i, v) for i, j in cells]
    with shape.shaped(context):
        loss = replayed_losses(chunks, windows, micro_batch_size, passes,
                               "calibration windows (--select-samples)", "layer variants")
    rise = torch.zeros(base.num_layers, len(variants), dtype=torch.float64)
    for (i, j), value in zip(cells, loss[1:] - loss[0], strict=True):
        rise[i, j] = value
    return rise, float(loss[0])


def refine(chunks, base: ModelConfig, variants: list[Variant], neurons: torch.Tensor, cal,
           c: Costs, start: list[int], rounds: int) -> tuple[list[int], list[dict]]:
    """Improve the student `start` (a variant index per layer) in context: each round scores
    every variant of every layer with the other layers as the student has them (single-layer
    rises are far from additive when half the model is gone, but close to it around the
    student), then the program picks under the budgets, changing at most k layers; k halves
    until the student's measured loss falls. A round with no fall ends it, so the result is
    never worse than `start` on the calibration windows. Each round's record: the student's
    loss, the rises, and each proposal tried."""
    choice, history = start, []
    for r in range(rounds):
        student = [variants[j] for j in choice]
        rise, loss = score_variants(chunks, base, variants, neurons, cal.select,
                                    cal.micro_batch_size, student)
        tried: list[dict] = []
        history.append({"loss": loss, "choice": [str(v) for v in student],
                        "rise": rise.tolist(), "tried": tried})
        k, better = base.num_layers, None
        while k and better is None:
            proposal = select(rise, c, around=choice, changes=k)
            if proposal == choice:
                break
            with _Shape(chunks, base, neurons).shaped([variants[j] for j in proposal]):
                tried.append({"changed": sum(a != b for a, b in zip(choice, proposal,
                                                                     strict=True)),
                              "loss": student_loss(chunks, cal)})
            log.info("heterogeneous round %d: %d layers changed, loss %.4f -> %.4f", r,
                     tried[-1]["changed"], loss, tried[-1]["loss"])
            better = proposal if tried[-1]["loss"] < loss else None
            k = tried[-1]["changed"] // 2
        if better is None:
            break
        choice = better
    return choice, history


def student_loss(chunks, cal) -> float:
    """The model's mean LM loss on the calibration windows, as it is now."""
    from megatron_minitron.importance.depth import replayed_losses

    return float(replayed_losses(chunks, cal.select, cal.micro_batch_size, [],
                                 "calibration windows (--select-samples)", "student loss")[0])


def measure_latency(base: ModelConfig, widths: list[int], parallel: ParallelConfig,
                    batch: int, seq: int, repeats: int = 5) -> dict[str, float]:
    """Milliseconds of one attention block and of one MLP of each width on this machine, from a
    model built with one layer per block (attention alone, then each MLP alone; attention again
    up to a multiple of the pipeline stages) at the run's own layout: forward hooks time each
    layer on the rank that holds it, median over `repeats` after a warm-up, and the slowest
    rank's figure counts."""
    import torch.distributed as dist

    from megatron_minitron.model import build_model
    from megatron_minitron.model.forward import forward_microbatches
    from megatron_minitron.runtime.distributed import device

    widths = [w for w in widths if w]
    stages = parallel.pp * (parallel.vpp or 1)
    kinds = ["attention", *(f"ffn{w}" for w in widths)]
    kinds += ["attention"] * (-len(kinds) % stages)
    probe = dataclasses.replace(
        base, num_layers=len(kinds), window_layers=None, ffn_hidden_size=max(widths),
        layer_ffn=[0 if k == "attention" else int(k[3:]) for k in kinds],
        layer_attention=[k == "attention" for k in kinds])
    chunks = build_model(probe, parallel)
    with torch.no_grad():
        for p in (p for c in chunks for p in c.parameters()):
            p.normal_(0, 0.02)  # no NaNs or denormals from uninitialised memory to slow the math
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: dict[int, list[float]] = {}
    started = {}

    def before(i):
        def hook(*_):
            sync()
            started[i] = time.perf_counter()
        return hook

    def after(i):
        def hook(*_):
            sync()
            times.setdefault(i, []).append(1000 * (time.perf_counter() - started[i]))
        return hook

    tokens = torch.randint(0, base.vocab_size, (batch, seq + 1))
    mb = [{"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}]
    forward_microbatches(chunks, mb, lambda out, _mb: None)  # warm-up
    handles = [h for layer in decoder_layers(chunks)
               for h in (layer.register_forward_pre_hook(before(layer.layer_number - 1)),
                         layer.register_forward_hook(after(layer.layer_number - 1)))]
    for _ in range(repeats):
        forward_microbatches(chunks, mb, lambda out, _mb: None)
    for h in handles:
        h.remove()
    del chunks
    gc.collect()
    medians = torch.zeros(len(kinds), dtype=torch.float64, device=device())
    for i, ms in times.items():
        medians[i] = statistics.median(ms)
    if dist.is_initialized():
        dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    return {k: float(medians[kinds.index(k)]) for k in dict.fromkeys(kinds)}


def heterogeneous_plan(chunks, cfg: ModelConfig, t: PruneTarget, scores: Scores, cal,
                       parallel: ParallelConfig) -> tuple[PrunePlan, dict]:
    """The plan over the source, and a record of the choice (variants, rises, costs, the
    latency table, the refinement rounds) for the prune record and the report. The first
    student is the homogeneous one `--target-ffn` with `--target-layers`/`--drop-layers` give
    (its parameters the budget when none is given), else the program's choice over the
    single-layer rises on the base (Puzzle's scoring); `--refine-rounds` improve it in
    context."""
    began = time.time()
    uniform = dataclasses.replace(t, heterogeneous=False, params=None)
    base_plan = make_plan(cfg, dataclasses.replace(uniform, ffn=None, layers=None,
                                                   drop_layers=None), scores)
    base = base_plan.model
    given = make_plan(cfg, uniform, scores) if t.names_homogeneous() else None
    if given is not None and not t.budgeted():
        t = dataclasses.replace(t, params=float(given.model.num_parameters()))
    itemsize = next(chunks[0].parameters()).element_size()
    variants = menu(base, t.layer_ffn_choices, parallel.tp,
                    [] if given is None else [given.model.ffn_hidden_size, 0])
    latency = (measure_latency(base, sorted({v.ffn for v in variants}), parallel,
                               t.budget_batch_size, t.budget_seq_length)
               if t.target_latency is not None else None)
    c = costs(cfg, base, variants, t, itemsize, latency)
    check_feasible(c, base.num_layers)
    model = (prune_model(chunks, cfg, base_plan, parallel)
             if base.num_parameters() < cfg.num_parameters() else chunks)
    neurons = scores.axis("ffn")
    rise = None
    if given is None:
        rise, _ = score_variants(model, base, variants, neurons, cal.select, cal.micro_batch_size)
        start = select(rise, c)
    else:
        start = [variants.index(Variant(given.model.ffn_hidden_size, True) if i in given.layers
                                else Variant(0, False)) for i in range(base.num_layers)]
        check_within(c, start, "the starting student (--target-ffn with the layers kept)")
    choice, rounds = refine(model, base, variants, neurons, cal, c, start, t.refine_rounds)
    del model
    gc.collect()
    chosen = [variants[j] for j in choice]
    plan = _plan(cfg, base_plan, chosen, scores)
    total = {k: c.fixed[k] + sum(c.per_variant[k][j] for j in choice) for k in c.per_variant}
    seen = [r["loss"] for r in rounds] + [x["loss"] for r in rounds for x in r["tried"]]
    losses = (f"calibration loss {rounds[0]['loss']:.4f} -> {min(seen):.4f} in {len(rounds)} "
              "refinement rounds" if rounds else "no refinement round")
    plan.notes.append(
        f"heterogeneous: {len(variants)} variants x {base.num_layers} layers scored on "
        f"{len(cal.select)} calibration windows importance did not use, starting from "
        f"{'the homogeneous student given' if given else 'the single-layer rises on the base'}"
        f"; {losses}; "
        + ", ".join(f"{k} {v:,.6g} (budget {c.budget[k]:,.6g})" for k, v in total.items())
        + f" in {time.time() - began:.1f} s")
    record = {"variants": [str(v) for v in variants], "rounds": rounds,
              "rise": None if rise is None else rise.tolist(),
              "start": [str(variants[j]) for j in start],
              "choice": [str(v) for v in chosen], "costs": c.per_variant, "totals": total,
              "budgets": c.budget, "latency_ms": latency}
    return plan, record


def check_within(c: Costs, choice: list[int], what: str) -> None:
    """Refuse a choice over a budget (the start a refinement must stay within)."""
    total = {k: c.fixed[k] + sum(per[j] for j in choice) for k, per in c.per_variant.items()}
    over = [k for k in c.budget if total[k] > c.budget[k]]
    if over:
        raise ConfigError(f"{what} exceeds the budget: " + ", ".join(
            f"{k} {total[k]:,.6g} > {c.budget[k]:,.6g}" for k in over))


def _plan(cfg: ModelConfig, base: PrunePlan, chosen: list[Variant], scores: Scores) -> PrunePlan:
    """The base plan with each layer's chosen width and attention; empty layers dropped."""
    kept = [i for i, v in zip(base.layers, chosen, strict=True) if v.ffn or v.attention]
    by = dict(zip(base.layers, chosen, strict=True))
    widths, attention = [by[i].ffn for i in kept], [by[i].attention for i in kept]
    ffn = scores.axis("ffn")
    model = dataclasses.replace(
        base.model, num_layers=len(kept), layer_ffn=widths, layer_attention=attention,
        ffn_hidden_size=max(widths) or base.model.ffn_hidden_size,
        window_layers=None if cfg.window_layers is None else [cfg.window_layers[i] for i in kept])
    if all(attention) and len(set(widths)) == 1:  # uniform after all: an ordinary checkpoint
        model = dataclasses.replace(model, layer_ffn=None, layer_attention=None,
                                    ffn_hidden_size=widths[0])
    model.validate()
    empty = torch.zeros(0, dtype=torch.long)
    plan = PrunePlan(model, kept, base.hidden, norm_rescale=base.norm_rescale,
                     notes=list(base.notes))
    for i in kept:
        plan.heads[i] = base.heads[i] if by[i].attention else empty
        plan.ffn[i] = _top(ffn[i], by[i].ffn) if by[i].ffn else empty
    return plan
