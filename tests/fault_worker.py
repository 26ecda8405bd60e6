"""Run by test_errors: `minitron ARGS` on a disk that fails. Every file opened for writing whose
path contains $FAULT_PATH raises $FAULT_ERRNO (ENOSPC: the disk is full; EIO: it is failing),
in this process and in the checkpoint writer processes it forks."""

import builtins
import errno
import os
import sys

from megatron_minitron.cli import main

_real_open = builtins.open


def _failing_open(file, mode="r", *args, **kwargs):
    if "w" in mode and os.environ["FAULT_PATH"] in str(file):
        code = getattr(errno, os.environ.get("FAULT_ERRNO", "ENOSPC"))
        raise OSError(code, os.strerror(code), str(file))
    return _real_open(file, mode, *args, **kwargs)


if __name__ == "__main__":
    builtins.open = _failing_open
    sys.exit(main(sys.argv[1:]))
