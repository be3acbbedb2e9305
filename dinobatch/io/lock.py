"""One writer at a time per output: a lock file, locked with fcntl (POSIX) locks, naming its holder.

The kernel releases a process's POSIX locks when it dies, even by SIGKILL, so a lock left behind by
a killed run is never held: the next run takes it over (and logs whose it was). POSIX locks, unlike
flock, belong to the process and are not inherited by forked children, so a DataLoader worker that
outlives a killed parent for a moment cannot keep the output locked. On NFS they go through the
server's lock manager.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import json
import logging
import os
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from dinobatch.errors import LockedError, OutputError

__all__ = ["exclusive"]

log = logging.getLogger(__name__)


def _holder() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "user": getpass.getuser(),
            "started": datetime.now(timezone.utc).isoformat(), "command": " ".join(sys.argv)}


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']} (user {h['user']}, since {h['started']}): {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "another dinobatch process"


# POSIX locks do not exclude their own process: keys (device, inode) of the locks held here
_held: set[tuple[int, int]] = set()
_held_guard = threading.Lock()


def _open(lock_path: Path) -> int:
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides, as for results
    except OSError as exc:
        raise OutputError(f"cannot create lock file {lock_path}: {exc.strerror or exc}") from exc


def _try_lock(fd: int, lock_path: Path) -> tuple[int, int] | None:
    """The lock's key when this process now holds it, None when someone else does."""
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    with _held_guard:
        if key in _held:
            return None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise OutputError(f"cannot lock {lock_path}: {exc.strerror or exc}") from exc
            return None
        _held.add(key)
        return key


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike, *, wait: float = 0.0, what: str | None = None) -> Iterator[None]:
    """Hold lock_path exclusively for the block; wait up to `wait` seconds, then LockedError naming
    `what` is locked (by default the folder the lock file is in)."""
    lock_path = Path(lock_path)
    fd = _open(lock_path)
    key = None
    try:
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            key = _try_lock(fd, lock_path)
            if key is not None:
                try:
                    same = os.stat(lock_path).st_ino == key[1]
                except FileNotFoundError:
                    same = False
                if same:
                    break
                # the file was deleted or replaced while we waited: lock the file that is there now
                _release(fd, key)
                key = None
                os.close(fd)
                fd = _open(lock_path)
                continue
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                raise LockedError(f"{what or lock_path.parent} is in use by {_describe(holder)}; "
                                  f"try again later, or pass --wait SECONDS")
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.05)))
        left = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if left:
            log.info("taking over the lock of %s, which ended without releasing it", _describe(left))
        try:  # who holds it, for the message of a run that finds it held; the fcntl lock is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        except OSError as exc:
            log.debug("could not record the lock holder: %s", exc)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            _release(fd, key)
            key = None
    finally:
        os.close(fd)


def _release(fd: int, key: tuple[int, int]) -> None:
    with _held_guard:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        _held.discard(key)
