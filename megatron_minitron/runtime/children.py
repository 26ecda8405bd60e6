"""Nothing a command starts outlives it.

Megatron's torch_dist writer forks one writer process per bucket and, once per process, starts a
`multiprocessing` *spawn* Manager (a server process that imports torch: ~290 MB) only to carry the
writers' results back. A command killed with SIGKILL (preemption, OOM killer, Ctrl-\\) left that
Manager, and any writer mid-write, running under init. Two measures:
- every child forked from this process gets a parent-death signal (SIGKILL), so it dies with us;
- the results queue is an in-process `queue.Queue`: saves here are synchronous (the writer proxy
  runs in this process), so no cross-process queue, hence no Manager, is needed.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal

_PR_SET_PDEATHSIG = 1
_installed = False


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: nothing to set
        pass


def install() -> None:
    """Once per process, before anything forks or saves a checkpoint."""
    global _installed
    if _installed:
        return
    os.register_at_fork(after_in_child=_die_with_parent)
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:  # megatron-core 0.16.x
        filesystem_async._results_queue = queue.Queue()
    _installed = True
