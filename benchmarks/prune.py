"""Prune + write time vs `torch.save` of the same pruned state dict, side by side in one process.

    python benchmarks/prune.py [--load CKPT] [--scores SCORES]

Prints the time ratio (goal <= 1.5) and the extra peak memory of prune + write relative to the
source model's size. Without --scores, scores are computed on 8 x 128 tokens first (not timed).
Also the floor of any out-of-place prune: copying the result's tensors into fresh memory (what
slicing must write at least), then Megatron's save of it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import alternate, calibration_samples, load_teacher  # noqa: E402

TARGET = dict(ffn=1024, hidden=448, heads=6, layers=24)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--load")
    p.add_argument("--scores")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.config import CheckpointMeta
    from megatron_minitron.importance import ImportanceConfig, compute_importance, load_scores
    from megatron_minitron.prune import PruneTarget, make_plan, prune_model

    ckpt, meta, rt, chunks = load_teacher(a.load)
    if a.scores:
        scores = load_scores(Path(a.scores))
    else:
        samples = calibration_samples(ckpt, meta.model.vocab_size, 8, 128)
        scores = compute_importance(chunks, meta.model, samples,
                                    ImportanceConfig(samples=8, seq_length=128, block_sizes=(6,),
                                                     depth_samples=2))
    target = TARGET if meta.model.num_layers == 30 else {}
    plan = make_plan(meta.model, PruneTarget(**target), scores)
    work = Path(tempfile.mkdtemp())
    new_meta = CheckpointMeta(model=plan.model, tokenizer=meta.tokenizer)

    def prune_and_write():
        shutil.rmtree(work / "pruned", ignore_errors=True)
        new = prune_model(chunks, meta.model, plan, rt.parallel)
        mcore.save_checkpoint(new, new_meta, work / "pruned", mcore.tokenizer_files(ckpt))

    pruned = prune_model(chunks, meta.model, plan, rt.parallel)
    pruned_sd = {k: v for k, v in pruned[0].state_dict().items() if "_extra_state" not in k}

    def torch_save():
        torch.save(pruned_sd, work / "pruned.pt")

    def dist_save():
        shutil.rmtree(work / "dist", ignore_errors=True)
        mcore.save_checkpoint(pruned, new_meta, work / "dist", mcore.tokenizer_files(ckpt))

    def copy_and_save():
        fresh = [t.clone() for t in pruned_sd.values()]
        dist_save()
        del fresh

    res = alternate({"torch.save": torch_save, "dist save": dist_save,
                     "copy+save": copy_and_save, "prune+write": prune_and_write}, a.repeats)
    (ts, ms), (td, _), (tp, mp) = res["torch.save"], res["dist save"], res["prune+write"]
    tf = res["copy+save"][0]
    model_bytes = sum(p.numel() * p.element_size() for p in chunks[0].parameters())
    print(f"{ckpt.name}: {plan.summary()}; source {model_bytes / 2**20:.0f} MiB, pruned "
          f"{sum(v.numel() * v.element_size() for v in pruned_sd.values()) / 2**20:.0f} MiB")
    print(f"torch.save of the pruned state dict  {ts:7.2f} s  (peak {ms / 2**20:.0f} MiB)")
    print(f"Megatron dist-checkpoint save of it  {td:7.2f} s")
    print(f"fresh copy of it + that save (floor) {tf:7.2f} s")
    print(f"prune + dist-checkpoint write        {tp:7.2f} s  (peak {mp / 2**20:.0f} MiB)")
    print(f"time ratio  {tp / ts:.2f} over torch.save (goal <= 1.5); {tp / td:.2f} over the "
          f"dist-checkpoint save alone (the pruning itself); {tp / tf:.2f} over the floor")
    print(f"peak memory of prune + write over torch.save: +{(mp - ms) / model_bytes:.2f} x the "
          "source model's size")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
