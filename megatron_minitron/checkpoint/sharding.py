"""A rank's parameters under TP/PP, named and shaped as in the full (TP=1, PP=1) model.

Megatron names a pipeline stage's layers from 0 and splits TP parameters along `partition_dim`
(fused blocks such as SwiGLU's fc1 block by block, see layout.tp_blocks); these helpers undo
both, one parameter at a time, so that import, export and pruning never materialise more than
one full tensor.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron_minitron.checkpoint.layout import (
    MC_LAYER,
    block_shard,
    from_block_shards,
    renumber_expert,
    tp_blocks,
)
from megatron_minitron.config import ModelConfig


def tp_rank_world_group():
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_group())


def split_dim(p: torch.Tensor) -> int | None:
    """The dimension TP splits `p` along, None for a replicated parameter. Megatron's Mamba mixer
    marks its per-head and per-channel tensors (conv, A, D, dt bias, gated norm) TP-split without
    a `partition_dim`: they split along rows."""
    if not getattr(p, "tensor_model_parallel", False):
        return None
    return getattr(p, "partition_dim", 0)


def global_parameters(chunks) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """This rank's parameters under their full-model names (global layer and expert numbers)."""
    for chunk in chunks:
        layers = chunk.decoder.layers
        for name, p in chunk.named_parameters():
            if name.startswith("decoder.layers."):
                local, rest = name.removeprefix("decoder.layers.").split(".", 1)
                layer = layers[int(local)]  # expert parallelism numbers experts per rank
                rest = renumber_expert(rest,
                                       lambda j, lr=layer: lr.mlp.local_expert_indices[j])
                name = MC_LAYER.format(i=layer.layer_number - 1) + rest
            yield name, p


def full_tensor(name: str, p: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The TP=1-layout tensor of a (possibly TP-sharded) parameter: a collective over TP."""
    _, tp, group = tp_rank_world_group()
    dim = split_dim(p)
    if tp == 1 or dim is None:
        return p.detach()
    shards = [torch.empty_like(p) for _ in range(tp)]
    dist.all_gather(shards, p.detach().contiguous(), group=group)
    blocks = tp_blocks(name, p.shape[0] * tp, cfg) if dim == 0 else None
    return from_block_shards(shards, blocks) if blocks else torch.cat(shards, dim=dim)


def local_shard(name: str, full: torch.Tensor, like: torch.Tensor, cfg: ModelConfig
                ) -> torch.Tensor:
    """This rank's part of a full tensor, for a parameter split like `like`."""
    rank, tp, _ = tp_rank_world_group()
    dim = split_dim(like)
    if tp == 1 or dim is None:
        return full
    blocks = tp_blocks(name, full.shape[0], cfg) if dim == 0 else None
    return block_shard(full, blocks, rank, tp) if blocks else full.chunk(tp, dim=dim)[rank]
