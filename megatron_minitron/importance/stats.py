"""Streaming activation statistics: pure tensor functions, no Megatron.

An activation site yields x of shape [s, b, C] per microbatch. Every aggregation the user may ask
for is a function of a few sums, so we keep sums only (no activations) and decide the aggregation
when the scores are read:

- over the sequence, per sample: `mean` = mean |x|, `l2` = sqrt(sum x^2), `var` = variance of x;
  all three come from (sum |x|, sum x, sum x^2) over tokens, which add up across sequence-parallel
  shards before the per-sample value is taken;
- over samples: `mean`, `l2`, `var` of the per-sample values v, from (sum v, sum v^2) and the
  sample count, which add up across data-parallel ranks.

Variances are population variances (ddof 0). Accumulators are float64.
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("mean", "l2", "var")
SEQ_SUMS = 3  # sum |x|, sum x, sum x^2


def check_aggregation(name: str, what: str) -> str:
    from megatron_minitron.config import ConfigError

    if name not in AGGREGATIONS:
        raise ConfigError(f"unknown {what} aggregation {name!r} (choose from "
                          f"{', '.join(AGGREGATIONS)})")
    return name


def sequence_sums(x: torch.Tensor) -> torch.Tensor:
    """[3, b, C] token sums of |x|, x and x^2 for x [s, b, C].

    Summed in the activation's precision, at least fp32 (torch's blocked reductions: relative
    error ~1e-7 over thousands of tokens), then kept in float64. Plain elementwise + sum is
    several times faster than fused norms or a float64 copy of x on CPU."""
    x = x.detach().float()
    return torch.stack([x.abs().sum(0), x.sum(0), x.square().sum(0)]).double()


def per_sample(sums: torch.Tensor, seq_length: int | torch.Tensor) -> torch.Tensor:
    """[3, b, C] per-sample values (mean |x|, l2, var) from `sequence_sums` over the full
    sequence (`seq_length` may be a tensor that broadcasts against b, C: tokens per row)."""
    mean = sums[1] / seq_length
    var = (sums[2] / seq_length - mean * mean).clamp_min(0)
    return torch.stack([sums[0] / seq_length, sums[2].sqrt(), var])


def sample_sums(v: torch.Tensor) -> torch.Tensor:
    """[3, 2, C]: for each sequence aggregation, (sum v, sum v^2) over the batch of v [3, b, C]."""
    return torch.stack([v.sum(1), (v * v).sum(1)], dim=1)


def finalize(sums: torch.Tensor, n: int, seq: str = "mean", samples: str = "l2") -> torch.Tensor:
    """Scores [..., C] from accumulated `sample_sums` [..., 3, 2, C] over n samples."""
    check_aggregation(seq, "sequence")
    check_aggregation(samples, "sample")
    s = sums[..., AGGREGATIONS.index(seq), :, :]
    s1, s2 = s[..., 0, :], s[..., 1, :]
    if samples == "mean":
        return s1 / n
    if samples == "l2":
        return s2.sqrt()
    return (s2 / n - (s1 / n) ** 2).clamp_min(0)

