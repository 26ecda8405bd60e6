"""Run under torchrun by test_distill: the vocabulary-parallel KD loss (whole and top-k) and its
gradient on each rank's vocabulary shard, gathered, against F.kl_div on the full logits."""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_minitron.distill.losses import kd_loss, top_k_logits


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 12, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(2, 5, 12, generator=g, dtype=torch.float64) * 3
    worst = 0.0
    for temperature, k in ((1.0, None), (2.0, None), (1.0, 4), (2.0, 4)):
        target = teacher
        if k:  # the reference: everything outside the teacher's top k masked out
            top = teacher.topk(k, -1)
            target = torch.full_like(teacher, float("-inf")).scatter(-1, top.indices, top.values)
        full = student.clone().requires_grad_(True)
        ref = F.kl_div(F.log_softmax(full / temperature, -1), F.softmax(target / temperature, -1),
                       reduction="none").sum(-1) * temperature ** 2
        ref.sum().backward()
        shard = student.chunk(world, -1)[rank].clone().requires_grad_(True)
        mine = teacher.chunk(world, -1)[rank]
        if k:
            mine = top_k_logits(mine, k, dist.group.WORLD)
            assert torch.equal(mine.ids, top.indices), "top-k ids differ from the full top-k"
        ours = kd_loss(shard, mine, temperature, dist.group.WORLD)
        ours.sum().backward()
        grads = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(grads, shard.grad)
        worst = max(worst, (ours - ref).abs().max().item(),
                    (torch.cat(grads, -1) - full.grad).abs().max().item())
    print(f"rank {rank}: max |diff| {worst:.2e}")
    dist.destroy_process_group()
    sys.exit(0 if worst <= 1e-5 else 1)


if __name__ == "__main__":
    main()
