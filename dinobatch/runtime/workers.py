"""Forked worker processes: a crashing C decoder costs its file, and no worker outlives its run.

A hostile file can make libjpeg, libtiff or libwebp crash the process decoding it (a segfault, an
abort, the kernel's OOM killer). A pool of workers then breaks and every item still in flight is
lost with it; a nightly job would fail on the same file every night. IsolatingPool is the one
answer (scan's hashing and classify's burst decoding both use it): it kills what is left of the
broken pool, redoes the suspects one per process with run_isolated(), and carries on with a fresh
pool, so that each crash costs only its own item.

Whatever kills the run (SIGKILL, the OOM killer), its workers die with it: every process forked
here (fork_pool, run_isolated) and every DataLoader worker given loader_worker_init() calls
die_with_parent() first. Left alive, an idle pool worker would wait for work for ever, holding
its memory and the caller's stdout and stderr, so that cron, waiting for them to close, hangs.
Signals are the parent's to act on: every process forked here ignores SIGINT and SIGTERM (Ctrl-C,
cron's timeout and systemd signal the whole group), so that an interrupt is never mistaken for a
decoder crash; the parent stops its workers itself, and kills them (SIGKILL) when it gives up.
"""

from __future__ import annotations

import functools
import gc
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

if TYPE_CHECKING:
    from concurrent.futures import Future, ProcessPoolExecutor

__all__ = ["IsolatingPool", "Crashed", "run_isolated", "died_reason", "fork_pool", "kill_broken_pool", "Parent",
           "this_process", "die_with_parent", "loader_context", "loader_worker_init"]

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


def run_isolated(fn: Callable[[Any], Any], arg: Any, initializer: Callable[[], None] | None = None, *,
                 task: str = "decoding") -> tuple[bool, Any]:
    """fn(arg) in a forked process of its own: (True, its result) or (False, why the process died).

    task: what fn does, as one word ending in -ing ("hashing", "decoding"), for the log line."""
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, fn, arg, initializer, this_process()), daemon=True)
    proc.start()
    sender.close()  # the child holds the only write end now: its death ends recv() with EOFError
    try:
        result, ok = pickle.loads(receiver.recv_bytes()), True
    except (EOFError, OSError):  # died before sending, or part-way through
        result, ok = None, False
    except BaseException:  # interrupted: the child ignores SIGTERM and SIGINT, so end it here
        proc.kill()
        raise
    finally:
        receiver.close()
        proc.join()
    if not ok or proc.exitcode != 0:
        log.warning("a %s process died (exit code %s)", task, proc.exitcode)
        return False, died_reason(proc.exitcode)
    return True, result


def _child(sender, fn: Callable[[Any], Any], arg: Any, initializer: Callable[[], None] | None,
           parent: Parent) -> None:
    _start_worker(parent, initializer, ())
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
    budget, a lock), and the workers ignore SIGTERM, so they outlive the pool's own terminate():
    Python's exit, which joins the pool's manager thread, would then never return. Also how a pool
    is abandoned on an interrupt: what its workers were doing is no longer wanted."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):  # the executor keeps them there
        try:
            proc.kill()
        except (OSError, ValueError):  # already gone, or already closed
            pass
    pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class Crashed:
    """In place of an item's result: the process holding the item died, and died again with it alone."""

    reason: str  # died_reason(): the row's error text


