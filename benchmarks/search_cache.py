"""`minitron search` with and without a teacher cache, side by side in one process.

    python benchmarks/search_cache.py [--teacher CKPT] [--candidates 4] [--kd-tokens 4096]

Both searches prune the same candidates from the same scores and distill each on the same tokens
with top-k KD. With `--teacher-cache`, the first candidate runs the teacher and stores its top k;
the others read them and never load the teacher. Prints both wall times, their ratio, that the
rankings agree, and the cache's disk use per million tokens.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import kd_data, teacher_checkpoint  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher")
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--kd-tokens", type=int, default=4096)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--top-k", type=int, default=64)
    a = p.parse_args()

    from megatron_minitron.cli import _quiet_third_party
    from megatron_minitron.cli import main as cli
    from megatron_minitron.data.demo import train_plays
    from megatron_minitron.distill.train import DistillConfig
    from megatron_minitron.search.run import SearchConfig, search

    _quiet_third_party()
    teacher = teacher_checkpoint(a.teacher)
    work = Path(tempfile.mkdtemp())
    kd_data(teacher, work, 4)
    scores = work / "scores.safetensors"
    assert cli(["importance", "--load", str(teacher), "--data", str(train_plays()[1]),
                "--samples", "16", "--seq-length", "128", "--depth-samples", "0",
                "--out", str(scores)]) == 0

    def run(name: str, cache: Path | None) -> tuple[float, list[str]]:
        kd = DistillConfig(train_iters=1, global_batch_size=a.global_batch_size,
                           seq_length=a.seq_length, eval_iters=2, top_k=a.top_k,
                           teacher_cache=str(cache) if cache else None)
        cfg = SearchConfig(target_params=0.7, candidates=a.candidates, kd_tokens=a.kd_tokens,
                           kd=kd)
        t = time.perf_counter()
        report = search(teacher, scores, [str(work / "train")], [str(work / "valid")],
                        work / name, cfg)
        return time.perf_counter() - t, [c["name"] for c in report["ranking"]]

    t_live, rank_live = run("live", None)
    cache = work / "teacher_cache"
    t_cached, rank_cached = run("cached", cache)
    files = list(cache.rglob("*.safetensors"))
    tokens = len(files) * a.seq_length
    size = sum(f.stat().st_size for f in files)
    steps = max(1, a.kd_tokens // (a.global_batch_size * a.seq_length))
    print(f"{a.candidates} candidates x {steps} KD steps of {a.global_batch_size} x "
          f"{a.seq_length} tokens, top-{a.top_k} KD")
    print(f"search, teacher live        {t_live:8.1f} s")
    print(f"search, teacher cache       {t_cached:8.1f} s  (filled by the first candidate)")
    print(f"time ratio  {t_cached / t_live:.3f}")
    print(f"same ranking: {rank_live == rank_cached}  ({', '.join(rank_cached)})")
    print(f"cache: {len(files)} samples, {size / 2**20:.1f} MiB, "
          f"{size / tokens * 1e6 / 2**20:.0f} MiB per million tokens at k = {a.top_k}")


if __name__ == "__main__":
    main()
