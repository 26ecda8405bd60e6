"""Distillation losses on vocabulary-parallel logits: nothing gathers the full vocabulary.

KL(teacher || student) per token, at temperature T (scaled by T^2 so gradients keep their size
across temperatures, as in Hinton et al.), computed from each TP rank's vocabulary shard with
all-reduced maxima, normalisers and sums. The backward is the closed form (p_s - p_t) * T, so no
autograd through collectives is needed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _log_softmax_parts(x: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, p) over the full vocabulary, from this rank's shard x [..., V/tp]."""
    if group is None or dist.get_world_size(group) == 1:  # whole vocabulary here: fused kernel
        log_p = torch.log_softmax(x, -1)
        return log_p, log_p.exp()
    m = _all_reduce(x.max(-1, keepdim=True).values, dist.ReduceOp.MAX, group)
    e = (x - m).exp()
    z = _all_reduce(e.sum(-1, keepdim=True), dist.ReduceOp.SUM, group)
    return x - m - z.log(), e / z


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature: float, group):
        dtype = torch.promote_types(student.dtype, torch.float32)  # bf16 logits: fp32 maths
        scale = 1.0 / temperature
        log_ps, ps = _log_softmax_parts(student.to(dtype) * scale, group)
        log_pt, pt = _log_softmax_parts(teacher.to(dtype) * scale, group)
        kl = _all_reduce((pt * (log_pt - log_ps)).sum(-1), dist.ReduceOp.SUM, group)
        ctx.save_for_backward(ps, pt)
        ctx.temperature, ctx.input_dtype = temperature, student.dtype
        return kl * temperature ** 2

    @staticmethod
    def backward(ctx, grad):
        ps, pt = ctx.saved_tensors
        grad_student = (ps - pt) * (grad.unsqueeze(-1) * ctx.temperature)
        return grad_student.to(ctx.input_dtype), None, None, None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            group=None) -> torch.Tensor:
    """Per-token T^2 * KL(softmax(t/T) || softmax(s/T)) [...], from vocabulary shards [..., V/tp]
    of the tensor-parallel `group` (None: full vocabularies)."""
    return _VocabParallelKL.apply(student_logits, teacher_logits.detach(), temperature, group)
