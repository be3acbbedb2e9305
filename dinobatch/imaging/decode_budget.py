"""A decoding pool's shared memory budget: its workers together hold at most this many decoded bytes.

One worker per core, each decoding a large image, would multiply the peak by the number of cores.
Each decode asks for the bytes its declared size needs (decode.decode's heavy hook) before any
pixel is allocated, and waits, first come first served, while the pool's other decodes hold too
much of the budget; an image larger than the whole budget waits until it can decode alone. The
pool's creator makes a fresh budget for every pool (a worker killed while holding its share, by a
crashing decoder, must not leak it into the next pool) and each worker installs it as it starts.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from typing import Iterator

from dinobatch.errors import ConfigError

__all__ = ["DecodeBudget", "ENV", "DEFAULT_MIB", "from_env", "install", "hold"]

# The budget in MiB, read where a pool is made. The decoded image is counted at its declared size
# (1 byte a pixel for palette and grey, 4 for RGB(A), JPEG at its reduced DCT scale); converting
# it adds at most about 20 MiB per worker, a band of rows at a time (decode._BAND_PIXELS).
ENV = "DINOBATCH_DECODE_MEMORY"
# Three of the largest images decode allows (89.5 MP RGBA: 341 MiB) at once; a 12 MP PNG is 46 MiB.
DEFAULT_MIB = 1024
# A share at least this large is handed back to the system as it is released: classify keeps freed
# memory in glibc's heap (device.tune_process, inherited by forked workers), so without this every
# worker would go on holding the largest image it ever decoded, and the pool workers x that.
_HAND_BACK_BYTES = 64 << 20


class DecodeBudget:
    """Bytes of decoded images that the processes forked after it was made may hold at once."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"a decode budget must be at least 1 byte, not {limit}")
        ctx = multiprocessing.get_context("fork")
        self.limit = limit
        self._cond = ctx.Condition()
        self._used = ctx.Value("q", 0, lock=False)  # guarded by _cond
        self._next = ctx.Value("q", 0, lock=False)  # the next ticket handed out
        self._serving = ctx.Value("q", 0, lock=False)  # the ticket that may take its bytes next

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        """Hold nbytes (at most the whole budget) of it while the block runs; wait in line for them."""
        n = max(0, min(nbytes, self.limit))
        with self._cond:
            ticket = self._next.value
            self._next.value += 1
            self._cond.wait_for(lambda: self._serving.value == ticket and self._used.value + n <= self.limit)
            self._serving.value += 1
            self._used.value += n
            self._cond.notify_all()  # the next in line may fit as well
        try:
            yield
        finally:
            if n >= _HAND_BACK_BYTES:
                from dinobatch.runtime.memory import release_memory

                release_memory()
            with self._cond:
                self._used.value -= n
                self._cond.notify_all()


def from_env() -> DecodeBudget:
    """A fresh budget of DINOBATCH_DECODE_MEMORY MiB (DEFAULT_MIB when unset), for one pool."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DecodeBudget(DEFAULT_MIB << 20)
    try:
        mib = int(raw)
    except ValueError:
        mib = 0
    if mib < 1:
        raise ConfigError(f"{ENV} must be a whole number of MiB, at least 1 (default {DEFAULT_MIB}), not {raw!r}")
    return DecodeBudget(mib << 20)


_installed: DecodeBudget | None = None  # this process's pool's budget (set in each worker as it starts)


def install(budget: DecodeBudget | None) -> None:
    """Make budget the one this process's decodes hold (a pool worker's initializer calls this)."""
    global _installed
    _installed = budget


def hold(nbytes: int) -> contextlib.AbstractContextManager:
    """A share of the installed budget for a decode of nbytes; nothing to wait for where none is
    installed (decoding in the main process, or a suspect decoded alone after a crash)."""
    return _installed.hold(nbytes) if _installed is not None else contextlib.nullcontext()
