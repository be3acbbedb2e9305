"""Micro-batching: requests that arrive within a few milliseconds share one forward pass.

Callers (request handlers, each in its own thread or task) submit one ready input and get a
Future; one worker thread takes what has queued up, at most max_batch items, waiting at most
max_wait_ms after the first for more, and runs them as one batch. It waits only while some caller
is still preparing an input (`expecting()`): a lone request is never delayed. Inputs are complete
(uploaded and decoded) before they are submitted, so a slow client never holds a batch up.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Generic, Iterator, Sequence, TypeVar

__all__ = ["MicroBatcher", "BatcherClosed"]

log = logging.getLogger(__name__)

_POLL_S = 0.001  # while waiting for a caller still preparing, how often to see whether it gave up
In = TypeVar("In")
Out = TypeVar("Out")


class BatcherClosed(RuntimeError):
    """The batcher was closed before it could answer this submission."""


class MicroBatcher(Generic[In, Out]):
    """Runs run_batch(inputs) -> outputs (one per input, in order) on batches of concurrent submissions."""

    def __init__(self, run_batch: Callable[[Sequence[In]], Sequence[Out]], *, max_batch: int,
                 max_wait_ms: float, name: str = "dinobatch-batcher"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, not {max_wait_ms}")
        self._run_batch = run_batch
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self._queue: queue.SimpleQueue[tuple[In, Future] | None] = queue.SimpleQueue()
        self._closed = threading.Event()
        self.batches = 0  # forward passes run so far (read by tests and /healthz)
        self._preparing = 0  # callers inside expecting(): a batch waits for them, up to max_wait
        self._preparing_lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: In) -> Future:
        """Queue one input; the Future gets its output, or the exception its batch raised."""
        future: Future = Future()
        if self._closed.is_set():
            future.set_exception(BatcherClosed("the server is shutting down"))
            return future
        self._queue.put((item, future))
        return future

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Around a caller's preparing and submitting its input: the batch being formed may wait for it."""
        with self._preparing_lock:
            self._preparing += 1
        try:
            yield
        finally:
            with self._preparing_lock:
                self._preparing -= 1

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking work; answer what is queued, then end the worker thread."""
        self._closed.set()
        self._queue.put(None)
        self._thread.join(timeout)

    def _serve(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            self._answer(batch)

    def _collect(self) -> list[tuple[In, Future]] | None:
        """The next batch: the first submission (waiting for it), then what is queued, and what arrives
        within max_wait while callers are still preparing, up to max_batch; None once closed and drained."""
        first = self._queue.get()
        if first is None:
            return self._drain_after_close()
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic() if self._preparing else 0  # nobody else coming: go now
            try:
                entry = self._queue.get(timeout=min(remaining, _POLL_S)) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                if remaining > 0 and time.monotonic() < deadline:
                    continue  # still someone preparing (or not): look again
                break
            if entry is None:  # closing: finish this batch, then the rest
                self._queue.put(None)
                break
            batch.append(entry)
        return batch

    def _drain_after_close(self) -> list[tuple[In, Future]] | None:
        """After close: refuse anything still queued (submitted in the race with close) and stop."""
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                return None
            if entry is not None:
                entry[1].set_exception(BatcherClosed("the server is shutting down"))

    def _answer(self, batch: list[tuple[In, Future]]) -> None:
        """Run one batch and hand each caller its own output; a failure answers this batch's callers only."""
        live = [(item, f) for item, f in batch if f.set_running_or_notify_cancel()]  # a cancelled caller left
        if not live:
            return
        items, futures = [item for item, _ in live], [f for _, f in live]
        self.batches += 1
        try:
            outputs = list(self._run_batch(items))
            if len(outputs) != len(items):
                raise RuntimeError(f"the batch function gave {len(outputs)} outputs for {len(items)} inputs")
        except Exception as exc:  # every caller of this batch hears of it; the worker serves the next one
            log.warning("a batch of %d failed: %s", len(items), exc, exc_info=True)
            for f in futures:
                f.set_exception(exc)
            return
        for f, out in zip(futures, outputs):
            f.set_result(out)
