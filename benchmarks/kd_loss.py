"""The distillation losses alone, forward + backward on one microbatch of logits, against the
cross-entropy they replace, side by side in one process.

    python benchmarks/kd_loss.py [--micro-batch-size 2] [--seq-length 128] [--top-k 64]

Logits are SmolLM2's shape (49,152-token vocabulary) in fp32, random (the cost does not depend
on the values); the teacher's top k are taken beforehand, as the KD step takes them during the
teacher's forward. Prints each loss's time (median, min, max over interleaved repeats) and its
ratio to the cross-entropy with the spread over the repeats.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import alternate, ratio  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=49152)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()

    import torch
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_minitron.cli import _quiet_third_party
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.distill.losses import kd_loss, top_k_logits
    from megatron_minitron.runtime import init_runtime

    _quiet_third_party()
    init_runtime(ParallelConfig())
    g = torch.Generator().manual_seed(0)
    shape = (a.seq_length, a.micro_batch_size, a.vocab_size)
    student = torch.randn(shape, generator=g).requires_grad_()
    teacher = torch.randn(shape, generator=g)
    labels = torch.randint(a.vocab_size, shape[:-1], generator=g)
    top = top_k_logits(teacher, a.top_k)

    def backward(loss: torch.Tensor) -> None:
        loss.sum().backward()
        student.grad = None

    res = alternate({
        "cross-entropy": lambda: backward(vocab_parallel_cross_entropy(student, labels)),
        "KD, whole vocabulary": lambda: backward(kd_loss(student, teacher)),
        f"KD, teacher top-{a.top_k}": lambda: backward(kd_loss(student, top)),
    }, a.repeats)
    ce = res["cross-entropy"]
    print(f"{a.micro_batch_size} x {a.seq_length} tokens, vocabulary {a.vocab_size:,}, fp32, "
          "forward + backward")
    for name, t in res.items():
        print(f"{name:22} {t}  peak {t.peak / 2**20:6.0f} MiB")
    for name, t in res.items():
        if t is not ce:
            print(f"ratio {name} / cross-entropy  {ratio(t, ce)}")


if __name__ == "__main__":
    main()
