"""Held-out loss and perplexity: non-overlapping windows of `seq_length` tokens, data-parallel."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_minitron.config import ConfigError
from megatron_minitron.data.calibration import window_count, windows
from megatron_minitron.model.forward import (
    data_parallel_share,
    forward_with_progress,
    total_over_ranks,
)
from megatron_minitron.runtime.distributed import device
from megatron_minitron.runtime.progress import Progress


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    windows: int
    seconds: float

    def line(self) -> str:
        return (f"loss {self.loss:.4f}  perplexity {self.perplexity:.3f}  "
                f"({self.tokens} tokens in {self.windows} windows of the held-out text)")


def token_windows(ids: list[int], seq_length: int, max_windows: int | None = None,
                  stride: int | None = None, prefix: Sequence[int] = ()) -> torch.Tensor:
    """The first `max_windows` windows [n, seq_length + 1] of the text, starting every `stride`
    tokens (default: seq_length, disjoint windows), each opened by `prefix` (BOS)."""
    stride = stride or seq_length
    if not 1 <= stride <= seq_length:
        raise ConfigError(f"stride {stride} must be between 1 and the sequence length "
                          f"{seq_length}")
    n = window_count(len(ids), seq_length, stride, prefix)
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ConfigError(f"evaluation text has {len(ids)} tokens, fewer than one window of "
                          f"{seq_length + 1}")
    return windows(torch.tensor(ids, dtype=torch.long), seq_length, range(n), stride, prefix)


def _token_losses(output: torch.Tensor, mb) -> torch.Tensor:
    # GPTModel with labels returns per-token losses [b, s]; rolling windows score their tail.
    return output.detach().double() * mb["mask"]


def evaluate_windows(chunks, windows: torch.Tensor, micro_batch_size: int = 1,
                     stride: int | None = None) -> EvalResult:
    """Loss over the windows; with `stride` (rolling windows, as `token_windows` made them) each
    window after the first scores only its last `stride` tokens, so every token counts once and
    has at least seq_length - stride tokens of context."""

    start = time.time()
    seq = windows.shape[1] - 1
    mask = torch.ones(len(windows), seq, dtype=torch.float64)
    if stride and stride < seq:
        mask[1:, :seq - stride] = 0
    mine = data_parallel_share(windows, pad=windows[0])
    mine_mask = data_parallel_share(mask, pad=torch.zeros_like(mask[0]))  # padding weighs 0
    mbs = [{"tokens": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous(), "mask": m}
           for w, m in zip(torch.split(mine, micro_batch_size),
                           torch.split(mine_mask, micro_batch_size), strict=True)]
    outs = forward_with_progress(chunks, mbs, _token_losses,
                                 Progress("eval", len(windows) * seq))
    # Summed on the device; one host sync at the end, none per microbatch.
    total = torch.stack([sum(o.sum() for o in outs),
                         mine_mask.sum().to(device())]) if outs else None
    loss_sum, tokens = total_over_ranks(total, (2,)).tolist()
    loss = loss_sum / tokens
    return EvalResult(loss, math.exp(loss), int(tokens), len(windows), time.time() - start)
