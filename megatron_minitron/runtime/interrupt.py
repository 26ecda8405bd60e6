"""Ctrl-C that is never lost.

Python raises KeyboardInterrupt wherever the main thread happens to be. When that is inside a
callback whose exceptions Python only prints ("Exception ignored in ..."): logging's at-fork hook,
which runs each time the checkpoint writer forks, or a `__del__`, the interrupt vanishes and the
command runs on. The handler therefore also records the signal, and every progress tick of a long
loop raises a recorded one again.
"""

from __future__ import annotations

import signal

_pending = False


def _on_sigint(signum, frame) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


def install() -> None:
    """In the command's main thread; leaves an ignored SIGINT (nohup, background jobs) ignored."""
    global _pending
    _pending = False
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def raise_if_interrupted() -> None:
    if _pending:
        raise KeyboardInterrupt
