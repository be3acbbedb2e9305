"""The scan job: inventory, sha256, pHash/dHash and duplicate groups of a folder, with no model.

Worker processes (forked) take chunks of paths; each reads a file's bytes once, hashes them and
decodes only as much as the hashes need (decode.decode_hashes); small records come back. Nothing
on this path imports torch (nor pandas, which pyarrow imports for some conversions: 0.5 s). The
folder is only read; the one output is written atomically.

Per file the parent holds columns, never a Python object: the walk's Arrow table, the records
gathered into numpy arrays a block at a time, the duplicate groups from dedupe.group_among, and
the output built from those, so that its memory grows by well under a kilobyte per file.
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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinobatch import __version__
from dinobatch.dedupe.groups import DEFAULT_DHASH_MAX, DEFAULT_PHASH_MAX, Groups, group_among
from dinobatch.imaging.decode import HASH_MIN_SIDE, SCAN_MIN_SIDE, DecodeError, decode_hashes, quiet_decoding
from dinobatch.io.arrow import table_from_columns, write_table
from dinobatch.io.walk import check_folder, display_path, read_bytes, read_error, walk_table
from dinobatch.runtime import faults
from dinobatch.runtime.device import usable_cores
from dinobatch.runtime.memory import release_memory
from dinobatch.runtime.workers import fork_pool, kill_broken_pool, run_isolated
from dinobatch.schema import (
    DUPLICATE_EXACT,
    DUPLICATE_NEAR,
    STATUS_DUPLICATE,
    STATUS_ERROR,
    STATUS_OK,
    Col,
    scan_metadata,
    scan_schema,
)

__all__ = ["ScanConfig", "ScanSummary", "scan_folder", "hash_file", "default_scan_workers", "HEAVY_BYTES"]

log = logging.getLogger(__name__)

# progress(stage, done, total), as classify's: the one stage here is "hash"
Progress = Callable[[str, int, int], None]
# A file, or a decode, larger than this is handled by one worker at a time: two workers never hold
# two of the largest images at once, which keeps the whole run under 1 GB whatever the images.
HEAVY_BYTES = 64 * 1024 * 1024
_MAX_CHUNK = 16  # files per task: enough to amortise the hand-over, few enough to end together
_CHUNKS_PER_WORKER = 16
_BLOCK = 8192  # files whose paths, or records, are Python objects at once in the parent

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
    files, abspaths = _files(cfg)
    log.info("found %d files under %s", files.num_rows, cfg.folder)
    if not files.num_rows:  # not an error (the output is written, with no rows), but say what was expected
        log.info("no files to scan under %s (names starting with '.', such as .gitkeep, are skipped): "
                 "put the images there, in any sub-folders, and run again", cfg.folder)
    workers = default_scan_workers() if cfg.workers is None else cfg.workers
    release_memory()  # here and below: one stage's freed temporaries never add to the next one's peak
    hashed = _hash_all(files, abspaths, workers, progress)
    del abspaths
    release_memory()
    groups = hashed.groups(cfg.phash_max, cfg.dhash_max)
    release_memory()
    metadata = scan_metadata(version=__version__, folder=cfg.folder, jpeg_min_side=SCAN_MIN_SIDE,
                             hash_min_side=HASH_MIN_SIDE, phash_max=cfg.phash_max, dhash_max=cfg.dhash_max)
    table, counts, errors = _table(files, hashed, groups, metadata)
    duplicate_groups = int(groups.group.max(initial=-1)) + 1
    del files, hashed, groups  # the table holds what the output needs
    release_memory()
    write_table(table, cfg.output)
    seconds = time.monotonic() - t0
    n = table.num_rows
    return ScanSummary(output=cfg.output, files=n, counts=counts,
                       duplicate_groups=duplicate_groups, seconds=round(seconds, 3),
                       images_per_second=round(n / seconds, 1) if n and seconds > 0 else None,
                       workers=workers, config=cfg.to_dict(), started=started.isoformat(),
                       finished=datetime.now(timezone.utc).isoformat(), errors=errors)


def _files(cfg: ScanConfig) -> tuple[pa.Table, "_Paths"]:
    """The walk's table (schema.walk_schema, but for the absolute paths) in path order, leaving out
    the output itself (scanning '.' twice), and the files' absolute paths in that order."""
    files = walk_table(cfg.folder)
    name, output = os.path.basename(cfg.output), os.fsencode(os.path.realpath(cfg.output))
    named = _positions(pc.ends_with(files[Col.PATH], pattern=display_path(name)))  # paths are shown so
    own = [i for i, p in zip(named, files[Col.ABSPATH].take(_arrow(named)).to_pylist())
           if os.path.basename(p) == os.fsencode(name) and os.path.realpath(p) == output]
    if own:
        files = files.take(_arrow(np.setdiff1d(np.arange(files.num_rows), own)))
    order = pc.sort_indices(files[Col.PATH])  # code point order, as sorted() on str
    # The absolute paths are taken in that order a block at a time, from one large_binary array
    # (ChunkedArray.take would join the chunks again for every block).
    abspaths = files[Col.ABSPATH].cast(pa.large_binary()).combine_chunks()
    return files.drop_columns([Col.ABSPATH]).take(order), _Paths(abspaths, order)