class IsolatingPool:
    """Forked workers over chunks of items, in which a crashing decoder costs only its own item.

    func(chunk) runs in a worker and returns one result per item of the chunk. When a worker dies,
    every chunk in flight is suspect: map() kills the workers left, redoes each suspect item in a
    process of its own (a Crashed in place of the one that dies again) and forks a fresh pool for
    the chunks still to come. Each pool's workers run initializer(*initargs()), so each pool gets a
    fresh lock or budget (the dead worker may have held the old one); an item redone alone runs
    initializer(), sharing nothing. Leaving the `with` block on an exception kills the workers.
    task: what func does, one word ending in -ing ("hashing"), which the crash warnings name."""

    def __init__(self, workers: int, initializer: Callable[..., None] | None = None,
                 initargs: Callable[[], tuple] = tuple, *, task: str = "working"):
        self.workers = max(1, workers)
        self._initializer, self._initargs, self._task = initializer, initargs, task
        self._pool: ProcessPoolExecutor | None = None  # forked on first use, and again after a crash

    def __enter__(self) -> IsolatingPool:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.close(abandon=kind is not None)

    def close(self, *, abandon: bool = False) -> None:
        """Let the workers finish and exit; abandon: kill them now (an interrupt, a broken pool)."""
        pool, self._pool = self._pool, None
        if pool is not None and abandon:
            kill_broken_pool(pool)
        elif pool is not None:
            pool.shutdown(wait=True)

    def map(self, func: Callable[[Sequence[Any]], list[Any]], chunks: Iterable[Sequence[Any]], *,
            in_flight: int | None = None, ordered: bool = False) -> Iterator[tuple[Sequence[Any], list[Any]]]:
        """(chunk, its results) for every chunk: as they complete, or in the order given if ordered.

        At most in_flight chunks (default two per worker) are handed out at once, so that a crash
        makes few suspects, and chunks are taken from `chunks` only as they are handed out."""
        from concurrent.futures import FIRST_COMPLETED, Future, wait

        todo, limit = iter(chunks), max(1, in_flight or 2 * self.workers)
        pending: dict[Future, Sequence[Any]] = {}  # in the order handed out
        while True:
            refused = self._top_up(func, pending, todo, limit)
            if not pending and refused is None:
                return
            broken, ready = refused is not None, []
            if not broken:
                wait([next(iter(pending))] if ordered else pending, return_when=FIRST_COMPLETED)
                pick = itertools.takewhile if ordered else filter  # in the order handed out either way
                ready = list(pick(Future.done, pending))
                broken = any(_lost(f) for f in ready)
            if broken:
                yield from self._recover(func, pending)
                todo = itertools.chain([refused] if refused is not None else [], todo)
                continue
            for future in ready:
                yield pending.pop(future), future.result()

    def _top_up(self, func: Callable, pending: dict, todo: Iterator, limit: int) -> Sequence[Any] | None:
        """Hand out chunks until `limit` are in flight or none is left; a chunk the pool refused
        because it has broken since the last look (for the next pool), else None."""
        from concurrent.futures.process import BrokenProcessPool

        while len(pending) < limit:
            chunk = next(todo, None)
            if chunk is None:
                return None
            if self._pool is None:
                self._pool = fork_pool(self.workers, self._initializer, self._initargs())
            try:
                pending[self._pool.submit(func, chunk)] = chunk
            except BrokenProcessPool:
                return chunk
        return None

    def _recover(self, func: Callable, pending: dict) -> Iterator[tuple[Sequence[Any], list[Any]]]:
        """After a worker's death: kill the rest; each chunk in flight with its results if it has
        them, else with its items redone one process each."""
        from concurrent.futures import wait

        self.close(abandon=True)
        wait(pending, timeout=_MARKED_S)  # the broken pool marks every chunk it held, all at once
        lost = sum(len(chunk) for future, chunk in pending.items() if _lost(future))
        # begins as it did before the one pool ("a hashing process died; hashing ..."): log monitors grep it
        log.warning("a %s process died; %s the %d files in flight again, one process each",
                    self._task, self._task, lost)
        for future, chunk in list(pending.items()):
            del pending[future]
            yield chunk, [self._alone(func, item) for item in chunk] if _lost(future) else future.result()

    def _alone(self, func: Callable, item: Any) -> Any:
        """func's result for one item, in a process of its own; Crashed if that one dies too."""
        ok, result = run_isolated(lambda one: func([one])[0], item, initializer=self._initializer, task=self._task)
        return result if ok else Crashed(result)


_MARKED_S = 30.0  # how long a broken pool may take to mark its chunks; one still unmarked is redone


def _lost(future: Future) -> bool:
    """Whether a finished chunk died with its worker's pool (rather than returning or raising)."""
    from concurrent.futures.process import BrokenProcessPool

    if not future.done() or future.cancelled():
        return True
    return isinstance(future.exception(), BrokenProcessPool)


def _start_worker(parent: Parent, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    """First thing in every process forked here: die with the parent, leave signals to it, then
    the caller's own set-up.

    gc.freeze(): the objects inherited from the parent are never garbage here; not traversing them
    spares each collection (about 8% of scan's CPU) and the copy-on-write of every page it touches."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # nor the CLI's handler, inherited by the fork
    gc.freeze()
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
