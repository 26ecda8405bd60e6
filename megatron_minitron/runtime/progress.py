"""Progress lines with rate and ETA for long loops (logged by global rank 0 only)."""

from __future__ import annotations

import logging
import time

import torch.distributed as dist

from megatron_minitron.runtime.interrupt import raise_if_interrupted

log = logging.getLogger("minitron")


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """`hint` is said once, with the first line, when the whole loop will take over
    `long_s`: how to ask for less (expensive defaults, e.g. importance's 1024 x 4096 tokens)."""

    def __init__(self, what: str, total: int, unit: str = "tokens", every_s: float = 10.0,
                 hint: str | None = None, long_s: float = 600.0):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.hint, self.long_s = hint, long_s
        self.done = 0
        self.start = self.last = time.time()
        self.quiet = dist.is_initialized() and dist.get_rank() != 0

    def update(self, n: int) -> None:
        raise_if_interrupted()
        self.done += n
        now = time.time()
        # A line every `every_s`, and a last one only for loops long enough to have had one.
        if self.quiet or now - self.last < self.every_s and (
                self.done < self.total or now - self.start < self.every_s):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        log.info("%s: %d/%d %s (%.3g %s/s, ETA %s)", self.what, self.done, self.total,
                 self.unit, rate, self.unit, _duration(eta))
        if self.hint and eta > self.long_s:
            log.info("%s: %d %s take about %s at this rate; %s", self.what, self.total,
                     self.unit, _duration(self.total / rate), self.hint)
            self.hint = None
