"""Norm for the local (non-TE) layer spec.

Megatron's `WrappedTorchNorm` refuses sequence parallelism and zero-centred gamma, both of which we
need on CPU (TP+SP tests, Nemotron's LayerNorm1P). This module does both: it marks its parameters
`sequence_parallel` so Megatron all-reduces their gradients across TP ranks, and applies
`weight + 1` when gamma is zero-centred. Parameter names (`weight`, `bias`) match Megatron's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class MinitronNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.zero_centered = bool(config.layernorm_zero_centered_gamma)
        self.eps = eps
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(
            torch.zeros(hidden_size, dtype=config.params_dtype))
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_norm(x, self.weight, self.bias, self.rms, self.zero_centered, self.eps)


def apply_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rms: bool,
               zero_centered: bool, eps: float) -> torch.Tensor:
    """The norm both specs compute, in fp32 whatever the activations' dtype (as TE does: a bf16
    zero-centred gamma + 1 would round to bf16 steps); TE fuses it into the next linear, so
    importance recomputes it from that linear's `layer_norm_weight`."""
    w = weight.float() + 1 if zero_centered else weight.float()
    b = bias.float() if bias is not None else None
    xf = x.float()
    y = F.rms_norm(xf, (x.shape[-1],), w, eps) if rms else F.layer_norm(xf, (x.shape[-1],), w, b,
                                                                        eps)
    return y.to(x.dtype)
