"""One writer per output folder: a second extraction or training into the same folder is refused,
naming who holds it, instead of interleaving its files with the first.

The lock is an exclusive POSIX record lock (`lockf`) on `<folder>/.arra-pipe.lock`, which holds
the owner's host, pid and command for the message. The kernel drops it when its process dies, so
a killed job leaves no stale lock to clean up; unlike `flock`, it is not inherited by forked
children (decoding workers), which would otherwise hold it after their parent was killed. POSIX
locks do not exclude their own process, so the locks this process holds are also kept in a set.
(On network filesystems the lock is only as good as the server's lock support.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from pipeline.errors import ArraError

LOCK = ".arra-pipe.lock"
_HELD: set[Path] = set()  # the folders this process holds


class LockedError(ArraError):
    """Another live process writes to this folder."""


class FolderLock:
    """`with FolderLock(folder): ...` holds the folder's lock for the block (the folder is created)."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK
        self.fd: int | None = None

    def __enter__(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.resolve() in _HELD:  # checked before opening: closing a second fd would drop our lock
            raise LockedError(f"{self.path.parent} is being written by {describe(self.path.read_text())}; "
                              "wait for it to finish or use another output folder")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                holder = os.read(fd, 4096).decode("utf-8", "replace")
                os.close(fd)
                raise LockedError(f"{self.path.parent} is being written by {describe(holder)}; wait for it to "
                                  "finish or use another output folder") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its previous holder unlinked while we opened it
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv)}).encode())
        self.fd = fd
        _HELD.add(self.path.resolve())
        return self

    def __exit__(self, *exc) -> None:
        _HELD.discard(self.path.resolve())
        self.path.unlink(missing_ok=True)  # while still held, so no one locks a removed file
        os.close(self.fd)
        self.fd = None


def main_rank_lock(folder: str | os.PathLike):
    """The folder's lock, held by rank 0 of a job (RANK unset: a single process); the job's other
    ranks write under it, so they take nothing."""
    return FolderLock(folder) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()


def describe(holder: str) -> str:
    try:
        owner = json.loads(holder)
        return f"pid {owner['pid']} on {owner['host']} (`{owner['command']}`)"
    except (ValueError, KeyError, TypeError):
        return "another process"
