"""File locks shared by every process that works on one rounds state folder.

``flock`` locks belong to an open file description, so each ``FileLock`` opens the file itself: two
holders in one process (two threads) exclude each other exactly as two processes do. The kernel
drops the lock when its holder dies, so a killed server never leaves a stale lock behind.

On the round lock only a process running rounds holds the lock exclusively. Whoever just wants to
know whether a round runs takes it shared, briefly (``is_locked``); so a failed exclusive try can
tell "a round runs" (a shared try fails too) from "someone is only looking" (retry: ``acquire_runner``).
That difference matters: a trigger that queues a round and then fails to take the lock relies on the
holder being a runner that will see the queue.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from typing import Optional

logger = logging.getLogger(__name__)


class FileLock:
    """A ``flock`` on ``path`` (created if missing), exclusive unless ``shared``.

    ``acquire(blocking, shared)`` -> True when held; ``release()``; also a context manager (blocking,
    exclusive).
    """

    def __init__(self, path: str):
        self.path = path
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = True, shared: bool = False) -> bool:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this FileLock")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, mode | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        """Drop the lock (closing the descriptor drops the flock); no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> "FileLock":
        self.acquire(blocking=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked(path: str) -> bool:
    """Whether some holder (this process or another) has ``path`` locked exclusively now."""
    probe = FileLock(path)
    if probe.acquire(blocking=False, shared=True):
        probe.release()
        return False
    return True


def acquire_runner(lock: FileLock, patience_s: float = 10.0) -> bool:
    """Take ``lock`` exclusively without waiting for an exclusive holder.

    True: held. False: someone holds it exclusively (a round is running). Shared holders only look for
    a moment, so while they are in the way this retries (for ``patience_s`` at most).
    """
    deadline = time.monotonic() + patience_s
    while True:
        if lock.acquire(blocking=False):
            return True
        if is_locked(lock.path):
            return False
        if time.monotonic() > deadline:
            logger.warning(f"{lock.path}: held shared for more than {patience_s:g} s; giving up")
            return False
        time.sleep(0.002)
