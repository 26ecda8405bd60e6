"""Cosine loss between the student's and the teacher's final hidden states (the inputs of the
output layer), the teacher's mapped onto the embedding channels that pruning kept.

The mapping is the pruning itself: a pruned student's channel i is the teacher's channel
`hidden_map[i]` (written by `minitron prune`), so no learned projection is needed. Only the last
hidden state is used: it lives on the last pipeline stage with the logits, at any PP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_minitron.checkpoint.layout import FINAL_NORMS
from megatron_minitron.config import CheckpointMeta, ConfigError


def hidden_map(teacher: CheckpointMeta, student: CheckpointMeta) -> torch.Tensor:
    """The teacher channels the student's hidden states correspond to, in student order."""
    h_t, h_s = teacher.model.hidden_size, student.model.hidden_size
    channels = student.hidden_map
    if channels is None:
        if h_s != h_t:
            raise ConfigError(f"the hidden-state loss needs the student's channel map: hidden "
                              f"{h_s} != teacher {h_t} and the student was not written by prune")
        return torch.arange(h_t)
    if len(channels) != h_s or max(channels) >= h_t:
        raise ConfigError(f"the student's hidden_map ({len(channels)} channels up to "
                          f"{max(channels)}) does not fit hidden {h_s} <- teacher {h_t}")
    return torch.tensor(channels)


class FinalHidden:
    """Keeps the last output of the final norm of a last-stage chunk (GPTModel or MambaModel):
    [s, b, h] ([s/tp, b, h] under sequence parallelism). Absent (None) on other stages."""

    def __init__(self, chunk):
        self.value: torch.Tensor | None = None
        held = dict(chunk.named_modules())
        norm = next((held[path] for path in FINAL_NORMS if held.get(path) is not None), None)
        self.handle = norm.register_forward_hook(self._keep) if norm is not None else None

    def _keep(self, _module, _inputs, output) -> None:
        self.value = output[0] if isinstance(output, tuple) else output

    def pop(self) -> torch.Tensor | None:
        value, self.value = self.value, None
        return value


def cosine_loss_sum(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                    sequence_parallel: bool) -> torch.Tensor:
    """sum over unmasked tokens of 1 - cos(student, teacher); hidden states [s, b, h], mask [b, s].
    Under sequence parallelism each TP rank holds a slice of the sequence: its partial sum is
    all-reduced (backward: identity, each rank's slice gets its own gradient)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    mask = mask.t()
    if sequence_parallel:
        s = student.shape[0]
        mask = mask[parallel_state.get_tensor_model_parallel_rank() * s:][:s]
    loss = ((1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)) * mask).sum()
    return reduce_from_tensor_model_parallel_region(loss) if sequence_parallel else loss