@dataclass(frozen=True)
class _Paths:
    """The absolute paths of the files in path order: `column` taken in `order`, on demand."""

    column: Any  # pa.Array (large_binary) of os.fsencode(absolute path), in the walk's order
    order: Any  # pa.Array: row of the walk's table for each file in path order

    def take(self, rows: np.ndarray) -> list[bytes]:
        return self.column.take(self.order.take(_arrow(rows))).to_pylist()


# Arrow <-> numpy here goes through buffers: pyarrow's own conversions (to_numpy, numpy arguments,
# Python scalars) import pandas where it is installed, 0.5 s, half of a scan of 600 photos.


def _positions(mask) -> np.ndarray:
    """Where a boolean Arrow array is true, as numpy int64."""
    found = pc.indices_nonzero(mask)
    return np.frombuffer(found.buffers()[1], np.uint64, count=len(found), offset=found.offset * 8).astype(np.int64)


def _flags(mask) -> np.ndarray:
    """A boolean Arrow array (no nulls) as numpy."""
    flags = np.zeros(len(mask), bool)
    flags[_positions(mask)] = True
    return flags


def _arrow(indices: np.ndarray) -> pa.Array:
    """Row numbers as an Arrow array, for take()."""
    return _fixed(np.asarray(indices, np.int64), np.ones(len(indices), bool), pa.int64())


