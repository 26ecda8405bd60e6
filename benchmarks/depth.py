"""Depth metrics: the prefix-reusing pass vs whole skip passes from the tokens, side by side.

    python benchmarks/depth.py [--load CKPT] [--samples 4] [--seq-length 256] [--blocks 1]

Prints the time ratio (goal <= 0.6), the peak-memory ratio (the new pass keeps the hidden states
entering every layer for one microbatch) and the largest difference between the two sets of
scores (they should be identical).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import alternate, calibration_samples, load_teacher, ratio  # noqa: E402


def whole_passes(chunks, num_layers, samples, block_sizes, micro_batch_size) -> dict:
    """The baseline: every skip is a whole forward pass from the tokens."""
    from megatron_minitron.evaluate.perplexity import evaluate_windows
    from megatron_minitron.importance.depth import skipped

    base = evaluate_windows(chunks, samples, micro_batch_size).loss
    out = {"depth.base_loss": torch.tensor([base], dtype=torch.float64)}
    for k in block_sizes:
        rises = []
        for start in range(num_layers - k + 1):
            with skipped(chunks, set(range(start, start + k))):
                rises.append(evaluate_windows(chunks, samples, micro_batch_size).loss - base)
        out[f"depth.skip_loss.k{k}"] = torch.tensor(rises, dtype=torch.float64)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--load")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--blocks", type=int, nargs="+", default=[1])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    from megatron_minitron.importance.depth import skip_losses

    ckpt, meta, rt, chunks = load_teacher(a.load)
    samples = calibration_samples(ckpt, meta.model.vocab_size, a.samples, a.seq_length)
    args = (chunks, meta.model.num_layers, samples, tuple(a.blocks), a.micro_batch_size)
    got = {}
    res = alternate({
        "whole passes": lambda: got.__setitem__("old", whole_passes(*args)),
        "prefix reused": lambda: got.__setitem__("new", skip_losses(*args)),
    }, a.repeats)
    old, new = res["whole passes"], res["prefix reused"]
    diff = max((got["old"][k] - got["new"][k]).abs().max().item() for k in got["old"])
    passes = 1 + sum(meta.model.num_layers - k + 1 for k in a.blocks)
    print(f"model {meta.model.num_parameters() / 1e6:.1f}M params, {meta.model.num_layers} "
          f"layers, {a.samples} x {a.seq_length} tokens, blocks {a.blocks} ({passes} passes), "
          f"micro-batch {a.micro_batch_size}")
    print(f"whole skip passes   {old}  peak {old.peak / 2**20:8.0f} MiB")
    print(f"prefix reused       {new}  peak {new.peak / 2**20:8.0f} MiB")
    print(f"time ratio  {ratio(new, old, 0.6)}")
    print(f"peak-memory ratio  {new.peak / old.peak:.3f}")
    print(f"largest score difference  {diff:.2e}")


if __name__ == "__main__":
    main()
