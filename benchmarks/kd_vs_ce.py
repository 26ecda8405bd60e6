"""The method's claim on the real model: a pruned SmolLM2 recovers more under knowledge
distillation than under plain cross-entropy training with the same data, steps and seed.

    python benchmarks/kd_vs_ce.py [--teacher CKPT] [--steps 20] [--correction-steps 60]

Student: SmolLM2 with layers 12..17 dropped (30 -> 24). Teacher: SmolLM2 after teacher
correction (2408.11796: the teacher first trained with CE on the distillation data; without it the
teacher's soft labels describe its pretraining data, not Shakespeare, and CE wins). Train: 35
plays; validation: the 3 held-out plays. Prints the held-out loss of the teacher (before and after
correction), the pruned student, and the student after K steps of CE and of KD (~12 min on 2 CPU
cores).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import kd_data, teacher_checkpoint  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--correction-steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-4)
    a = p.parse_args()

    from megatron_minitron.cli import main as cli
    from megatron_minitron.distill.report import val_lm_first_last

    teacher = teacher_checkpoint(a.teacher)
    work = Path(tempfile.mkdtemp())
    kd_data(teacher, work)
    assert cli(["prune", "--load", str(teacher), "--drop-layers", "12,13,14,15,16,17",
                "--out", str(work / "student")]) == 0
    common = ["--data", str(work / "train"), "--valid-data", str(work / "valid"),
              "--global-batch-size", "4", "--seq-length", "128", "--eval-iters", "8",
              "--lr", str(a.lr), "--min-lr", str(a.lr / 10)]
    ce = ["--kd-weight", "0", "--lm-weight", "1"]

    def distill(t: Path, s: Path, save: str, steps: int, *flags: str) -> Path:
        assert cli(["distill", "--teacher", str(t), "--student", str(s), "--save",
                    str(work / save), "--train-iters", str(steps), *common, *flags]) == 0
        return work / save / f"iter_{steps:07d}"

    corrected = distill(teacher, teacher, "correction", a.correction_steps, *ce)
    distill(corrected, work / "student", "ce", a.steps, *ce)
    distill(corrected, work / "student", "kd", a.steps)
    t0, t1 = val_lm_first_last(work / "correction")
    pruned, ce_loss = val_lm_first_last(work / "ce")
    _, kd_loss = val_lm_first_last(work / "kd")
    rows = [("teacher", t0), (f"teacher, corrected {a.correction_steps} steps", t1),
            ("pruned student (24 layers)", pruned), (f"+ {a.steps} steps CE", ce_loss),
            (f"+ {a.steps} steps KD", kd_loss)]
    print(f"held-out loss (3 plays, {8 * 4 * 128} tokens)")
    for name, loss in rows:
        print(f"  {name:<32} {loss:.4f}")
    print(f"{'KD' if kd_loss < ce_loss else 'CE'} better by {abs(ce_loss - kd_loss):.4f}")

if __name__ == "__main__":
    main()
