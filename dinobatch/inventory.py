"""The scan job: inventory, sha256, pHash/dHash and duplicate groups of a folder, with no model.

Worker processes (forked) take chunks of paths; each reads a file's bytes once, hashes them and
decodes only as much as the hashes need (decode.decode_hashes); small records come back. Nothing
on this path imports torch. The folder is only read; the one output is written atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import logging
import multiprocessing
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, ContextManager, Iterator, Sequence

from . import __version__, faults
from .decode import HASH_MIN_SIDE, SCAN_MIN_SIDE, DecodeError, decode_hashes, quiet_decoding
from .dedupe import DEFAULT_DHASH_MAX, DEFAULT_PHASH_MAX, Assignment, DedupeItem, group_duplicates
from .device import usable_cores
from .results import table_from_columns, write_table
from .scan import FileEntry, check_folder, read_bytes, walk
from .workers import run_isolated
from .schema import STATUS_DUPLICATE, STATUS_ERROR, STATUS_OK, scan_metadata, scan_schema

__all__ = ["ScanConfig", "ScanSummary", "scan_folder", "hash_file", "default_scan_workers", "HEAVY_BYTES"]

log = logging.getLogger(__name__)

# progress(stage, done, total), as classify's: the one stage here is "hash"
Progress = Callable[[str, int, int], None]
# A file, or a decode, larger than this is handled by one worker at a time: two workers never hold
# two of the largest images at once, which keeps the whole run under 1 GB whatever the images.
HEAVY_BYTES = 64 * 1024 * 1024
_MAX_CHUNK = 16  # files per task: enough to amortise the hand-over, few enough to end together
_CHUNKS_PER_WORKER = 16

# (sha256, bytes read, (format, width, height, mode, phash, dhash), error): what a worker returns
Record = tuple[str | None, int | None, tuple | None, str | None]


@dataclass(frozen=True)
class ScanConfig:
    """The resolved options of one scan."""

    folder: str
    output: str = "scan.parquet"
    workers: int | None = None  # None: every usable core; 0: hash in this process
    phash_max: int = DEFAULT_PHASH_MAX
    dhash_max: int = DEFAULT_DHASH_MAX

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ScanSummary:
    """What a scan did: printed by the CLI and written by --summary-json."""

    output: str
    files: int
    counts: dict[str, int]
    duplicate_groups: int
    seconds: float
    images_per_second: float | None
    workers: int
    config: dict[str, Any]
    started: str
    finished: str
    version: str = __version__
    errors: list[dict[str, str]] = field(default_factory=list)  # the first few, for a quick look

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_scan_workers() -> int:
    """Every core this process may run on (device.usable_cores: its CPU affinity)."""
    return max(1, usable_cores())


def scan_folder(cfg: ScanConfig, progress: Progress | None = None) -> ScanSummary:
    """Scan cfg.folder and write one row per file found to cfg.output; return the summary."""
    t0, started = time.monotonic(), datetime.now(timezone.utc)
    cfg = dataclasses.replace(cfg, folder=check_folder(cfg.folder), output=os.path.abspath(cfg.output))
    entries = _entries(cfg)
    log.info("found %d files under %s", len(entries), cfg.folder)
    workers = default_scan_workers() if cfg.workers is None else cfg.workers
    records = _hash_all(entries, workers, progress)
    items = [_dedupe_item(e, r) for e, r in zip(entries, records) if r[3] is None]
    groups = {a.path: a for a in group_duplicates(items, phash_max=cfg.phash_max, dhash_max=cfg.dhash_max)}
    metadata = scan_metadata(version=__version__, folder=cfg.folder, jpeg_min_side=SCAN_MIN_SIDE,
                             hash_min_side=HASH_MIN_SIDE, phash_max=cfg.phash_max, dhash_max=cfg.dhash_max)
    table, counts, errors = _table(entries, records, groups, metadata)
    write_table(table, cfg.output)
    seconds = time.monotonic() - t0
    return ScanSummary(output=cfg.output, files=len(entries), counts=counts,
                       duplicate_groups=len({a.group for a in groups.values()}), seconds=round(seconds, 3),
                       images_per_second=round(len(entries) / seconds, 1) if entries and seconds > 0 else None,
                       workers=workers, config=cfg.to_dict(), started=started.isoformat(),
                       finished=datetime.now(timezone.utc).isoformat(), errors=errors[:20])


def _entries(cfg: ScanConfig) -> list[FileEntry]:
    """Files under the folder in path order, leaving out the output itself (scanning '.' twice)."""
    name, output = os.path.basename(cfg.output), os.path.realpath(cfg.output)
    return sorted((e for e in walk(cfg.folder)
                   if os.path.basename(e.abspath) != name or os.path.realpath(e.abspath) != output),
                  key=lambda e: e.path)


# ---- the per-file work, in worker processes ---------------------------------------------------

_heavy_lock: Any = None  # per worker process: the pool's shared lock, set by _init_worker


def _init_worker(lock: Any) -> None:
    """Runs in each worker: keep the shared lock; leave Ctrl-C to the parent, which stops the pool.

    SIGTERM keeps its default (and not the CLI's handler, inherited by the fork): the pool
    terminates its workers with it when one of them dies."""
    global _heavy_lock
    _heavy_lock = lock
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    gc.freeze()  # the inherited objects are never garbage here: not traversing them saves ~8% CPU


def _gate(nbytes: int) -> ContextManager[Any]:
    """The shared lock for a heavy file or decode (re-entrant: a heavy file may decode heavily)."""
    if nbytes > HEAVY_BYTES and _heavy_lock is not None:
        return _heavy_lock
    return contextlib.nullcontext()


def hash_file(abspath: str, size: int | None) -> Record:
    """sha256, facts and hashes of one file from a single read of its bytes, or why it has none."""
    with _gate(size or 0):
        try:
            data = read_bytes(abspath)
        except OSError as exc:
            return None, None, None, f"cannot read file: {exc.strerror or exc}"
        sha = hashlib.sha256(data).hexdigest()
        try:
            faults.point("decode", abspath)
            h = decode_hashes(data, heavy=_gate)
        except DecodeError as exc:
            return sha, len(data), None, str(exc)
    return sha, len(data), (h.format, h.width, h.height, h.mode, h.phash, h.dhash), None


def _hash_chunk(chunk: Sequence[tuple[int, str, int | None]]) -> list[tuple[int, Record]]:
    with quiet_decoding():  # once per chunk, not per file
        return [(index, hash_file(path, size)) for index, path, size in chunk]


# ---- fan-out ----------------------------------------------------------------------------------


def _hash_all(entries: Sequence[FileEntry], workers: int, progress: Progress | None) -> list[Record]:
    """One record per entry, in entry order; files the walk already refused are not opened."""
    records: list[Record] = [(None, e.size, None, e.error) for e in entries]
    todo = [(i, e.abspath, e.size) for i, e in enumerate(entries) if e.error is None]
    done = 0
    for index, record in _run_chunks(_chunks(todo, workers), workers):
        records[index] = record
        done += 1
        if progress and (done % _MAX_CHUNK == 0 or done == len(todo)):
            progress("hash", done, len(todo))
    return records


def _chunks(todo: list, workers: int) -> list[list]:
    size = max(1, min(_MAX_CHUNK, -(-len(todo) // max(1, workers * _CHUNKS_PER_WORKER))))
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def _run_chunks(chunks: list[list], workers: int) -> Iterator[tuple[int, Record]]:
    """Results of every chunk, in this process (workers 0, or one chunk) or in a fork pool.

    At most two chunks per worker are in flight, so that when a decoder crashes and takes the
    pool down, the suspects are those few chunks: their files are hashed one process each (the
    culprit's row says it crashed) and a fresh pool takes the rest."""
    if workers == 0 or len(chunks) <= 1:
        for chunk in chunks:
            yield from _hash_chunk(chunk)
        return
    ctx = multiprocessing.get_context("fork")  # workers inherit the loaded modules; torch is not one
    lock = ctx.RLock()
    todo = iter(chunks)
    pool = _pool(ctx, lock, min(workers, len(chunks)))
    pending: dict[Future, list] = {}
    try:
        while True:
            _top_up(pool, pending, todo, 2 * workers)
            if not pending:
                return
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            try:
                for future in finished:
                    results = future.result()
                    del pending[future]
                    yield from results
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                log.warning("a hashing process died; hashing the files it held one at a time")
                for chunk in list(pending.values()):
                    yield from (_isolated(item, lock) for item in chunk)
                pending.clear()
                pool = _pool(ctx, lock, min(workers, len(chunks)))
    finally:  # on Ctrl-C or an error, drop the queued chunks instead of hashing the rest of the folder
        pool.shutdown(wait=True, cancel_futures=True)


def _pool(ctx, lock, workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(lock,))


def _top_up(pool: ProcessPoolExecutor, pending: dict[Future, list], todo: Iterator[list], limit: int) -> None:
    """Submit chunks until `limit` are in flight or none is left."""
    while len(pending) < limit:
        chunk = next(todo, None)
        if chunk is None:
            return
        pending[pool.submit(_hash_chunk, chunk)] = chunk


def _isolated(item: tuple[int, str, int | None], lock: Any) -> tuple[int, Record]:
    """One file hashed in a process of its own; if that process dies too, the file's error."""
    ok, result = run_isolated(_hash_chunk, [item], initializer=lambda: _init_worker(lock))
    index, _, size = item
    return result[0] if ok else (index, (None, size, None, result))


# ---- rows -------------------------------------------------------------------------------------


def _dedupe_item(entry: FileEntry, record: Record) -> DedupeItem:
    sha, _, facts, _ = record
    _, width, height, _, phash, dhash = facts
    return DedupeItem(entry.path, sha, int(phash, 16), int(dhash, 16), width * height)


def _table(entries: Sequence[FileEntry], records: Sequence[Record], groups: dict[str, Assignment],
           metadata: dict[bytes, bytes]):
    """The rows in path order, their counts by status, and the files in error."""
    schema = scan_schema(metadata)
    cols: dict[str, list] = {name: [] for name in schema.names}
    counts = {STATUS_OK: 0, STATUS_DUPLICATE: 0, STATUS_ERROR: 0}
    errors = []
    for e, (sha, nbytes, facts, error) in zip(entries, records):
        g = groups.get(e.path)
        status = STATUS_ERROR if error else (STATUS_DUPLICATE if g and g.duplicate_of else STATUS_OK)
        counts[status] += 1
        if error:
            errors.append({"path": e.path, "error": error})
        mtime_us = e.mtime_ns // 1000 if e.mtime_ns is not None else None
        row = (e.path, e.raw, nbytes, mtime_us, sha, status, error, *(facts or (None,) * 6),
               g.duplicate_of if g else None, g.kind if g else None, g.group if g else None)
        for name, value in zip(schema.names, row):
            cols[name].append(value)
    return table_from_columns(cols, schema), counts, errors
