"""Forked decoding processes that outlive a crashing C decoder: the crash becomes that file's row.

A hostile file can make libjpeg, libtiff or libwebp crash the process decoding it (a segfault, an
abort, the kernel's OOM killer). A pool of workers then breaks and every file still in flight is
lost with it; a nightly job would fail on the same file every night. Callers catch the broken
pool, decode the suspects one by one with run_isolated(), and carry on with a fresh pool.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import signal
from typing import Any, Callable

__all__ = ["run_isolated", "died_reason"]

log = logging.getLogger(__name__)


def died_reason(exitcode: int | None) -> str:
    """The error text of a file whose decoding process died with exitcode."""
    if exitcode is not None and exitcode < 0:
        try:
            how = f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"killed by signal {-exitcode}"
    else:
        how = f"exit code {exitcode}"
    return f"the image decoder crashed on this file ({how}); it was not decoded"


def run_isolated(fn: Callable[[Any], Any], arg: Any, initializer: Callable[[], None] | None = None
                 ) -> tuple[bool, Any]:
    """fn(arg) in a forked process of its own: (True, its result) or (False, why the process died)."""
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, fn, arg, initializer), daemon=True)
    proc.start()
    sender.close()  # the child holds the only write end now: its death ends recv() with EOFError
    try:
        result, ok = pickle.loads(receiver.recv_bytes()), True
    except (EOFError, OSError):  # died before sending, or part-way through
        result, ok = None, False
    finally:
        receiver.close()
        proc.join()
    if not ok or proc.exitcode != 0:
        log.warning("a decoding process died (exit code %s)", proc.exitcode)
        return False, died_reason(proc.exitcode)
    return True, result


def _child(sender, fn: Callable[[Any], Any], arg: Any, initializer: Callable[[], None] | None) -> None:
    if initializer is not None:
        initializer()
    # Plain pickle, not the connection's own: that one hands a torch tensor over as a file
    # descriptor to shared memory, which the parent can no longer fetch once this process has exited.
    sender.send_bytes(pickle.dumps(fn(arg)))
    sender.close()
