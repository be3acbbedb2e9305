"""The local engine for scan's stage: stages.hashes.hash_file over chunks of files, on this machine.

Worker processes of one crash-isolating pool (runtime.workers.IsolatingPool) take chunks of paths and
run the stage's kernel on each file, which reads its bytes once, hashes them and decodes only as much
as the hashes need; small records come back, and a file whose decoder crashes its process gets a
record with that reason. The engine owns the scheduling (chunk sizes, the pool, the memory gate, the
redo after a crash, progress); what a record holds is the stage's. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from typing import Any, Callable, ContextManager, Iterator, Sequence

import numpy as np

from dinobatch.imaging.decode import quiet_decoding
from dinobatch.runtime import faults
from dinobatch.runtime.workers import Crashed, IsolatingPool
from dinobatch.stages.hashes import Record, hash_file

__all__ = ["HEAVY_BYTES", "BLOCK", "Progress", "hash_files"]

# progress(stage, done, total), as classify's: the one stage here is "hash"
Progress = Callable[[str, int, int], None]
# A file, or a decode, larger than this is handled by one worker at a time: two workers never hold
# two of the largest images at once, which keeps the whole run under 1 GB whatever the images.
HEAVY_BYTES = 64 * 1024 * 1024
BLOCK = 8192  # files whose paths, or records, are Python objects at once in the parent
_MAX_CHUNK = 16  # files per task: enough to amortise the hand-over, few enough to end together
_CHUNKS_PER_WORKER = 16


def hash_files(todo: np.ndarray, paths: Callable[[np.ndarray], list[bytes]], sizes: np.ndarray, *,
               workers: int, progress: Progress | None = None) -> Iterator[tuple[int, Record]]:
    """(index, hash_file's record) for each file index in `todo`, in any order, as they come.

    paths(indices): those files' os.fsencode(absolute path), asked for a block at a time; sizes:
    each file's size as the walk found it (indexed like paths). workers 0: in this process."""
    size = max(1, min(_MAX_CHUNK, -(-len(todo) // max(1, workers * _CHUNKS_PER_WORKER))))
    whole, rest = divmod(len(todo), BLOCK)
    count = whole * -(-BLOCK // size) + -(-rest // size)  # chunks never span two blocks
    chunks = _chunks(todo, paths, sizes, size)
    for done, item in enumerate(_run_chunks(chunks, count, workers), start=1):
        yield item
        faults.point("fingerprint")  # scan killed here, its workers running: none may outlive it
        if progress and (done % _MAX_CHUNK == 0 or done == len(todo)):
            progress("hash", done, len(todo))


def _chunks(todo: np.ndarray, paths: Callable[[np.ndarray], list[bytes]], sizes: np.ndarray,
            size: int) -> Iterator[list]:
    """(index, path, size) tasks of `size` files, their paths made Python strings a block at a time."""
    for lo in range(0, len(todo), BLOCK):
        block = todo[lo:lo + BLOCK]
        items = [(int(i), os.fsdecode(p), int(sizes[i])) for i, p in zip(block, paths(block))]
        for k in range(0, len(items), size):
            yield items[k:k + size]


def _run_chunks(chunks: Iterator[list], count: int, workers: int) -> Iterator[tuple[int, Record]]:
    """Records of every chunk's files as they come, in this process (workers 0, or one chunk) or in
    a crash-isolating pool.

    At most two chunks per worker are in flight, so that when a decoder crashes and takes the
    pool down, the suspects are those few chunks: their files are hashed one process each (the
    culprit's record says it crashed, with the size the walk found) and a fresh pool takes the rest.
    On Ctrl-C or an error the pool is killed instead of hashing the rest of the folder."""
    if workers == 0 or count <= 1:
        for chunk in chunks:
            yield from _hash_chunk(chunk)
        return
    with IsolatingPool(min(workers, count), _init_worker, _fresh_lock, task="hashing") as pool:
        for chunk, results in pool.map(_hash_chunk, chunks, in_flight=2 * workers):
            for (index, _, size), result in zip(chunk, results):
                yield (index, (None, size, None, result.reason)) if isinstance(result, Crashed) else result


# ---- in the worker processes ------------------------------------------------------------------

_heavy_lock: Any = None  # per worker process: the pool's shared lock, set by _init_worker


def _init_worker(lock: Any = None) -> None:
    """Runs in each worker (after runtime.workers' own start: signals, gc): keep the pool's shared
    lock. A file hashed alone gets none: nothing to share, nothing to leak if it dies too."""
    global _heavy_lock
    _heavy_lock = lock


def _fresh_lock() -> tuple[Any]:
    """initargs of each new pool: a fresh lock (the dead worker of a broken one may hold the old)."""
    return (multiprocessing.get_context("fork").RLock(),)  # pools fork: torch is not among the modules inherited


def _gate(nbytes: int) -> ContextManager[Any]:
    """The shared lock for a heavy file or decode (re-entrant: a heavy file may decode heavily)."""
    if nbytes > HEAVY_BYTES and _heavy_lock is not None:
        return _heavy_lock
    return contextlib.nullcontext()


def _hash_chunk(chunk: Sequence[tuple[int, str, int | None]]) -> list[tuple[int, Record]]:
    """The stage's kernel over a chunk of (index, path, size), under this worker's memory gate."""
    with quiet_decoding():  # once per chunk, not per file
        return [(index, hash_file(path, size, heavy=_gate)) for index, path, size in chunk]
