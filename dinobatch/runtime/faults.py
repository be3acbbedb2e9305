"""Crash-test hook: DINOBATCH_CRASH_AT=POINT:N makes the process SIGKILL itself the Nth time it
reaches POINT, so tests can prove that a kill at that exact moment loses and doubles nothing.
POINT:N:TEXT counts only the calls whose key (a file path, for decode) contains TEXT.

Points: fingerprint (after each file is hashed), batch (after each batch is committed), write
(inside every atomic write, after the temporary file is complete and before it is renamed),
rows (while the rows file is being written, after each record batch), epoch (after each training
checkpoint), decode (before a file's pixels are decoded: a decoder crashing on that file),
relabel (key "published": a new manifest version in place, its lines not yet in the audit log).
DINOBATCH_FAIL_AT=POINT:N[:TEXT] instead makes that call, and every later matching one, raise
OSError(ENOSPC), as a full disk would: tests prove that a write failing there is handled (for
write, the key is the target's file name, so write:1:zcompact fails the cache compaction).
Unset (always, outside tests), point() costs two dictionary lookups.
"""

from __future__ import annotations

import errno
import os
import signal

__all__ = ["ENV", "FAIL_ENV", "point"]

ENV = "DINOBATCH_CRASH_AT"
FAIL_ENV = "DINOBATCH_FAIL_AT"
_seen: dict[str, int] = {}
_failed: dict[str, int] = {}


def point(name: str, key: str = "") -> None:
    """Die by SIGKILL here if DINOBATCH_CRASH_AT names this point (and key) and its count is reached;
    raise OSError(ENOSPC) if DINOBATCH_FAIL_AT does."""
    fail = os.environ.get(FAIL_ENV)
    if fail and _reached(fail, name, key, _failed):
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({FAIL_ENV}={fail})")
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, rest = spec.partition(":")
    count, _, text = rest.partition(":")
    if target != name or text not in key:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _reached(spec: str, name: str, key: str, seen: dict[str, int]) -> bool:
    """Whether spec (POINT:N[:TEXT]) names this point and key, counting the call in seen."""
    target, _, rest = spec.partition(":")
    count, _, text = rest.partition(":")
    if target != name or text not in key:
        return False
    seen[name] = seen.get(name, 0) + 1
    return seen[name] >= int(count or 1)
