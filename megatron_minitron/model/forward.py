"""Forward-only passes through a (possibly TP/PP/VPP-sharded) GPTModel via Megatron's schedules.

`forward_microbatches` runs each microbatch through `get_forward_backward_func()` (so pipeline
parallelism works unchanged) and returns, on the last pipeline stage, what `collect` made of each
microbatch's output; other stages get an empty list. `broadcast_from_last_stage` shares a result
with every rank. Microbatches are built on the host and moved to the device here, where they enter
the schedule; `collect` sees the moved microbatch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_minitron.config import ConfigError
from megatron_minitron.runtime.distributed import device, to_device


def _position_ids(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def forward_microbatches(chunks, microbatches: list[dict[str, torch.Tensor]],
                         collect: Callable[[torch.Tensor, dict], object],
                         loss_in_model: bool = True) -> list:
    """microbatches: dicts with `tokens` [b, s] and optional `labels` [b, s]. With labels and
    `loss_in_model` the model returns per-token losses, else (vocabulary-parallel) logits."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        return []
    b, s = microbatches[0]["tokens"].shape

    def step(data_iterator, model):
        mb = to_device(next(data_iterator))
        labels = mb.get("labels") if loss_in_model else None
        out = model(mb["tokens"], _position_ids(mb["tokens"]), None, labels=labels)
        return out, lambda output, non_loss_data=True: collect(output, mb)

    # Virtual pipeline: every model chunk walks the microbatches with its own iterator.
    iters = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    for c in chunks:
        c.eval()
    with torch.no_grad():
        return get_forward_backward_func()(
            forward_step_func=step, data_iterator=iters, model=chunks if len(chunks) > 1
            else chunks[0], num_microbatches=len(microbatches), seq_length=s,
            micro_batch_size=b, forward_only=True, collect_non_loss_data=True)


def forward_with_progress(chunks, microbatches: list[dict], collect, progress) -> list:
    """`forward_microbatches` a few schedule calls at a time (enough microbatches per call to keep
    the pipeline full), reporting the tokens of every data-parallel rank between calls."""
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    per_call = max(8, 2 * parallel_state.get_pipeline_model_parallel_world_size())
    out = []
    for i in range(0, len(microbatches), per_call):
        group = microbatches[i:i + per_call]
        out += forward_microbatches(chunks, group, collect)
        progress.update(sum(m["tokens"].numel() for m in group) * dp)
    return out


def gather_logits(output: torch.Tensor, _mb=None) -> torch.Tensor:
    """Full-vocabulary logits [b, s, V] from this TP rank's vocabulary shard."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(output).float()


def logits(chunks, tokens: torch.Tensor, micro_batch_size: int = 1) -> torch.Tensor | None:
    """Logits [B, s, V] on the last pipeline stage, None elsewhere."""
    mbs = [{"tokens": t} for t in torch.split(tokens, micro_batch_size)]
    out = forward_microbatches(chunks, mbs, gather_logits)
    return torch.cat(out) if out else None


def is_last_stage() -> bool:
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage(ignore_virtual=True)


def data_parallel_share(items, what: str = "items", pad=None):
    """This data-parallel rank's share of `items`: every dp-th one, from its rank on.

    Under expert parallelism the ranks of an expert group meet in every MoE layer's all-gather,
    so they must run the same forward passes, shape for shape: a shorter share is filled up with
    `pad` (an item the caller weighs 0); without one, an uneven split is refused on every rank
    (a rank that ran one pass more would wait forever)."""
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    share = items[parallel_state.get_data_parallel_rank()::dp]
    if len(items) % dp == 0 or parallel_state.get_expert_model_parallel_world_size() == 1:
        return share
    if pad is None:
        raise ConfigError(f"{len(items)} {what} do not split evenly over {dp} data-parallel "
                          "ranks, and under expert parallelism every rank must run the same "
                          f"forward passes: give a multiple of {dp}")
    if len(share) == -(-len(items) // dp):
        return share
    return torch.cat([share, pad[None]]) if torch.is_tensor(share) else [*share, pad]


def total_over_ranks(t: torch.Tensor | None, shape) -> torch.Tensor:
    """A sum made on the last pipeline stage (None elsewhere) from this data-parallel rank's
    share, shared with every rank and added up over the data-parallel ranks."""
    from megatron.core import parallel_state

    t = broadcast_from_last_stage(t, shape)
    if parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return t


def broadcast_from_last_stage(t: torch.Tensor | None, shape, dtype=torch.float64) -> torch.Tensor:
    """Send the last pipeline stage's (device) tensor to every rank of its pipeline group."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return t
    buf = t.to(dtype) if is_last_stage() else torch.zeros(shape, dtype=dtype, device=device())
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast(buf, src, group=parallel_state.get_pipeline_model_parallel_group())
    return buf
