"""Write-then-rename outputs: a failed or killed command leaves nothing at DST, and a rerun
starts from a clean slate (a staging name left by a SIGKILL is removed before it is reused)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from megatron_minitron.config import ConfigError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give PATH (and, for a directory, everything in it) the modes the user's umask asks for.
    safetensors writes its files 0600, whatever the umask: colleagues could not read a shared
    checkpoint or export."""
    mask = _umask()
    path = Path(path)
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in items:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


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
            honour_umask(stage)
            if dst.exists():
                dst.rmdir()
            stage.rename(dst)
        barrier()
    except BaseException:
        if is_writer:
            shutil.rmtree(stage, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a temporary name beside PATH, renamed over PATH when the block succeeds and removed
    when it fails: a reader, or a rerun after a SIGKILL, sees the old file or the new one, never
    half of one."""
    path = Path(path)
    tmp = staging_path(path)
    try:
        yield tmp
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


LOCK = ".lock"


def _holder_alive(text: str) -> bool:
    """Whether the `host pid [job]` written in a lock file is a live process. A holder on another
    host (a shared file system under SLURM) cannot be checked from here: it counts as alive,
    unless it ran in this same SLURM job. A job runs once at a time, so that holder is the job's
    run before a requeue, which may have put rank 0 on another node."""
    import socket

    try:
        host, pid, *job = text.split()
        pid = int(pid)
    except ValueError:
        return False  # torn or foreign content: nobody holds it
    if job and job[0] == os.environ.get("SLURM_JOB_ID"):
        return host == socket.gethostname() and _pid_alive(pid)
    return host != socket.gethostname() or _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slurm_job() -> list[str]:
    job = os.environ.get("SLURM_JOB_ID")
    return [job] if job else []


@contextlib.contextmanager
def directory_lock(directory: Path, is_holder: bool = True):
    """Refuse a second command writing the same run directory at once: DIR/.lock holds the
    holder's host, pid and SLURM job while it runs; a lock left by a dead process (SIGKILL) or by
    this job before its requeue is taken over.
    In a distributed job only the first rank (`is_holder`) takes it."""
    import socket

    if not is_holder:
        yield
        return
    directory = Path(directory)
    created = not directory.exists()  # removed again if the command leaves it empty
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK
    me = " ".join([socket.gethostname(), str(os.getpid()), *_slurm_job()])
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = lock.read_text()
            except FileNotFoundError:
                continue  # released between our two looks
            if _holder_alive(holder):
                raise ConfigError(f"{directory} is in use by process {holder.strip()} "
                                  f"({lock}); wait for it, or delete the lock if that process "
                                  "is gone") from None
            lock.unlink(missing_ok=True)  # its holder died: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    try:
        yield
    finally:
        if lock.is_file() and lock.read_text() == me:
            lock.unlink()
        if created and not any(directory.iterdir()):
            directory.rmdir()
