"""Prune + write time vs `torch.save` of the same pruned state dict, side by side in one process.

    python benchmarks/prune.py [--load CKPT] [--scores SCORES]

Prints the time ratios (goal <= 1.5 over torch.save, or <= 1.2 over Megatron's own save of the
result) and the extra peak memory of prune + write relative to the source model's size. Without
--scores, scores are computed on 8 x 128 tokens first (not timed).
Also the floor of any out-of-place prune: copying the result's tensors into fresh memory (what
slicing must write at least), then Megatron's save of it. Prune + write is the `prune` stage's:
it consumes its source, so each run gets a freshly loaded copy (untimed), and the saves that
follow it time its result in the same process state. Megatron's save forks its writer processes
and varies by a third from run to run here, hence the default of 9 rounds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import alternate, calibration_samples, load_teacher, ratio  # noqa: E402

TARGET = dict(ffn=1024, hidden=448, heads=6, layers=24)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--load")
    p.add_argument("--scores")
    p.add_argument("--repeats", type=int, default=9)
    a = p.parse_args()

    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.config import CheckpointMeta
    from megatron_minitron.importance import ImportanceConfig, compute_importance, load_scores
    from megatron_minitron.model import load_model
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
    model_bytes = sum(p.numel() * p.element_size() for p in chunks[0].parameters())
    del chunks  # every run starts from the stage's state: a loaded source, nothing else
    source, result = [], []

    def load_source():
        result.clear()
        source[:] = [load_model(ckpt, rt.parallel, keep_dtype=True)[2]]

    def prune_and_write():
        result[:] = prune_model(source.pop(), meta.model, plan, rt.parallel, release_source=True)
        mcore.save_checkpoint(result, new_meta, work / "pruned", mcore.tokenizer_files(ckpt))

    def dist_save():
        mcore.save_checkpoint(result, new_meta, work / "dist", mcore.tokenizer_files(ckpt))

    def state_dict():
        return {k: v for k, v in result[0].state_dict().items() if "_extra_state" not in k}

    def torch_save():
        torch.save(state_dict(), work / "pruned.pt")

    def copy_and_save():
        fresh = [t.clone() for t in state_dict().values()]
        dist_save()
        del fresh

    def clear(name):
        return lambda: shutil.rmtree(work / name, ignore_errors=True)

    # Each save times the result of the prune + write just before it, in the same process state.
    res = alternate({"prune+write": prune_and_write, "dist save": dist_save,
                     "torch.save": torch_save, "copy+save": copy_and_save}, a.repeats,
                    before={"prune+write": lambda: (clear("pruned")(), load_source()),
                            "dist save": clear("dist"), "copy+save": clear("dist")})
    ts, td, tp, tf = (res[k] for k in ("torch.save", "dist save", "prune+write", "copy+save"))
    pruned_bytes = sum(v.numel() * v.element_size() for v in state_dict().values())
    print(f"{ckpt.name}: {plan.summary()}; source {model_bytes / 2**20:.0f} MiB, pruned "
          f"{pruned_bytes / 2**20:.0f} MiB")
    print(f"torch.save of the pruned state dict  {ts}  (peak {ts.peak / 2**20:.0f} MiB)")
    print(f"Megatron dist-checkpoint save of it  {td}")
    print(f"fresh copy of it + that save (floor) {tf}")
    print(f"prune + dist-checkpoint write        {tp}  (peak {tp.peak / 2**20:.0f} MiB)")
    print(f"time ratio over torch.save  {ratio(tp, ts, 1.5)}")
    print(f"time ratio over the dist-checkpoint save alone  {ratio(tp, td, 1.2)}")
    print(f"time ratio over the floor  {ratio(tp, tf)}")
    print(f"peak memory of prune + write over torch.save of its result: "
          f"+{(tp.peak - ts.peak) / model_bytes:.2f} x the source model's size (it starts from "
          "the loaded "
          "source: 1.00)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
