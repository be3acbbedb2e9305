"""The scan job: inventory, sha256, pHash/dHash and duplicate groups of a folder, with no model.

The job walks the folder, hands the files to an engine for scan's stage (the local one,
engines.local_scan.hash_files: stages.hashes.hash_file in one crash-isolating pool; or --engine ray,
engines.ray_scan: stages.hashes.hash_batch in Ray tasks), gathers the
records, groups the duplicates and writes one Parquet file atomically, then the summary. A file
that cannot be read or decoded, or whose decoder crashed its process, is a row with that reason.
Nothing on this path imports torch (nor pandas, which pyarrow imports for some conversions: 0.5 s).
The folder is only read; scan has no cache and no lock.

Per file the parent holds columns, never a Python object: the walk's Arrow table, the records
gathered into numpy arrays a block at a time, the duplicate groups from dedupe.group_among, and
the output built from those, so that its memory grows by well under a kilobyte per file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinobatch import __version__
from dinobatch.config import ScanConfig
from dinobatch.dedupe.groups import Groups, group_among, hashes_from_hex
from dinobatch.engines import ENGINE_RAY
from dinobatch.engines.local_scan import BLOCK, Progress, hash_files
from dinobatch.imaging.decode import HASH_MIN_SIDE, SCAN_MIN_SIDE
from dinobatch.io.arrow import (
    ascii_array,
    indices_array,
    numbers_array,
    numpy_values,
    true_flags,
    true_positions,
    words_array,
    write_table,
)
from dinobatch.io.walk import check_folder, display_path, walk_table
from dinobatch.runtime.device import usable_cores
from dinobatch.runtime.memory import release_memory
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
from dinobatch.stages.hashes import Record
from dinobatch.stages.rows import ERRORS_KEPT

__all__ = ["ScanSummary", "scan_folder", "default_scan_workers"]

log = logging.getLogger(__name__)


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
    hashed = _hash_all(files, abspaths, cfg, workers, progress)
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
    named = true_positions(pc.ends_with(files[Col.PATH], pattern=display_path(name)))  # paths are shown so
    own = [i for i, p in zip(named, files[Col.ABSPATH].take(indices_array(named)).to_pylist())
           if os.path.basename(p) == os.fsencode(name) and os.path.realpath(p) == output]
    if own:
        files = files.take(indices_array(np.setdiff1d(np.arange(files.num_rows), own)))
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
        return self.column.take(self.order.take(indices_array(rows))).to_pylist()


def _hash_all(files: pa.Table, abspaths: _Paths, cfg: ScanConfig, workers: int,
              progress: Progress | None) -> "_Hashed":
    """Every file's record, from the engine cfg.engine names (chosen here only); files the walk
    already refused are not opened."""
    hashed = _Hashed(files.num_rows)
    sizes, _ = numpy_values(files[Col.BYTES], np.int64)
    todo = true_positions(files[Col.ERROR].is_null())
    if cfg.engine == ENGINE_RAY:
        from dinobatch.engines.ray_scan import hash_files as ray_hash_files  # Ray only where it is asked for

        records = ray_hash_files(todo, abspaths.take, sizes, address=cfg.address, progress=progress)
    else:
        records = hash_files(todo, abspaths.take, sizes, workers=workers, progress=progress)
    for index, record in records:
        hashed.add(index, record)
    hashed.flush()
    return hashed


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
        if len(self._pending) == BLOCK:
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
            self.phash[at], self.dhash[at] = hashes_from_hex(phash), hashes_from_hex(dhash)
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


def _bytes_as_hex(raw: np.ndarray) -> np.ndarray:
    """Fixed-width bytes (numpy S<w>) to lower-case hex text (S<2w>), as bytes.hex() writes them."""
    octets = np.frombuffer(raw.tobytes(), np.uint8)
    digits = np.empty(2 * len(octets), np.uint8)
    digits[0::2], digits[1::2] = _HEX_DIGITS[octets >> 4], _HEX_DIGITS[octets & 15]
    return digits.view(f"S{2 * raw.dtype.itemsize}")


def _uint64_as_hex(values: np.ndarray) -> np.ndarray:
    """uint64 numbers to 16 hex digits each (S16), as imagehash writes a hash; the way back, for
    stored hashes, is dedupe.groups.hashes_from_hex."""
    return _bytes_as_hex(values.astype(">u8").view("S8"))


def _table(files: pa.Table, hashed: _Hashed, groups: Groups, metadata: dict[bytes, bytes]):
    """The rows in path order, their counts by status, and the first files in error."""
    schema = scan_schema(metadata)
    n = files.num_rows
    walk_error = files[Col.ERROR]
    codes = np.full(n, -1, np.int64)  # the hashing errors, as codes into their own list
    codes[list(hashed.errors)] = np.arange(len(hashed.errors))
    error = pc.coalesce(walk_error, words_array(list(hashed.errors.values()), codes))
    failed = true_flags(error.is_valid())
    status = np.where(failed, 2, np.where(groups.keeper >= 0, 1, 0))
    sizes, sized = numpy_values(files[Col.BYTES], np.int64)
    walked = true_flags(walk_error.is_null())  # opened for hashing
    nbytes = np.where(walked, hashed.nbytes, np.where(sized, sizes, -1))
    mtime, has_mtime = numpy_values(files[Col.MTIME_NS], np.int64)
    decoded = hashed.decoded & ~failed
    duplicate = groups.keeper >= 0
    columns = {
        Col.PATH: files[Col.PATH], Col.PATH_BYTES: files[Col.PATH_BYTES],
        Col.BYTES: numbers_array(nbytes, nbytes >= 0, pa.int64()),
        Col.MTIME: numbers_array(mtime // 1000, has_mtime, schema.field(Col.MTIME).type),
        Col.SHA256: ascii_array(_bytes_as_hex(hashed.sha), hashed.read),
        Col.STATUS: words_array([STATUS_OK, STATUS_DUPLICATE, STATUS_ERROR], status),
        Col.ERROR: error,
        Col.FORMAT: _named(hashed.names, np.where(decoded, hashed.format, -1)),
        Col.WIDTH: numbers_array(hashed.width, decoded, pa.int32()),
        Col.HEIGHT: numbers_array(hashed.height, decoded, pa.int32()),
        Col.MODE: _named(hashed.names, np.where(decoded, hashed.mode, -1)),
        Col.PHASH: ascii_array(_uint64_as_hex(hashed.phash), decoded),
        Col.DHASH: ascii_array(_uint64_as_hex(hashed.dhash), decoded),
        Col.DUPLICATE_OF: files[Col.PATH].take(numbers_array(np.maximum(groups.keeper, 0), duplicate, pa.int64())),
        Col.DUPLICATE_KIND: words_array([DUPLICATE_NEAR, DUPLICATE_EXACT],
                                        np.where(duplicate, groups.exact.astype(np.int64), -1)),
        Col.DUPLICATE_GROUP: numbers_array(groups.group, groups.group >= 0, pa.int64()),
    }
    table = pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
    counts = {STATUS_OK: int((status == 0).sum()), STATUS_DUPLICATE: int((status == 1).sum()),
              STATUS_ERROR: int((status == 2).sum())}
    first = np.flatnonzero(failed)[:ERRORS_KEPT]
    shown = table.select([Col.PATH, Col.ERROR]).take(indices_array(first)).to_pylist()
    return table, counts, [{"path": r[Col.PATH], "error": r[Col.ERROR]} for r in shown]


def _named(names: dict[str, int], codes: np.ndarray) -> pa.Array:
    return words_array(sorted(names, key=names.get), codes)
