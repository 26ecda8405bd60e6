"""Host memory for streaming work (checkpoint import and export: one tensor read, written and
freed after another) and for tensors written once in full (pruning's sliced copies)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator

import torch

# glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_STREAMING = 1 << 20
# Where glibc's dynamic thresholds end up once a block of 32 MiB has been freed (any model load).
_AFTER = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 64 << 20}
_depth = 0
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


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


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def empty_huge(shape: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.empty` whose pages, on the host, fault in 2 MiB at a time. A large tensor that is
    written once in full, as a pruned copy is, spends most of its time in page faults with 4 KiB
    pages: slicing SmolLM2's embedding took 44 ms into fresh memory, 11 ms into huge pages, 6 ms
    into memory already touched. Asks the kernel by madvise (transparent huge pages in "madvise"
    or "always" mode); elsewhere, or on a device, a plain `torch.empty`."""
    t = torch.empty(shape, dtype=dtype, device=device)
    libc = _libc()
    if t.device.type != "cpu" or libc is None:
        return t
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:  # a request the kernel refuses (THP off) changes nothing
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    return t
