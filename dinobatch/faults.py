"""Crash-test hook: DINOBATCH_CRASH_AT=POINT:N makes the process SIGKILL itself the Nth time it
reaches POINT, so tests can prove that a kill at that exact moment loses and doubles nothing.
POINT:N:TEXT counts only the calls whose key (a file path, for decode) contains TEXT.

Points: fingerprint (after each file is hashed), batch (after each batch is committed), write
(inside every atomic write, after the temporary file is complete and before it is renamed),
rows (while the rows file is being written, after each record batch), epoch (after each training
checkpoint), decode (before a file's pixels are decoded: a decoder crashing on that file).
Unset (always, outside tests), point() costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["ENV", "point"]

ENV = "DINOBATCH_CRASH_AT"
_seen: dict[str, int] = {}


def point(name: str, key: str = "") -> None:
    """Die by SIGKILL here if DINOBATCH_CRASH_AT names this point (and key) and its count is reached."""
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