def _numbers(column, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-width Arrow column as numpy: its values (0 where null) and where it is valid."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    values = np.frombuffer(arr.buffers()[1], dtype, count=n, offset=arr.offset * np.dtype(dtype).itemsize)
    if arr.null_count == 0:
        return values.copy(), np.ones(n, bool)
    bits = np.unpackbits(np.frombuffer(arr.buffers()[0], np.uint8), bitorder="little")
    valid = bits[arr.offset:arr.offset + n].astype(bool)
    return np.where(valid, values, 0), valid


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
            return None, None, None, read_error(exc)
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


def _hash_all(files: pa.Table, abspaths: _Paths, workers: int, progress: Progress | None) -> "_Hashed":
    """Every file's record; files the walk already refused are not opened."""
    hashed = _Hashed(files.num_rows)
    todo = _positions(files[Col.ERROR].is_null())
    sizes, _ = _numbers(files[Col.BYTES], np.int64)
    size = max(1, min(_MAX_CHUNK, -(-len(todo) // max(1, workers * _CHUNKS_PER_WORKER))))
    whole, rest = divmod(len(todo), _BLOCK)
    count = whole * -(-_BLOCK // size) + -(-rest // size)  # chunks never span two blocks
    chunks = _chunks(todo, abspaths, sizes, size)
    for done, (index, record) in enumerate(_run_chunks(chunks, count, workers), start=1):
        hashed.add(index, record)
        faults.point("fingerprint")  # scan killed here, its workers running: none may outlive it
        if progress and (done % _MAX_CHUNK == 0 or done == len(todo)):
            progress("hash", done, len(todo))
    hashed.flush()
    return hashed


def _chunks(todo: np.ndarray, abspaths: _Paths, sizes: np.ndarray, size: int) -> Iterator[list]:
    """(index, path, size) tasks of `size` files, their paths made Python strings a block at a time."""
    for lo in range(0, len(todo), _BLOCK):
        block = todo[lo:lo + _BLOCK]
        items = [(int(i), os.fsdecode(p), int(sizes[i])) for i, p in zip(block, abspaths.take(block))]
        for k in range(0, len(items), size):
            yield items[k:k + size]


def _run_chunks(chunks: Iterator[list], count: int, workers: int) -> Iterator[tuple[int, Record]]:
    """Results of every chunk, in this process (workers 0, or one chunk) or in a fork pool.

    At most two chunks per worker are in flight, so that when a decoder crashes and takes the
    pool down, the suspects are those few chunks: their files are hashed one process each (the
    culprit's row says it crashed) and a fresh pool takes the rest."""
    if workers == 0 or count <= 1:
        for chunk in chunks:
            yield from _hash_chunk(chunk)
        return
    lock = multiprocessing.get_context("fork").RLock()  # fork_pool forks: torch is not among the modules inherited
    todo = iter(chunks)
    pool = _pool(lock, min(workers, count))
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
                kill_broken_pool(pool)
                log.warning("a hashing process died; hashing the files it held one at a time")
                for chunk in list(pending.values()):
                    yield from (_isolated(item) for item in chunk)
                pending.clear()
                lock = multiprocessing.get_context("fork").RLock()  # the dead worker may have held the old one
                pool = _pool(lock, min(workers, count))
    finally:  # on Ctrl-C or an error, drop the queued chunks instead of hashing the rest of the folder
        pool.shutdown(wait=True, cancel_futures=True)


def _pool(lock, workers: int) -> ProcessPoolExecutor:
    return fork_pool(workers, _init_worker, (lock,))


def _top_up(pool: ProcessPoolExecutor, pending: dict[Future, list], todo: Iterator[list], limit: int) -> None:
    """Submit chunks until `limit` are in flight or none is left."""
    while len(pending) < limit:
        chunk = next(todo, None)
        if chunk is None:
            return
        pending[pool.submit(_hash_chunk, chunk)] = chunk


def _isolated(item: tuple[int, str, int | None]) -> tuple[int, Record]:
    """One file hashed in a process of its own, alone (no gate to share, none to leak if it dies
    too); if it does, the file's error."""
    ok, result = run_isolated(_hash_chunk, [item], initializer=lambda: _init_worker(None))
    index, _, size = item
    return result[0] if ok else (index, (None, size, None, result))


# ---- columns and rows -------------------------------------------------------------------------


class _Hashed:
    """The workers' records as columns aligned with the files: numpy arrays filled a block at a time
    (records arrive in any order): sha256 digests and hashes as bytes and numbers (hex only in the
    output), small vocabularies (format, mode) as codes, errors by index."""

    def __init__(self, n: int):
        self.sha = np.zeros(n, "S32")  # raw digests
        self.read = np.zeros(n, bool)  # has a digest
        self.nbytes = np.full(n, -1, np.int64)  # -1: no size in the record
        self.width, self.height = np.zeros(n, np.int32), np.zeros(n, np.int32)
        self.phash, self.dhash = np.zeros(n, np.uint64), np.zeros(n, np.uint64)
        self.decoded = np.zeros(n, bool)
        self.format, self.mode = np.full(n, -1, np.int16), np.full(n, -1, np.int16)
        self.names: dict[str, int] = {}  # format and mode names -> their codes
        self.errors: dict[int, str] = {}
        self._pending: list[tuple[int, Record]] = []

    def add(self, index: int, record: Record) -> None:
        self._pending.append((index, record))
        if len(self._pending) == _BLOCK:
            self.flush()

    def flush(self) -> None:
        read = [(i, bytes.fromhex(sha)) for i, (sha, _, _, _) in self._pending if sha is not None]
        if read:
            at, digests = zip(*read)
            self.sha[list(at)], self.read[list(at)] = digests, True
        sized = [(i, nbytes) for i, (_, nbytes, _, _) in self._pending if nbytes is not None]
        if sized:  # a file whose decoder crashed keeps the size the walk found
            at, sizes = zip(*sized)
            self.nbytes[list(at)] = sizes
        done = [(i, facts) for i, (_, _, facts, _) in self._pending if facts is not None]
        if done:
            at, facts = zip(*done)
            at = list(at)
            fmt, width, height, mode, phash, dhash = zip(*facts)
            code = self.names.setdefault
            self.format[at] = [code(f, len(self.names)) for f in fmt]
            self.mode[at] = [code(m, len(self.names)) for m in mode]
            self.width[at], self.height[at] = width, height
            self.phash[at] = [int(h, 16) for h in phash]
            self.dhash[at] = [int(h, 16) for h in dhash]
            self.decoded[at] = True
        self.errors.update((i, error) for i, (_, _, _, error) in self._pending if error is not None)
        self._pending = []

    def groups(self, phash_max: int, dhash_max: int) -> Groups:
        """Duplicate groups over the decoded files (in path order), as Groups over all files."""
        ok = np.flatnonzero(self.decoded)
        _, content = np.unique(self.sha[ok], return_inverse=True)
        return group_among(len(self.sha), ok, content.reshape(-1), self.phash[ok], self.dhash[ok],
                           self.width[ok].astype(np.int64) * self.height[ok], phash_max=phash_max, dhash_max=dhash_max)


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)


def _hex(raw: np.ndarray) -> np.ndarray:
    """Fixed-width bytes (numpy S<w>) as lower-case hex digits (S<2w>), as bytes.hex() writes them."""
    octets = np.frombuffer(raw.tobytes(), np.uint8)
    digits = np.empty(2 * len(octets), np.uint8)
    digits[0::2], digits[1::2] = _HEX_DIGITS[octets >> 4], _HEX_DIGITS[octets & 15]
    return digits.view(f"S{2 * raw.dtype.itemsize}")


def _hex64(values: np.ndarray) -> np.ndarray:
    """64-bit numbers as 16 hex digits each, as imagehash writes a hash."""
    return _hex(values.astype(">u8").view("S8"))


def _table(files: pa.Table, hashed: _Hashed, groups: Groups, metadata: dict[bytes, bytes]):
    """The rows in path order, their counts by status, and the first files in error."""
    schema = scan_schema(metadata)
    n = files.num_rows
    walk_error = files[Col.ERROR]
    codes = np.full(n, -1, np.int64)  # the hashing errors, as codes into their own list
    codes[list(hashed.errors)] = np.arange(len(hashed.errors))
    error = pc.coalesce(walk_error, _vocabulary(list(hashed.errors.values()), codes))
    failed = _flags(error.is_valid())
    status = np.where(failed, 2, np.where(groups.keeper >= 0, 1, 0))
    sizes, sized = _numbers(files[Col.BYTES], np.int64)
    walked = _flags(walk_error.is_null())  # opened for hashing
    nbytes = np.where(walked, hashed.nbytes, np.where(sized, sizes, -1))
    mtime, has_mtime = _numbers(files[Col.MTIME_NS], np.int64)
    decoded = hashed.decoded & ~failed
    duplicate = groups.keeper >= 0
    columns = {
        Col.PATH: files[Col.PATH], Col.PATH_BYTES: files[Col.PATH_BYTES],
        Col.BYTES: _fixed(nbytes, nbytes >= 0, pa.int64()),
        Col.MTIME: _fixed(mtime // 1000, has_mtime, schema.field(Col.MTIME).type),
        Col.SHA256: _strings(_hex(hashed.sha), hashed.read),
        Col.STATUS: _vocabulary([STATUS_OK, STATUS_DUPLICATE, STATUS_ERROR], status),
        Col.ERROR: error,
        Col.FORMAT: _named(hashed.names, np.where(decoded, hashed.format, -1)),
        Col.WIDTH: _fixed(hashed.width, decoded, pa.int32()), Col.HEIGHT: _fixed(hashed.height, decoded, pa.int32()),
        Col.MODE: _named(hashed.names, np.where(decoded, hashed.mode, -1)),
        Col.PHASH: _strings(_hex64(hashed.phash), decoded), Col.DHASH: _strings(_hex64(hashed.dhash), decoded),
        Col.DUPLICATE_OF: files[Col.PATH].take(_fixed(np.maximum(groups.keeper, 0), duplicate, pa.int64())),
        Col.DUPLICATE_KIND: _vocabulary([DUPLICATE_NEAR, DUPLICATE_EXACT],
                                        np.where(duplicate, groups.exact.astype(np.int64), -1)),
        Col.DUPLICATE_GROUP: _fixed(groups.group, groups.group >= 0, pa.int64()),
    }
    table = pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
    counts = {STATUS_OK: int((status == 0).sum()), STATUS_DUPLICATE: int((status == 1).sum()),
              STATUS_ERROR: int((status == 2).sum())}
    first = np.flatnonzero(failed)[:20]
    shown = table.select([Col.PATH, Col.ERROR]).take(_arrow(first)).to_pylist()
    return table, counts, [{"path": r[Col.PATH], "error": r[Col.ERROR]} for r in shown]


def _validity(valid: np.ndarray):
    return None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))


def _fixed(values: np.ndarray, valid: np.ndarray, kind: pa.DataType) -> pa.Array:
    """Integers (or timestamps in the type's unit) as an Arrow array, null where not valid."""
    dtype = np.int64 if pa.types.is_timestamp(kind) else np.dtype(kind.to_pandas_dtype())
    data = np.where(valid, values, 0).astype(dtype)
    return pa.Array.from_buffers(kind, len(values), [_validity(valid), pa.py_buffer(data)])


def _strings(values: np.ndarray, valid: np.ndarray):
    """Fixed-width ASCII (numpy S<w>) as an Arrow string column, null where not valid: in chunks of
    under 2 GiB, what one Arrow string array can hold (33 million sha256 digests)."""
    step = (2**31 - 1) // max(1, values.dtype.itemsize)
    return pa.chunked_array([_string_array(values[lo:lo + step], valid[lo:lo + step])
                             for lo in range(0, len(values), step)], pa.string())


def _string_array(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(values) + 1, np.int32)
    np.cumsum(np.where(valid, values.dtype.itemsize, 0), out=offsets[1:])
    return pa.Array.from_buffers(pa.string(), len(values), [_validity(valid), pa.py_buffer(offsets),
                                                            pa.py_buffer(values[valid].tobytes())])


def _vocabulary(words: list[str], codes: np.ndarray) -> pa.Array:
    """words[code] per row as an Arrow string array; null where the code is -1."""
    dictionary = table_from_columns({"w": words}, pa.schema([pa.field("w", pa.string())]))[0]
    return dictionary.take(_fixed(np.maximum(codes, 0), codes >= 0, pa.int64()))


def _named(names: dict[str, int], codes: np.ndarray) -> pa.Array:
    return _vocabulary(sorted(names, key=names.get), codes)
