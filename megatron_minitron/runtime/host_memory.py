"""Host memory for streaming work (checkpoint import and export): one tensor read, written and
freed after another."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

# glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_STREAMING = 1 << 20
# Where glibc's dynamic thresholds end up once a block of 32 MiB has been freed (any model load).
_AFTER = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 64 << 20}
_depth = 0


@contextlib.contextmanager
def tensors_freed_to_the_os() -> Iterator[None]:
    """glibc serves blocks up to 32 MiB from its heap once a block that large has been freed (its
    dynamic mmap threshold), and a heap seldom shrinks: a 2-rank export of a 1B Llama kept a third
    of its weights' size more than it needed, and peaked a quarter above its bound. Inside, every
    block of 1 MiB or more is mapped on its own, so freeing a tensor unmaps it. Not for compute: a
    fresh mapping per activation faults its pages in every time (a CPU matmul loop ran 2.7x
    slower), so on leaving, the thresholds take the values glibc's own adjustment would have
    reached. No-op where libc is not glibc."""
    global _depth
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        yield
        return
    _depth += 1
    libc.mallopt(_M_MMAP_THRESHOLD, _STREAMING)
    try:
        yield
    finally:
        _depth -= 1
        if not _depth:
            for param, value in _AFTER.items():
                libc.mallopt(param, value)
