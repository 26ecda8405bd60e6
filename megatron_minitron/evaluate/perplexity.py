"""Held-out loss and perplexity: non-overlapping windows of `seq_length` tokens, data-parallel."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_minitron.config import ConfigError
from megatron_minitron.data.calibration import window_count, windows
from megatron_minitron.model.forward import broadcast_from_last_stage, forward_microbatches


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


def token_windows(ids: list[int], seq_length: int, max_windows: int | None = None
                  ) -> torch.Tensor:
    """The first `max_windows` consecutive windows [n, seq_length + 1] of the text."""
    n = window_count(len(ids), seq_length)
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ConfigError(f"evaluation text has {len(ids)} tokens, fewer than one window of "
                          f"{seq_length + 1}")
    return windows(torch.tensor(ids, dtype=torch.long), seq_length, range(n))


def _token_losses(output: torch.Tensor, _mb) -> torch.Tensor:
    return output.detach().double()  # GPTModel with labels returns per-token loss [b, s]


def evaluate_windows(chunks, windows: torch.Tensor, micro_batch_size: int = 1) -> EvalResult:
    from megatron.core import parallel_state

    start = time.time()
    dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                   parallel_state.get_data_parallel_rank())
    mine = windows[dp_rank::dp]
    mbs = [{"tokens": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()}
           for w in torch.split(mine, micro_batch_size)]
    outs = forward_microbatches(chunks, mbs, _token_losses)
    total = torch.tensor([sum(o.sum().item() for o in outs), sum(o.numel() for o in outs)],
                         dtype=torch.float64) if outs else None
    total = broadcast_from_last_stage(total, (2,))
    if dp > 1:
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    loss = total[0].item() / total[1].item()
    return EvalResult(loss, math.exp(loss), int(total[1].item()), len(windows),
                      time.time() - start)
