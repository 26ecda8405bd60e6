"""Ctrl-C that is never lost, and SLURM's preemption warning.

Python raises KeyboardInterrupt wherever the main thread happens to be. When that is inside a
callback whose exceptions Python only prints ("Exception ignored in ..."): logging's at-fork hook,
which runs each time the checkpoint writer forks, or a `__del__`, the interrupt vanishes and the
command runs on, after Python prints a traceback. So the handler records the signal, every
progress tick of a long loop raises a recorded one again, and code that forks (checkpoint writes)
runs `deferred()`: the handler only records, and the interrupt is raised when the block ends.

SIGUSR1 is SLURM's warning before a preemption or the time limit (`--signal=USR1@120`, passed on
to every rank by `slurm/minitron.sbatch`): it is only recorded; the training loop asks
`preemption_requested()` between steps, writes a checkpoint and stops (`Preempted`), and the
requeued job resumes from it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

_pending = False
_deferring = 0
_preempted = False


class Preempted(Exception):
    """The job was told it will be stopped; a checkpoint was written. Commands exit 143 (as if
    SIGTERM ended them), so a requeued job resumes and a scheduler sees a stopped run."""

    exit_code = 143


def _on_sigusr1(signum, frame) -> None:
    global _preempted
    _preempted = True


def preemption_requested() -> bool:
    return _preempted


def _on_sigint(signum, frame) -> None:
    global _pending
    _pending = True
    if not _deferring:
        raise KeyboardInterrupt


@contextmanager
def deferred() -> Iterator[None]:
    """A Ctrl-C inside the block is raised when it ends (the block runs to completion)."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring:
        raise_if_interrupted()


def install() -> None:
    """In the command's main thread; leaves an ignored SIGINT (nohup, background jobs) ignored."""
    global _pending, _preempted
    _pending = _preempted = False
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    signal.signal(signal.SIGUSR1, _on_sigusr1)


def raise_if_interrupted() -> None:
    if _pending:
        raise KeyboardInterrupt
