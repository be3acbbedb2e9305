"""Forked worker processes: a crashing C decoder costs its file, and no worker outlives its run.

A hostile file can make libjpeg, libtiff or libwebp crash the process decoding it (a segfault, an
abort, the kernel's OOM killer). A pool of workers then breaks and every file still in flight is
lost with it; a nightly job would fail on the same file every night. Callers catch the broken
pool, decode the suspects one by one with run_isolated(), and carry on with a fresh pool.

Whatever kills the run (SIGKILL, the OOM killer), its workers die with it: every process forked
here (fork_pool, run_isolated) and every DataLoader worker given loader_worker_init() calls
die_with_parent() first. Left alive, an idle pool worker would wait for work for ever, holding
its memory and the caller's stdout and stderr, so that cron, waiting for them to close, hangs.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

__all__ = ["run_isolated", "died_reason", "fork_pool", "kill_broken_pool", "Parent", "this_process",
           "die_with_parent", "loader_context", "loader_worker_init"]

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
    proc = ctx.Process(target=_child, args=(sender, fn, arg, initializer, this_process()), daemon=True)
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


def _child(sender, fn: Callable[[Any], Any], arg: Any, initializer: Callable[[], None] | None,
           parent: Parent) -> None:
    die_with_parent(parent)
    if initializer is not None:
        initializer()
    # Plain pickle, not the connection's own: that one hands a torch tensor over as a file
    # descriptor to shared memory, which the parent can no longer fetch once this process has exited.
    sender.send_bytes(pickle.dumps(fn(arg)))
    sender.close()


def fork_pool(processes: int, initializer: Callable[..., None] | None = None,
              initargs: tuple = ()) -> "ProcessPoolExecutor":
    """A pool of forked workers that die with this process whatever kills it; each runs
    initializer(*initargs) once it has asked to."""
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"),
                               initializer=_start_worker, initargs=(this_process(), initializer, initargs))


def kill_broken_pool(pool: "ProcessPoolExecutor") -> None:
    """SIGKILL the workers left in a pool that one's death has broken, then shut it down.

    The dead one may have held something the others wait on for ever (a share of the decode
    budget, a lock), and a worker that ignores SIGTERM (burst's) outlives the pool's own
    terminate(): Python's exit, which joins the pool's manager thread, would then never return."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):  # the executor keeps them there
        try:
            proc.kill()
        except (OSError, ValueError):  # already gone, or already closed
            pass
    pool.shutdown(wait=False, cancel_futures=True)


def _start_worker(parent: Parent, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    die_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)


def loader_worker_init(parent: Parent) -> Callable[[int], None]:
    """A DataLoader worker_init_fn that makes each worker die with parent at once (torch's own
    watchdog notices a dead parent only every 5 seconds, and a busy worker later still)."""
    return functools.partial(_start_loader_worker, parent)


def loader_context() -> multiprocessing.context.BaseContext:
    """The start method of every DataLoader given loader_worker_init(): fork, as for the pools here.
    Not the platform's default (spawn on macOS, forkserver on Linux from Python 3.14): a forkserver's
    child would take the server for a parent that is not the run and exit at once, and the decode
    budget's fork-context locks cannot be handed to a spawned worker."""
    return multiprocessing.get_context("fork")


def _start_loader_worker(parent: Parent, worker_id: int) -> None:
    die_with_parent(parent)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_WATCH_S = 0.1  # how often a worker that cannot ask the kernel looks whether its parent is still there


@dataclass(frozen=True)
class Parent:
    """The process that forks workers, as they must know it to die with it."""

    pid: int
    main_thread: int  # ident of its main thread, the one thread that ends only with the process


def this_process() -> Parent:
    """This process, as the parent of the workers it is about to fork (prctl is looked up here,
    before the fork, so no worker loads anything)."""
    _prctl()
    return Parent(os.getpid(), threading.main_thread().ident or 0)


def die_with_parent(parent: Parent) -> None:
    """First thing in a forked worker: be killed (SIGKILL) as soon as parent dies, whatever kills it.

    Linux sends the death signal when the *thread* that forked exits, not the process, so it is
    asked for only by a worker that the parent's main thread forked (the forked thread keeps the
    forking thread's ident); any other, and any worker where the kernel cannot be asked, watches
    its parent from a thread instead. A parent already gone by then has re-parented the worker."""
    if not (threading.get_ident() == parent.main_thread and _ask_death_signal()):
        _watch(parent.pid)
    if os.getppid() != parent.pid:
        os._exit(1)


def _ask_death_signal() -> bool:
    """prctl(PR_SET_PDEATHSIG, SIGKILL): whether the kernel agreed (never off Linux)."""
    prctl = _prctl()
    return prctl is not None and prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0


@functools.lru_cache(maxsize=None)
def _prctl():
    """The C library's prctl (ctypes), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _watch(parent_pid: int) -> None:
    """A thread that kills this process once parent_pid is no longer its parent."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_WATCH_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="dinobatch-parent-watch", daemon=True).start()
