"""Host memory for streaming work (checkpoint import and export): one tensor read, written and
freed after another."""

from __future__ import annotations

import ctypes

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_THRESHOLD = 1 << 20


def return_freed_tensors_to_the_os() -> None:
    """glibc serves blocks up to 32 MiB from its heap once a block that large has been freed (its
    dynamic mmap threshold), and a heap seldom shrinks: a 2-rank export of a 1B Llama kept a third
    of its weights' size more than it needed, and peaked a quarter above its bound. A fixed
    threshold maps every block of 1 MiB or more on its own, so freeing a tensor unmaps it. The
    setting is per process, and harmless to what follows. No-op where libc is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)
