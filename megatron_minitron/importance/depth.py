"""Depth metrics from the LM loss: how much it rises when one layer, or a contiguous block of k
layers, is skipped (the layer passes its input through). Works on any pipeline stage layout: the
rank that holds a layer skips it, the others run as usual."""

from __future__ import annotations

import contextlib

import torch

from megatron_minitron.evaluate.perplexity import evaluate_windows
from megatron_minitron.importance.hooks import decoder_layers
from megatron_minitron.runtime.progress import Progress


def _pass_through(hidden_states=None, *args, context=None, **kwargs):
    return hidden_states, context


@contextlib.contextmanager
def skipped(chunks, layers: set[int]):
    """Make the given (0-based, global) layers identities for the duration."""
    patched = [layer for layer in decoder_layers(chunks) if layer.layer_number - 1 in layers]
    for layer in patched:
        layer.forward = _pass_through
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward


def skip_losses(chunks, num_layers: int, samples: torch.Tensor, block_sizes: tuple[int, ...],
                micro_batch_size: int) -> dict[str, torch.Tensor]:
    passes = 1 + sum(num_layers - k + 1 for k in block_sizes)
    progress = Progress("depth (layer-skip LM loss)", passes, unit="passes", every_s=30)
    base = evaluate_windows(chunks, samples, micro_batch_size).loss
    progress.update(1)
    out = {"depth.base_loss": torch.tensor([base], dtype=torch.float64)}
    for k in block_sizes:
        rise = []
        for start in range(num_layers - k + 1):
            with skipped(chunks, set(range(start, start + k))):
                rise.append(evaluate_windows(chunks, samples, micro_batch_size).loss - base)
            progress.update(1)
        out[f"depth.skip_loss.k{k}"] = torch.tensor(rise, dtype=torch.float64)
    return out
