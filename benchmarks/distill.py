"""One KD step vs its parts (teacher forward; student forward + backward + optimizer step), all
timed in the same process on the same kind of batch.

    python benchmarks/distill.py [--teacher CKPT] [--global-batch-size 4] [--seq-length 128]

Student: the teacher with its layers 12..17 dropped (SmolLM2 30 -> 24). Prints the ratio
KD step / (teacher forward + student step), goal <= 1.05, and peak memory of each, with the
top-k KD step (the step holds k teacher logits per token instead of the vocabulary) and the
top-k KD step that reads the teacher's top k from a `--teacher-cache` (no teacher forward).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import alternate, kd_data, ratio, teacher_checkpoint  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher")
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top-k", type=int, default=64)
    a = p.parse_args()

    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.cli import _quiet_third_party
    from megatron_minitron.cli import main as cli
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.distill.train import DistillConfig, Distiller

    _quiet_third_party()
    teacher = teacher_checkpoint(a.teacher)
    work = Path(tempfile.mkdtemp())
    drop = ",".join(str(i) for i in range(12, 18))
    assert cli(["prune", "--load", str(teacher), "--drop-layers", drop,
                "--out", str(work / "student")]) == 0
    kd_data(teacher, work, 4)
    cfg = DistillConfig(train_iters=1000, global_batch_size=a.global_batch_size,
                        micro_batch_size=a.micro_batch_size, seq_length=a.seq_length)
    d = Distiller(teacher, work / "student", [str(work / "train")], work / "run", cfg,
                  ParallelConfig(), [str(work / "valid")])
    mbs = d._microbatches(d.train_data, 0)

    def kd_step(top_k: int = 0):
        cfg.kd_weight, cfg.lm_weight, cfg.top_k = 1.0, 0.0, top_k
        d.train_step()

    def student_step():  # the same step without a teacher: CE on the student alone
        cfg.kd_weight, cfg.lm_weight = 0.0, 1.0
        d.train_step()

    def cached_kd_step():  # the same batch each time: filled by the first call, read after
        cfg.kd_weight, cfg.lm_weight, cfg.top_k = 1.0, 0.0, a.top_k
        d.cache, d.iteration = cache, 0
        d.train_step()
        d.cache = None

    def teacher_forward():
        d._attach_teacher(mbs, "train", 0, always=True)

    cfg.teacher_cache, cfg.top_k = str(work / "teacher_cache"), a.top_k
    cache = d._teacher_cache(mcore.read_meta(teacher))
    kd_step()  # warm-up
    cached_kd_step()  # fills the cache for batch 0
    res = alternate({"kd": kd_step, "student": student_step, "teacher": teacher_forward,
                     "top_k": lambda: kd_step(a.top_k), "cached": cached_kd_step}, a.repeats)
    kd, student, teacher_fwd = res["kd"], res["student"], res["teacher"]
    print(f"{a.global_batch_size} x {a.seq_length} tokens per step, micro-batch "
          f"{a.micro_batch_size}")
    for name, t in (("teacher forward", teacher_fwd),
                    ("student forward+backward+optimizer step", student), ("KD step", kd),
                    (f"KD step, teacher top-{a.top_k} logits kept", res["top_k"]),
                    (f"KD step, top-{a.top_k} read from the teacher cache", res["cached"])):
        print(f"{name:48} {t}  peak {t.peak / 2**20:6.0f} MiB")
    print(f"ratio KD step / (teacher + student)  {ratio(kd, teacher_fwd + student, 1.05)}")
    print(f"ratio cached top-k KD step / student step  {ratio(res['cached'], student)}")

if __name__ == "__main__":
    main()
