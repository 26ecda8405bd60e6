"""Shared benchmark plumbing: the model under test, a peak-memory meter, timing by alternation
and ratios reported with their run-to-run spread."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch


def teacher_checkpoint(load: str | None) -> Path:
    """`load`, or SmolLM2-135M converted from the shipped GGUF into a temporary directory."""
    if load:
        return Path(load)
    from megatron_minitron.checkpoint.convert import convert
    from megatron_minitron.data.demo import smollm2_gguf

    return convert(smollm2_gguf(), Path(tempfile.mkdtemp()) / "smollm2")


def kd_data(teacher: Path, work: Path, train_files: int | None = None) -> tuple[Path, Path]:
    """Indexed datasets WORK/train (the training plays, the first `train_files` of them) and
    WORK/valid (the first held-out play: all of them with `train_files` None), for KD runs."""
    from megatron_minitron.cli import main as cli
    from megatron_minitron.data.demo import held_out_plays, train_plays

    valid = held_out_plays() if train_files is None else held_out_plays()[:1]
    for name, files in (("train", train_plays()[:train_files]), ("valid", valid)):
        assert cli(["preprocess", "--input", *map(str, files), "--tokenizer", str(teacher),
                    "--output-prefix", str(work / name)]) == 0
    return work / "train", work / "valid"


def load_teacher(load: str | None):
    """(checkpoint path, meta, runtime, chunks) at TP=1 in this process, third-party noise off."""
    from megatron_minitron.cli import _quiet_third_party
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.model import load_model

    _quiet_third_party()
    ckpt = teacher_checkpoint(load)
    rt, meta, chunks = load_model(ckpt, ParallelConfig())
    return ckpt, meta, rt, chunks


def with_random_heads(plan, model, seed: int):
    """`plan` with the heads it keeps in every group and layer drawn at random instead."""
    g = torch.Generator().manual_seed(seed)
    per_group = model.num_attention_heads // model.num_query_groups
    keep = plan.model.num_attention_heads // plan.model.num_query_groups
    for i in plan.heads:
        plan.heads[i] = torch.cat([q * per_group + torch.randperm(per_group, generator=g)[:keep]
                                   .sort().values for q in range(model.num_query_groups)])
    return plan


def calibration_samples(ckpt: Path, vocab_size: int, n: int, seq_length: int) -> torch.Tensor:
    """n windows from the first training plays (seed 0)."""
    from megatron_minitron.data.calibration import sample_windows, token_stream
    from megatron_minitron.data.demo import train_plays
    from megatron_minitron.data.tokenizer import load_tokenizer

    ids = token_stream(train_plays()[:4], load_tokenizer(ckpt), vocab_size)
    return sample_windows(ids, n, seq_length, seed=0)


def _exact_cpu_heap() -> None:
    """Make glibc serve every allocation over 64 KiB by mmap and unmap it on free, so process
    RSS follows live tensor memory (otherwise freed heap stays resident and peaks drift).
    Slows allocation: call it after the timed runs."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)


def peak_memory(fn) -> int:
    """Peak bytes while `fn` runs: CUDA allocator peak on GPU, sampled process RSS on CPU."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    _exact_cpu_heap()
    proc, stop = psutil.Process(), threading.Event()
    peak = [proc.memory_info().rss]

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return peak[0]


@dataclass
class Timing:
    """Seconds of each repeat of one callable (in run order) and its peak memory in bytes."""

    seconds: list[float]
    peak: int

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def __add__(self, other: Timing) -> Timing:
        """Both run one after the other, repeat by repeat (a step made of two measured parts)."""
        return Timing([a + b for a, b in zip(self.seconds, other.seconds, strict=True)],
                      max(self.peak, other.peak))

    def __str__(self) -> str:
        unit, scale = ("ms", 1e3) if self.median < 1 else ("s", 1)
        lo, mid, hi = (x * scale for x in (min(self.seconds), self.median, max(self.seconds)))
        return f"{mid:7.2f} {unit} (min {lo:.2f}, max {hi:.2f}, {len(self.seconds)} runs)"


def ratio(new: Timing, base: Timing, goal: float | None = None) -> str:
    """new / base from the repeats run side by side (pair i: the i-th run of each), as median,
    min and max over the pairs, with a verdict that says when the pairs fall on both sides of
    the goal (or of 1, without one): then the ratio is within the run-to-run noise."""
    pairs = sorted(n / b for n, b in zip(new.seconds, base.seconds, strict=True))
    text = (f"{statistics.median(pairs):.3f} (min {pairs[0]:.3f}, max {pairs[-1]:.3f} over "
            f"{len(pairs)} pairs)")
    if len(pairs) < 3:
        return f"{text}; under 3 pairs: run-to-run noise not measured"
    line = goal if goal is not None else 1.0
    if pairs[0] <= line <= pairs[-1]:
        verdict = (f"goal <= {goal} within the run-to-run noise" if goal is not None
                   else "no difference beyond the run-to-run noise")
    elif pairs[-1] < line:
        verdict = f"goal <= {goal} met in every pair" if goal is not None else "lower in every pair"
    else:
        verdict = f"goal <= {goal} missed in every pair" if goal is not None else \
            "higher in every pair"
    return f"{text}: {verdict}"


def alternate(runs: dict, repeats: int = 3, before: dict | None = None) -> dict[str, Timing]:
    """Each callable timed over `repeats` interleaved runs (A B A B ..., so drift hits all
    alike), then its peak memory. `before[name]`, untimed, precedes every run of `name` (a run
    that consumes its input gets a fresh one)."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    before = before or {}
    for _ in range(repeats):
        for name, fn in runs.items():
            before.get(name, lambda: None)()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    peaks = {}
    for name, fn in runs.items():
        before.get(name, lambda: None)()
        peaks[name] = peak_memory(fn)
    return {k: Timing(v, peaks[k]) for k, v in times.items()}
