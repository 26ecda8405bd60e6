"""Distillation losses on vocabulary-parallel logits: nothing gathers the full vocabulary.

KL(teacher || student) per token, at temperature T (scaled by T^2 so gradients keep their size
across temperatures, as in Hinton et al.), computed from each TP rank's vocabulary shard with
all-reduced maxima, normalisers and sums. The backward is the closed form (p_s - p_t) * T, so no
autograd through collectives is needed.

Top-k: the teacher's distribution is renormalised over its k largest logits (found across the
vocabulary shards), the student's stays over the whole vocabulary; a step then holds k values and
ids per token instead of V/tp logits. The teacher is zero outside its top k, so the KL needs the
student only at those k ids and through its normaliser: no vocabulary-sized teacher tensor is
built (the loss costs about what the cross-entropy costs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TopK:
    """The teacher's k largest logits of each token over the whole vocabulary and their token ids
    (the same on every tensor-parallel rank)."""

    values: torch.Tensor  # [..., k]
    ids: torch.Tensor  # [..., k]


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


def _rank(group) -> int:
    return dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0


def top_k_logits(logits: torch.Tensor, k: int, group=None) -> TopK:
    """TopK of vocabulary-parallel logits [..., V/tp]: each rank's top k, gathered, re-ranked."""
    width = logits.shape[-1]
    values, ids = logits.topk(min(k, width), -1)
    ids = ids + _rank(group) * width
    if group is not None and dist.get_world_size(group) > 1:
        parts = [[torch.empty_like(t) for _ in range(dist.get_world_size(group))]
                 for t in (values, ids)]
        dist.all_gather(parts[0], values.contiguous(), group=group)
        dist.all_gather(parts[1], ids.contiguous(), group=group)
        values, ids = torch.cat(parts[0], -1), torch.cat(parts[1], -1)
        values, order = values.topk(min(k, values.shape[-1]), -1)
        ids = ids.gather(-1, order)
    return TopK(values, ids)


def _scaled(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """x / T in at least fp32 (bf16 logits: fp32 maths); every pass over [..., V] counts, so
    there is none at T = 1 for fp32 input."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x if temperature == 1.0 else x * (1.0 / temperature)


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature: float, group):
        log_ps, ps = _log_softmax_parts(_scaled(student, temperature), group)
        log_pt, pt = _log_softmax_parts(_scaled(teacher, temperature), group)
        kl = _all_reduce(torch.linalg.vecdot(pt, log_pt.sub_(log_ps)), dist.ReduceOp.SUM, group)
        ctx.save_for_backward(ps, pt)
        ctx.temperature, ctx.input_dtype = temperature, student.dtype
        return kl * temperature ** 2

    @staticmethod
    def backward(ctx, grad):
        ps, pt = ctx.saved_tensors
        grad_student = ps.sub_(pt).mul_(grad.unsqueeze(-1) * ctx.temperature)  # ps: last use
        return grad_student.to(ctx.input_dtype), None, None, None


def _softmax_and_normaliser(x: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(p [..., V/tp], log sum exp [..., 1]) over the full vocabulary from this rank's shard x,
    with one vocabulary-sized allocation."""
    m = _all_reduce(x.max(-1, keepdim=True).values, dist.ReduceOp.MAX, group)
    p = (x - m).exp_()
    z = _all_reduce(p.sum(-1, keepdim=True), dist.ReduceOp.SUM, group)
    return p.div_(z), m + z.log()


class _VocabParallelTopKL(torch.autograd.Function):
    """KL(teacher over its top k || student) from the student's shard and the k (values, ids):
    sum_k p_t (log p_t - x_id + lse(x)); gradient (p_s - p_t scattered at the ids) * T."""

    @staticmethod
    def forward(ctx, student, values, ids, temperature: float, group):
        x = _scaled(student, temperature)
        width = x.shape[-1]
        local = ids - _rank(group) * width
        here = (local >= 0) & (local < width)
        local = local.clamp(0, width - 1)
        # The student's softmax is made here, not in backward: a cross-entropy on the same
        # logits (Megatron's works in place) may change them before backward runs.
        ps, lse = _softmax_and_normaliser(x, group)
        x_ids = _all_reduce(x.gather(-1, local) * here, dist.ReduceOp.SUM, group)
        log_pt = torch.log_softmax(_scaled(values, temperature), -1)
        pt = log_pt.exp()
        kl = torch.linalg.vecdot(pt, log_pt - x_ids + lse)
        ctx.save_for_backward(ps, pt * here, local)
        ctx.temperature, ctx.input_dtype = temperature, student.dtype
        return kl * temperature ** 2

    @staticmethod
    def backward(ctx, grad):
        ps, pt_here, local = ctx.saved_tensors  # ps: last use
        grad_student = ps.scatter_add_(-1, local, -pt_here).mul_(grad.unsqueeze(-1) *
                                                                 ctx.temperature)
        return grad_student.to(ctx.input_dtype), None, None, None, None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | TopK,
            temperature: float = 1.0, group=None) -> torch.Tensor:
    """Per-token T^2 * KL(softmax(t/T) || softmax(s/T)) [...], from vocabulary shards [..., V/tp]
    of the tensor-parallel `group` (None: full vocabularies); a TopK teacher counts its k logits
    only."""
    if isinstance(teacher_logits, TopK):
        return _VocabParallelTopKL.apply(student_logits, teacher_logits.values.detach(),
                                         teacher_logits.ids, temperature, group)
    return _VocabParallelKL.apply(student_logits, teacher_logits.detach(), temperature, group)
