"""Importance pass vs plain forward over the same samples, side by side in one process.

    python benchmarks/importance.py [--load CKPT] [--samples 16] [--seq-length 256]

Prints time ratio (goal <= 1.10) and peak-memory ratio (goal <= 1.05). The importance pass is the
activation pass (hooks on every site); the depth metrics are separate forward passes and are
reported as their count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import alternate, calibration_samples, load_teacher, ratio  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--load")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    from megatron_minitron.importance.run import activation_pass, discard_output
    from megatron_minitron.model.forward import forward_microbatches

    ckpt, meta, rt, chunks = load_teacher(a.load)
    samples = calibration_samples(ckpt, meta.model.vocab_size, a.samples, a.seq_length)
    mbs = [{"tokens": t[:, :-1].contiguous()} for t in torch.split(samples, a.micro_batch_size)]

    res = alternate({
        "forward": lambda: forward_microbatches(chunks, mbs, discard_output),
        "importance": lambda: activation_pass(chunks, samples, a.micro_batch_size, meta.model),
    }, a.repeats)
    fwd, imp = res["forward"], res["importance"]
    tokens = a.samples * a.seq_length
    where = "GPU allocator" if torch.cuda.is_available() else "process RSS, mmap-backed heap"
    print(f"model {meta.model.num_parameters() / 1e6:.1f}M params, {a.samples} x {a.seq_length} "
          f"tokens, micro-batch {a.micro_batch_size}")
    for name, t in (("plain forward", fwd), ("importance pass", imp)):
        print(f"{name:18} {t}  {tokens / t.median:8.0f} tok/s  peak {t.peak / 2**20:8.0f} MiB")
    print(f"time ratio  {ratio(imp, fwd, 1.10)}")
    print(f"peak-memory ratio  {imp.peak / fwd.peak:.3f}  (goal <= 1.05; {where})")
    print(f"depth metrics: 1 + {meta.model.num_layers} forward passes over --depth-samples for "
          "single-layer skips, plus L - k + 1 per extra block size k")


if __name__ == "__main__":
    main()
