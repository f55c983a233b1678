"""One process at a time per run folder and per bank folder.

Two processes on one folder corrupt each other without a word: a second run resumed while the first still trains
rolls the mmap bank back under it, a host bank re-initialises another run's rows, both append to one log. So the
process that writes a folder holds an advisory POSIX lock on `<folder>/.pic.lock` for as long as it lives (the
kernel drops it when the process ends, however it ends: a kill leaves nothing stale). POSIX record locks belong to
the process, so code that opens the same folder twice within one process (tests, a re-opened bank) is not refused;
another process is, with one line that names the holder's pid.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".pic.lock"


def lock_folder(folder: str | os.PathLike, what: str, error: type[Exception]) -> int:
    """Lock `folder` (which must exist) for this process; returns the lock file's descriptor (keep it open: closing
    any descriptor of the file drops the lock). Raises `error` when another process holds it."""
    path = Path(folder) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise error(f"{what} {folder} is in use by another process (pid {holder}); wait for it to end or stop it "
                    f"(two processes on one folder would overwrite each other)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
