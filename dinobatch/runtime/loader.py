"""DataLoader batches that survive a decoding worker's death (a crash costs its file)."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any, Callable, Iterator

from dinobatch.imaging import decode_budget
from dinobatch.runtime.burst import BURST_IMAGES, burst_batches
from dinobatch.runtime.dataset import DecodeDataset, Rec
from dinobatch.runtime.workers import loader_context, loader_worker_init, this_process

log = logging.getLogger(__name__)


def collate(records: list[dict[str, Any]]):
    """Stack the CPU-prepared tensors of decoded items; keep every record (failed ones too) in order.

    Records whose JPEG bytes go to the device keep them; device_batch puts everything together."""
    import torch

    tensors = [r.pop(Rec.TENSOR) for r in records if r.get(Rec.ERROR) is None and Rec.TENSOR in r]
    batch = torch.stack(tensors) if tensors else None
    return records, batch


# Batches a DataLoader worker decodes ahead (its prefetch_factor): with `workers` of them, the
# batches in flight when one dies are at most _PREFETCH x workers from the first not yet handed out.
_PREFETCH = 4


# How long a failed next() waits for a dying worker to be seen dead: the error can come first (a
# lost connection to the worker, the pin-memory thread that was reading from it).
_DEATH_GRACE_S = 5.0


def loader_batches(dataset: DecodeDataset, batch_size: int, workers: int, pin_memory: bool) -> Iterator:
    """DataLoader batches in order; a worker that dies (a C decoder crashing on a hostile file, the
    OOM killer) costs the file it was decoding, not the run. The batches the loader had in flight
    are decoded again by burst_batches, which finds the file and makes it an error record, and a
    fresh loader takes the rest. Without this a nightly job would die on the same file every night."""
    from torch.utils.data import DataLoader

    done, total = 0, len(dataset)
    with _deaths_raised_only_by_reads():
        while done < total:
            loader = DataLoader(dataset.window(done, total), batch_size=batch_size, shuffle=False,
                                num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
                                prefetch_factor=_PREFETCH, worker_init_fn=_loader_worker_init(),
                                multiprocessing_context=loader_context())
            batches = None
            try:
                while True:
                    try:  # only around starting the workers and taking a batch, never around the yield
                        if batches is None:
                            batches = _started(loader)
                        records, batch = _read(batches)
                    except StopIteration:
                        return
                    except Exception as exc:
                        if not (isinstance(exc, _WorkerDied) or _worker_died(exc, batches)):
                            raise
                        break
                    done += len(records)
                    yield records, batch
            finally:  # workers shut down here, whatever ends the loop, before the handler changes back
                _shut_down(batches)
            suspects = min(total, done + _PREFETCH * workers * batch_size)
            if suspects == done:  # every batch was read: nothing was lost, nothing to decode again
                log.debug("a decoding worker was gone after the last batch; nothing to decode again")
                return
            log.warning("a decoding worker died; decoding the %d files it may have held again, each crash "
                        "costing only its own file", suspects - done)
            # bursts of BURST_IMAGES at most: a crash in one costs that many processes of one file each
            for records, batch in burst_batches(dataset.window(done, suspects), min(batch_size, BURST_IMAGES),
                                                workers):
                done += len(records)
                yield records, batch


def _loader_worker_init() -> Callable[[int], None]:
    """A loader's worker_init_fn: die with this process, then hold this loader's decode budget (a
    fresh one per loader: a worker killed holding a share must not leak it into the next loader)."""
    return functools.partial(_start_loader_worker, loader_worker_init(this_process()), decode_budget.from_env())


def _start_loader_worker(start: Callable[[int], None], budget: decode_budget.DecodeBudget, worker_id: int) -> None:
    start(worker_id)
    decode_budget.install(budget)


class _WorkerDied(Exception):
    """A worker of the loader being read is dead."""


_READING: list = []  # the loader iterator that next() is reading, while it is


def _read(batches):
    """next(batches), or _WorkerDied if one of its workers is dead, before or during the read.

    Before: a worker killed while the model ran may have left its last message half-written, and
    reading that would wait for the rest for ever. During: the SIGCHLD handler below raises into
    the read, as torch's own would."""
    _READING.append(batches)
    try:
        if _dead(batches):
            raise _WorkerDied()
        return next(batches)
    finally:
        _READING.clear()


def _shut_down(batches) -> None:
    """Stop a loader iterator's workers now, not whenever the iterator is collected."""
    shut_down = getattr(batches, "_shutdown_workers", None)  # what torch's iterator runs when collected
    if shut_down is not None:
        shut_down()


def _dead(batches) -> bool:
    return any(not p.is_alive() for p in getattr(batches, "_workers", None) or ())  # torch keeps them there


def _on_sigchld(signum, frame) -> None:
    """classify's SIGCHLD handler while its loaders run: a worker's death is raised only into a read."""
    if _READING and _dead(_READING[0]):
        raise _WorkerDied()


def _started(loader) -> Iterator:
    """iter(loader), with the handler of _deaths_raised_only_by_reads put back at once if torch has
    just installed its own (it does, once per process, when the first loader starts workers)."""
    import signal

    try:
        return iter(loader)
    finally:
        if _in_main_thread():
            handler = signal.getsignal(signal.SIGCHLD)
            if handler is not _on_sigchld:
                _TORCH_SIGCHLD[:] = [handler]
                signal.signal(signal.SIGCHLD, _on_sigchld)


def _worker_died(exc: Exception, batches) -> bool:
    """Whether exc, raised while starting or reading a loader, comes from a worker that died: torch
    says so itself, or (an error met on the way, such as a lost connection) one of its workers is
    dead within a few seconds. Any other error, a worker's own exception included, is not one."""
    if isinstance(exc, RuntimeError) and str(exc).startswith("DataLoader worker"):
        return True
    if str(exc).startswith("Caught "):  # torch re-raising an exception from a worker (or its pin thread)
        return False
    deadline = time.monotonic() + _DEATH_GRACE_S
    while getattr(batches, "_workers", None):
        if _dead(batches):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return False


_TORCH_SIGCHLD: list = []  # torch's SIGCHLD handler, when it installed one while ours was in place


_DEPTH: list = []  # one entry per _deaths_raised_only_by_reads entered (loaders read side by side)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _deaths_raised_only_by_reads() -> Iterator[None]:
    """While classify's loaders run, a worker's death is raised only where a batch is read.

    A DataLoader with workers installs a SIGCHLD handler (once per process) that raises a worker's
    death as a RuntimeError in the main thread at whatever it is doing: inside the model's forward
    pass, or while a cache part is being committed, where nothing can recover. In its place
    _on_sigchld raises only into a read (_read), and _read checks before it reads. The handler
    that was there (torch's, if it has installed one meanwhile) is put back after."""
    import signal

    if not _in_main_thread():
        yield  # signal handlers belong to the main thread; torch installs none from here either
        return
    _DEPTH.append(None)
    if len(_DEPTH) > 1:  # an enclosing loader has put the handler in place and will put it back
        try:
            yield
        finally:
            _DEPTH.pop()
        return
    before = signal.getsignal(signal.SIGCHLD)
    before = signal.SIG_DFL if before is None else before  # None: set from C, not restorable
    _TORCH_SIGCHLD.clear()
    signal.signal(signal.SIGCHLD, _on_sigchld)
    try:
        yield
    finally:
        _DEPTH.pop()
        signal.signal(signal.SIGCHLD, _TORCH_SIGCHLD.pop() if _TORCH_SIGCHLD else before)
