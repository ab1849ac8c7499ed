"""An exclusive lock on a training output directory, so that two runs never share one.

Two runs writing the same `output_dir` delete each other's checkpoints (`save_total_limit`) and resume
from each other's half-finished state. The lock is an `fcntl.flock` on a file in the directory: the
operating system releases it when its process ends in any way (SIGKILL and the OOM killer included),
so a killed run never leaves a lock that blocks the next one. `flock` is advisory and local to one
machine (on NFS it is emulated with POSIX locks, which most servers honour).
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

LOCK_FILE = ".train_hf.lock"


class OutputDirectoryLockedError(RuntimeError):
    """Another process holds the lock of the output directory."""


@contextmanager
def lock_output_dir(output_dir: str | os.PathLike) -> Iterator[str]:
    """
    Hold an exclusive lock on `output_dir` (created if needed) for the duration of the `with` block.

    Args:
        output_dir: the training output folder.

    Yields:
        `str`: the path of the lock file (`output_dir/.train_hf.lock`), which records the holder's host and pid.

    Raises:
        OutputDirectoryLockedError: another process holds the lock; the message names it.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(os.fspath(output_dir), LOCK_FILE)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 256, 0).decode(errors="replace").strip() or "another process"
            raise OutputDirectoryLockedError(
                f"Another training run ({holder}) is using the output directory {output_dir}. Wait for it to "
                "finish, stop it, or give this run another --output_dir."
            ) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(descriptor)  # releases the lock


__all__ = ["LOCK_FILE", "OutputDirectoryLockedError", "lock_output_dir"]
