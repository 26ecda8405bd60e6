"""Depth metrics from the LM loss: how much it rises when one layer, or a contiguous block of k
layers, is skipped (the layer passes its input through). Works on any pipeline stage layout: the
rank that holds a layer skips it, the others run as usual.

The prefix is reused: skipping block [i, i + k) changes nothing before layer i, so one plain pass
per microbatch records the hidden states entering every layer, and each skip pass replays the
input of layer i there and runs only layers i + k onwards (the layers before pass through). This
does about half the layer work of running every skip from the tokens, with the same numbers: the
replayed tensor is bit for bit what that pass would have computed. Microbatches are taken a few at
a time (enough to keep a pipeline full), so the recorded states are those of a few microbatches.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch

from megatron_minitron.importance.hooks import decoder_layers
from megatron_minitron.model.forward import (
    data_parallel_share,
    forward_microbatches,
    total_over_ranks,
)
from megatron_minitron.runtime.distributed import device
from megatron_minitron.runtime.progress import Progress


def _pass_through(hidden_states=None, *args, context=None, **kwargs):
    return hidden_states, context


@contextlib.contextmanager
def replaced(chunks, forwards: dict[int, Callable]):
    """Give the (0-based, global) layers held here the given forwards for the duration."""
    patched = [layer for layer in decoder_layers(chunks) if layer.layer_number - 1 in forwards]
    for layer in patched:
        layer.forward = forwards[layer.layer_number - 1]
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward


def skipped(chunks, layers: set[int]):
    """Make the given (0-based, global) layers identities for the duration."""
    return replaced(chunks, dict.fromkeys(layers, _pass_through))


@contextlib.contextmanager
def recording_inputs(chunks) -> Iterator[dict[int, list[torch.Tensor]]]:
    """The hidden states entering each layer held here, one per microbatch in schedule order."""
    seen: dict[int, list[torch.Tensor]] = defaultdict(list)

    def record(layer, args, kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen[layer.layer_number - 1].append(h.detach().clone())

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True)
               for layer in decoder_layers(chunks)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def resumed_after(chunks, start: int, k: int, inputs: dict[int, list[torch.Tensor]]):
    """Skip block [start, start + k) without running the layers before it: layer `start` hands
    on its recorded input, and every other layer before start + k passes through."""
    feed = iter(inputs.get(start, ()))

    def replay(hidden_states=None, *args, context=None, **kwargs):
        return next(feed), context

    return replaced(chunks, {**dict.fromkeys(range(start + k), _pass_through), start: replay})


def _loss_sum(output: torch.Tensor, _mb) -> torch.Tensor:
    return output.detach().double().sum()


def resumed_at(chunks, start: int, inputs: dict[int, list[torch.Tensor]]):
    """Run layer `start` (and what follows) on its recorded input without running the layers
    before it: for a change to layer `start` alone (a prune variant), which leaves its input as
    recorded."""
    feed = iter(inputs.get(start, ()))
    layer = next((m for m in decoder_layers(chunks) if m.layer_number - 1 == start), None)
    original = None if layer is None else type(layer).forward.__get__(layer)

    def replay(hidden_states=None, *args, **kwargs):
        return original(next(feed), *args, **kwargs)

    return replaced(chunks, {**dict.fromkeys(range(start), _pass_through), start: replay})


def replayed_losses(chunks, samples: torch.Tensor, micro_batch_size: int,
                    passes: list[Callable[[dict], contextlib.AbstractContextManager]],
                    what: str, label: str) -> torch.Tensor:
    """Mean LM loss per token of `samples` [N, L+1] unchanged (entry 0) and under each of
    `passes` (entry j + 1): a context made from the recorded layer inputs, which changes the
    model from some layer on and replays that layer's input. Data-parallel ranks split the
    samples (`what` names them in an error); every rank returns the same losses. Progress lines
    are headed `label`."""
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    mbs = [{"tokens": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()}
           for w in torch.split(data_parallel_share(samples, what), micro_batch_size)]
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    per_group = 1 if pp == 1 else 2 * pp
    groups = [mbs[i:i + per_group] for i in range(0, len(mbs), per_group)]
    progress = Progress(label, len(samples) * (1 + len(passes)), unit="sample passes",
                        every_s=30)
    totals = torch.zeros(1 + len(passes), dtype=torch.float64, device=device())
    for group in groups:
        samples_here = sum(len(m["tokens"]) for m in group) * dp
        with recording_inputs(chunks) as inputs:
            for loss in forward_microbatches(chunks, group, _loss_sum):  # last stage only
                totals[0] += loss
        progress.update(samples_here)
        for j, change in enumerate(passes, 1):
            with change(inputs):
                for loss in forward_microbatches(chunks, group, _loss_sum):
                    totals[j] += loss
            progress.update(samples_here)
    return total_over_ranks(totals, totals.shape).cpu() / (len(samples) * (samples.shape[1] - 1))


def skip_losses(chunks, num_layers: int, samples: torch.Tensor, block_sizes: tuple[int, ...],
                micro_batch_size: int) -> dict[str, torch.Tensor]:
    """Mean LM loss of `samples` [N, L+1] unchanged (`depth.base_loss`) and its rise for every
    skipped block (`depth.skip_loss.k{K}`); data-parallel ranks split the samples."""
    blocks = [(k, start) for k in block_sizes for start in range(num_layers - k + 1)]
    passes = [lambda inputs, k=k, start=start: resumed_after(chunks, start, k, inputs)
              for k, start in blocks]
    loss = replayed_losses(chunks, samples, micro_batch_size, passes,
                           "depth samples (--depth-samples)", "depth (layer-skip LM loss)")
    out = {"depth.base_loss": loss[:1]}
    for k in block_sizes:
        out[f"depth.skip_loss.k{k}"] = torch.stack(
            [loss[j] - loss[0] for j, (kk, _) in enumerate(blocks, 1) if kk == k])
    return out
