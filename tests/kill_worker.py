"""Run by test_faults: `minitron ARGS`, SIGKILLed at one chosen point of its writes, as a
scheduler or the OOM killer would. $KILL_AT is `EVENT:TEXT[:N]`, the N-th (default 1) event whose
path contains TEXT:

- `open`:    before a file is opened for writing (nothing of it written yet);
- `written`: after safetensors wrote a file (written, not yet renamed into place);
- `renamed`: after a file or directory is renamed (`os.replace`/`os.rename`: committed, before
  whatever the command does next).

$KILL_SIGNAL=USR1 sends SLURM's preemption warning to this process instead of killing.

The kill takes the whole process group (start it with start_new_session): the command, its
checkpoint-writer processes and torchrun ranks die at once, as under `scancel`. The patches are
inherited by forked writers, so a write made there is a kill point too."""

import builtins
import io
import os
import signal
import sys

import safetensors.torch

from megatron_minitron.cli import main

EVENT, TEXT, *_n = os.environ["KILL_AT"].split(":")
_left = int(_n[0]) if _n else 1


def _maybe_kill(event: str, path) -> None:
    global _left
    if event == EVENT and TEXT in str(path):
        _left -= 1
        if _left == 0 and os.environ.get("KILL_SIGNAL") == "USR1":
            os.kill(os.getpid(), signal.SIGUSR1)
        elif _left == 0:
            os.killpg(0, signal.SIGKILL)


def _wrap_open(real):
    def opened(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            _maybe_kill("open", file)
        return real(file, mode, *args, **kwargs)
    return opened


def _wrap_after(real, event: str, arg: int):
    def call(*args, **kwargs):
        out = real(*args, **kwargs)
        _maybe_kill(event, args[arg])
        return out
    return call


if __name__ == "__main__":
    builtins.open = io.open = _wrap_open(io.open)
    os.replace = _wrap_after(os.replace, "renamed", 1)
    os.rename = _wrap_after(os.rename, "renamed", 1)
    safetensors.torch.save_file = _wrap_after(safetensors.torch.save_file, "written", 1)
    sys.exit(main(sys.argv[1:]))
