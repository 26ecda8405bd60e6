"""The LM-loss rise when one attention head is masked (its output zeroed before `linear_proj`),
for every head of every layer: forward only, one pass per layer.

Batched over heads: each sample is repeated once per head of the layer plus once unmasked, in the
same microbatch, and replica r masks head r, so one forward scores all of a layer's heads against
a baseline on the very same tokens. The layers before the masked one see the same input in every
copy, so without pipeline parallelism the copies are made only where that layer starts (its input
repeated along the batch; labels come repeated): about half the work of repeating the tokens.
Pipeline stages exchange tensors of one fixed shape, so under PP the tokens are repeated.

Exact under every parallelism: the rank that holds a head (its TP shard of the layer's heads, on
the pipeline stage that holds the layer) zeros it; the loss is Megatron's vocabulary-parallel
one, summed on the last stage and over data-parallel ranks.
"""

from __future__ import annotations

import contextlib

import torch

from megatron_minitron.importance.hooks import decoder_layers
from megatron_minitron.model.forward import (
    data_parallel_share,
    forward_microbatches,
    total_over_ranks,
)
from megatron_minitron.runtime.distributed import device
from megatron_minitron.runtime.progress import Progress


def replica_masks(heads: int, samples: int) -> torch.Tensor:
    """[samples * (heads + 1), heads]: row s * (heads + 1) + r keeps every head but r; the last
    row of each sample keeps all."""
    one = torch.cat([1 - torch.eye(heads), torch.ones(1, heads)])
    return one.repeat(samples, 1)


@contextlib.contextmanager
def masking_heads(chunks, layer: int, heads: int, kv_channels: int, copies_here: bool):
    """While active, global layer `layer` masks heads row by row as `replica_masks` says (and,
    with `copies_here`, first repeats its input heads + 1 times along the batch)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    local = heads // parallel_state.get_tensor_model_parallel_world_size()

    def mask(_module, args):
        x = args[0]  # [s, b, local heads * kv_channels]: this rank's heads, the whole sequence
        s, b, _ = x.shape
        m = replica_masks(heads, b // (heads + 1))[:, tp_rank * local:(tp_rank + 1) * local]
        m = m.to(device=x.device, dtype=x.dtype).view(1, b, local, 1)
        return (x.view(s, b, local, kv_channels) * m).view_as(x), *args[1:]

    def replicate(_module, args, kwargs):
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = kwargs["hidden_states"].repeat_interleave(heads + 1, dim=1)
        else:
            args = (args[0].repeat_interleave(heads + 1, dim=1), *args[1:])
        return args, kwargs

    handles = []
    for lay in decoder_layers(chunks):
        if lay.layer_number - 1 == layer:
            handles.append(lay.self_attention.linear_proj.register_forward_pre_hook(mask))
            if copies_here:
                handles.append(lay.register_forward_pre_hook(replicate, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def head_mask_losses(chunks, num_layers: int, heads: int, kv_channels: int,
                     samples: torch.Tensor, attention_layers: list[int] | None = None
                     ) -> torch.Tensor:
    """[layers, heads] float64: mean LM loss with the head masked minus the unmasked loss, on
    `samples` [N, L+1] (split over data-parallel ranks); zero in layers without attention (a
    hybrid's, where `attention_layers` lists those with it)."""
    from megatron.core import parallel_state

    late_copies = parallel_state.get_pipeline_model_parallel_world_size() == 1
    mbs = [{"tokens": w[None, :-1] if late_copies else w[:-1].repeat(heads + 1, 1),
            "labels": w[1:].repeat(heads + 1, 1)}
           for w in data_parallel_share(samples, "head samples (--head-samples)")]

    def per_replica(output: torch.Tensor, _mb) -> torch.Tensor:  # losses [heads + 1, s]
        return output.detach().double().sum(-1)

    layers = list(range(num_layers)) if attention_layers is None else attention_layers
    progress = Progress("importance: head masking", len(layers), unit="layers", every_s=30,
                        hint="pass --head-samples lower (or 0) for a shorter calibration")
    rows = torch.zeros(num_layers, heads + 1, dtype=torch.float64, device=device())
    for i in layers:
        with masking_heads(chunks, i, heads, kv_channels, late_copies):
            outs = forward_microbatches(chunks, mbs, per_replica)
        if outs:
            rows[i] = torch.stack(outs).sum(0)
        progress.update(1)
    loss = total_over_ranks(rows, rows.shape).cpu() / (len(samples) * (samples.shape[1] - 1))
    return loss[:, :heads] - loss[:, heads:]
