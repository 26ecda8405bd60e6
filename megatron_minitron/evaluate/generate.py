"""Greedy continuation (no KV cache: a demo and smoke check, not a serving path)."""

from __future__ import annotations

import torch

from megatron_minitron.model.forward import broadcast_from_last_stage, logits


def greedy(chunks, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None
           ) -> list[int]:
    from megatron.core import parallel_state

    ids = list(prompt_ids)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for _ in range(max_new_tokens):
        # Sequence parallelism needs s % tp == 0: pad on the right, which a causal model ignores
        # at the position we read.
        pad = (-len(ids)) % tp
        out = logits(chunks, torch.tensor([ids + ids[-1:] * pad]))
        nxt = None if out is None else out[0, len(ids) - 1].argmax().reshape(1)
        nxt = int(broadcast_from_last_stage(nxt, (1,), dtype=torch.long).item())
        ids.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
    return ids[len(prompt_ids):]
