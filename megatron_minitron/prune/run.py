"""Prune a loaded (TP/PP-sharded) model into a new model of the pruned shape, on the same ranks.

Each kept layer stays on the pipeline stage that holds it: the pruned model is built with
Megatron's custom pipeline layout (kept layers per virtual stage), so no layer crosses ranks. Per
parameter, TP shards are gathered into the full (TP=1 layout) tensor, sliced by the pure
functions in `slicing`, and this rank's shard of the result is copied into the new model; a
parameter at a time, so at most one full tensor is ever materialised. Under expert parallelism a
kept expert may belong to another rank in the pruned model: each expert's tensors are gathered on
the rank that holds it and broadcast over the expert-parallel group. The dist checkpoint written
from the new model stores global tensors, so it loads at any TP/PP/EP.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from megatron_minitron.checkpoint.layout import (
    EMBEDDING,
    FINAL_NORMS,
    LOCAL_EXPERTS,
    OUTPUT_LAYER,
    removed_blocks,
    renumber_expert,
)
from megatron_minitron.checkpoint.sharding import full_tensor, local_shard
from megatron_minitron.config import ModelConfig, ParallelConfig
from megatron_minitron.importance.hooks import decoder_layers
from megatron_minitron.prune.plan import PrunePlan
from megatron_minitron.prune.slicing import slice_layer_tensor, slice_model_tensor
from megatron_minitron.runtime.progress import Progress

# Sliced along the hidden (unsplit) dimension only: this rank's vocabulary shard stays its shard.
VOCAB_PARALLEL = (EMBEDDING, OUTPUT_LAYER)


def _copy(src_module, dst_module, cfg: ModelConfig, new_cfg: ModelConfig, slicer,
          prefix: str = "", experts: torch.Tensor | None = None, skip_experts: bool = False,
          removed: tuple[str, ...] = ()) -> None:
    """Copy every parameter, sliced (gathered at the source shape `cfg`, sharded again at the
    pruned one `new_cfg`); names passed to `slicer` carry `prefix`. New expert j is source
    expert experts[j]; the source's other experts are left behind (all of them with
    `skip_experts`, for `_copy_experts_over_ep`), and so are the blocks under `removed`
    prefixes (a heterogeneous layer's attention or MLP)."""
    def params(module) -> dict:
        return {prefix + n: p for n, p in module.named_parameters()
                if not (skip_experts and LOCAL_EXPERTS in n)}

    src, dst = params(src_module), params(dst_module)
    source = {n: n if experts is None else renumber_expert(n, lambda j: int(experts[j]))
              for n in dst}
    left = src.keys() - set(source.values())
    if set(source.values()) - src.keys() or any(LOCAL_EXPERTS not in n and
                                                not n.startswith(removed) for n in left):
        raise RuntimeError(f"pruned module has parameters {sorted(dst)}, source {sorted(src)}")
    with torch.no_grad():
        for name, from_name in source.items():
            p = src[from_name]
            if name in VOCAB_PARALLEL:
                new = slicer(name, p.detach())
            else:
                new = local_shard(name, slicer(name, full_tensor(name, p, cfg)), dst[name],
                                  new_cfg)
            if new.shape != dst[name].shape:
                raise RuntimeError(f"{name}: sliced to {tuple(new.shape)}, the pruned model "
                                   f"expects {tuple(dst[name].shape)}")
            _assign(dst[name], new, p)


def _assign(param: torch.nn.Parameter, new: torch.Tensor, source: torch.Tensor) -> None:
    """The pruned parameter takes `new`'s storage when slicing made it (no second copy into the
    freshly built, never touched parameter: on CPU half of pruning was that copy's page faults);
    it copies when `new` still shares the source's memory (a tensor no axis touches)."""
    fresh = (new.is_contiguous() and new.dtype == param.dtype and new.device == param.device
             and new.untyped_storage().data_ptr() != source.untyped_storage().data_ptr())
    if fresh:
        param.data = new
    else:
        param.copy_(new)


def layers_per_stage(plan: PrunePlan, src: ModelConfig, parallel: ParallelConfig) -> list[int]:
    """Kept layers in each virtual pipeline stage of the source's even split."""
    stages = parallel.pp * (parallel.vpp or 1)
    per = src.num_layers // stages
    return [sum(1 for i in plan.layers if i // per == s) for s in range(stages)]


def _release(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def _copy_experts_over_ep(src_layer, dst_layer, cfg: ModelConfig, slicer,
                          experts: torch.Tensor) -> None:
    """EP > 1: new expert g, held by EP rank g // (new experts per rank), is source expert
    experts[g], held by EP rank experts[g] // (source experts per rank). Every rank walks the new
    experts in the same order; the holder of each source expert gathers a tensor over TP and
    broadcasts it over the EP group, and the new holder slices and keeps its shard."""
    from megatron.core import parallel_state

    group = parallel_state.get_expert_model_parallel_group()
    me = parallel_state.get_expert_model_parallel_rank()
    src_local, dst_local = (m.mlp.experts.local_experts for m in (src_layer, dst_layer))
    with torch.no_grad():
        for g, s in enumerate(experts.tolist()):
            owner, keeper = s // len(src_local), g // len(dst_local)
            # a rank that does not hold the source expert gathers its own first one (same
            # shapes, its TP group holds no source either) and receives over that
            source = dict(src_local[s % len(src_local) if owner == me else 0].named_parameters())
            kept = dict(dst_local[g % len(dst_local)].named_parameters()) if keeper == me else {}
            for name, p in source.items():
                full_name = f"{LOCAL_EXPERTS}{g}.{name}"
                full = full_tensor(full_name, p, cfg)
                # a receiver gets a buffer of its own (full may be its parameter's storage)
                full = full.contiguous() if owner == me else torch.empty_like(full)
                dist.broadcast(full, src=dist.get_global_rank(group, owner), group=group)
                if keeper == me:
                    new = local_shard(full_name, slicer(full_name, full), kept[name], cfg)
                    kept[name].copy_(new)


def prune_model(chunks, src: ModelConfig, plan: PrunePlan, parallel: ParallelConfig,
                release_source: bool = False) -> list:
    """The pruned model's chunks. With `release_source` (for a caller done with the source)
    each source layer's memory is given back as soon as it is sliced, dropped layers first: live
    tensors peak at the source plus a layer instead of source plus result, and the result's
    smaller tensors land in heap memory the source already touched instead of faulting in fresh
    pages (so the process's RSS, which keeps that heap, still peaks near source plus result)."""
    from megatron_minitron.model import build_model

    new_chunks = build_model(plan.model, parallel, dtype=next(chunks[0].parameters()).dtype,
                             layers_per_stage=layers_per_stage(plan, src, parallel))
    src_layers = {layer.layer_number - 1: layer for layer in decoder_layers(chunks)}
    new_layers = {layer.layer_number - 1: layer for layer in decoder_layers(new_chunks)}
    if release_source:
        for i in src_layers.keys() - set(plan.layers):
            _release(src_layers[i])
    progress = Progress("prune", len(plan.layers), unit="layers")
    for new_i, src_i in enumerate(plan.layers):
        if src_i in src_layers:
            slicer = partial(slice_layer_tensor, src=src, plan=plan, layer=src_i)
            over_ep = src.moe and parallel.ep > 1
            _copy(src_layers[src_i], new_layers[new_i], src, plan.model, slicer,
                  experts=None if over_ep else plan.experts.get(src_i), skip_experts=over_ep,
                  removed=removed_blocks(plan.model, new_i))
            if over_ep:
                _copy_experts_over_ep(src_layers[src_i], new_layers[new_i], src, slicer,
                                      plan.experts[src_i])
            if release_source:
                _release(src_layers[src_i])
        progress.update(1)
    for old, new in zip(chunks, new_chunks, strict=True):
        for path in ("embedding", "output_layer", *FINAL_NORMS):
            parent, _, attr = path.rpartition(".")
            a, b = (getattr(m.decoder if parent else m, attr, None) for m in (old, new))
            if a is not None:
                _copy(a, b, src, plan.model,
                      lambda name, t: slice_model_tensor(name, t, src, plan),
                      prefix=path + ".")
                if release_source:
                    _release(a)
    return new_chunks
