"""Log-likelihood of continuations given contexts: the one primitive behind cloze and
multiple-choice scoring and the lm-eval adapter, on a sharded model.

Requests are sorted by length, split over data-parallel ranks, right-padded into microbatches
(a causal model ignores what comes after) and run through Megatron's schedules. On the last
pipeline stage every quantity is computed on the vocabulary shards, never gathering the
vocabulary: log p(target) by Megatron's vocab-parallel cross-entropy, and greediness (the target
is the argmax) by comparing the target's logit with the TP-all-reduced maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_minitron.config import ConfigError
from megatron_minitron.data.tokenizer import Tokenizer
from megatron_minitron.model.forward import (
    data_parallel_share,
    forward_microbatches,
    total_over_ranks,
)
from megatron_minitron.runtime.distributed import device


@dataclass
class Request:
    context: list[int]
    continuation: list[int]


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> Request:
    """Tokenize as lm-eval's HF models do: the whole string at once, the context's tokens a
    prefix (after BOS where the tokenizer adds one); trailing spaces of the context move to the
    continuation. Our tasks and the lm-eval
    adapter both use it, so both score the same tokens."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return Request(tok.prefix + whole[:len(ctx)], whole[len(ctx):])


def _window(r: Request, seq_length: int) -> list[int]:
    if not r.continuation:
        raise ConfigError("a request has an empty continuation")
    if len(r.continuation) > seq_length:
        raise ConfigError(f"a continuation of {len(r.continuation)} tokens does not fit the "
                          f"sequence length {seq_length}")
    # The context is cut from the left to fit (lm-eval does the same).
    return (r.context + r.continuation)[-(seq_length + 1):]


def _target_logit_and_max(logits: torch.Tensor, targets: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logit of each target, max logit) over the whole vocabulary from TP shards [b, s, V/tp]."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    width = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * width
    here = (targets >= start) & (targets < start + width)
    local = logits.gather(-1, (targets - start).clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    target = torch.where(here, local, torch.full_like(local, float("-inf")))
    best = logits.max(-1).values
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(target, dist.ReduceOp.MAX, group=group)
        dist.all_reduce(best, dist.ReduceOp.MAX, group=group)
    return target, best


def _score_microbatch(logits: torch.Tensor, mb: dict) -> torch.Tensor:
    """[b, 2]: (sum of continuation log-probs, all continuation tokens greedy) per row."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = logits.float()
    target, best = _target_logit_and_max(logits, mb["labels"])
    logp = -vocab_parallel_cross_entropy(logits, mb["labels"])  # works in place: after the max
    mask = mb["loss_mask"]
    greedy = ((target >= best) | ~mask).all(-1)
    return torch.stack([(logp * mask).sum(-1).double(), greedy.double()], -1)


def score(chunks, requests: list[Request], seq_length: int, micro_batch_size: int = 1
          ) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) per request, the same on every rank."""
    from megatron.core import parallel_state

    windows = [_window(r, seq_length) for r in requests]
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
    tp = parallel_state.get_tensor_model_parallel_world_size()
    dp = parallel_state.get_data_parallel_world_size()
    mine = data_parallel_share(order, pad=-1)  # -1: an empty request (expert parallelism)
    # under expert parallelism every rank's k-th microbatch has the same shape: the longest of
    # them all (every rank knows every share)
    experts_meet = parallel_state.get_expert_model_parallel_world_size() > 1
    shares = [order[r::dp] for r in range(dp)] if experts_meet else [mine]
    mbs = []
    for k in range(0, len(mine), micro_batch_size):
        idx = mine[k:k + micro_batch_size]
        length = max(len(windows[i]) for share in shares
                     for i in share[k:k + micro_batch_size]) - 1
        length += (-length) % tp  # sequence parallelism splits the sequence over TP
        tokens = torch.zeros(micro_batch_size if experts_meet else len(idx), length + 1,
                             dtype=torch.long)
        mask = torch.zeros(tokens.shape[0], length, dtype=torch.bool)
        for row, i in enumerate(idx):
            if i < 0:
                continue
            w = windows[i]
            tokens[row, :len(w)] = torch.tensor(w)
            n = len(requests[i].continuation)
            mask[row, len(w) - 1 - n:len(w) - 1] = True
        mbs.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                    "loss_mask": mask, "index": idx})
    # Microbatches differ in length: pipeline stages exchange shapes before activations.
    config = chunks[0].config
    config.variable_seq_lengths, saved = True, config.variable_seq_lengths
    try:
        outs = forward_microbatches(chunks, mbs, _score_microbatch, loss_in_model=False)
    finally:
        config.variable_seq_lengths = saved
    local = torch.zeros(len(requests), 2, dtype=torch.float64, device=device())
    for mb, out in zip(mbs, outs, strict=False):  # last stage only
        rows = [row for row, i in enumerate(mb["index"]) if i >= 0]
        local[[mb["index"][row] for row in rows]] = out[rows]
    # Each request was scored on exactly one data-parallel rank.
    local = total_over_ranks(local, local.shape)
    return [(logp, bool(greedy)) for logp, greedy in local.tolist()]
