"""Write-then-rename output directories: a failed command leaves nothing at DST."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from megatron_minitron.config import ConfigError


def check_destination(dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConfigError(f"destination {dst} exists and is not empty; choose a new path")


def staging_path(dst: Path) -> Path:
    """Deterministic, so every rank of a distributed save agrees on it without talking."""
    return dst.parent / f".{dst.name}.partial"


@contextlib.contextmanager
def atomic_directory(dst: Path, is_writer: bool = True, barrier=lambda: None):
    """Yield a staging directory; on success rename it to `dst`, on failure remove it.

    In a distributed job every rank enters; only `is_writer` creates, renames or cleans up, and
    `barrier` orders the steps across ranks.
    """
    dst = Path(dst)
    check_destination(dst)
    stage = staging_path(dst)
    if is_writer:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
    barrier()
    try:
        yield stage
        barrier()
        if is_writer:
            if dst.exists():
                dst.rmdir()
            stage.rename(dst)
        barrier()
    except BaseException:
        if is_writer:
            shutil.rmtree(stage, ignore_errors=True)
        raise
