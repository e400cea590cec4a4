"""One collect at a time per activations folder.

Two collects writing the same folder would delete each other's unfinished shards and mix their
rows. The writer holds an advisory lock (`flock`) on a file inside the folder for the whole run,
and writes into it who it is, so that a second collect is refused with one line naming the first.
The kernel drops the lock when the process ends, however it ends: a lock file left by a killed run
is taken over by the next one. Hand-written rather than `filelock`, which does not say who holds
a lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.constants import WRITER_LOCK_NAME
from shared.errors import UserError


@contextmanager
def sole_writer(out: Path) -> Iterator[None]:
    """Hold `out`'s writer lock for the block, creating `out` if need be; a folder another process
    is writing is a UserError naming that process. The lock file goes when the block ends, and so
    does `out` when this call created it and the block left it empty."""
    out = Path(out)
    if out.exists() and not out.is_dir():  # nothing to lock: collect's check of --out refuses it
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / WRITER_LOCK_NAME
    try:
        fd = _acquire(path, out)
    except BaseException:
        if created:
            _remove_if_empty(out)
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, _holder().encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: a waiting process then finds no stale file
        os.close(fd)
        if created:
            _remove_if_empty(out)


def _acquire(path: Path, out: Path) -> int:
    """A descriptor of `path` holding its exclusive lock. The file locked must still be the one at
    `path`: a holder unlinks it on release, so a descriptor opened just before is retried."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(
                f"--out {out} is being written by another collect ({holder}); wait for it to end or give another folder"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _holder() -> str:
    command = " ".join(Path(sys.argv[0]).name if i == 0 else arg for i, arg in enumerate(sys.argv))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {command}"


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (or gone): what is there stays
        pass
